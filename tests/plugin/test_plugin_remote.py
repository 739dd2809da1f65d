"""Both docks in "Server URL + token" mode against a real ``semiseg serve`` (a subprocess on 127.0.0.1, a free port,
a copy of the real brain-tissue sample with pseudo labels of two methods), driven through the dock's widgets:
connect, load the most doubtful case, accept a correction (on the server's disk, as the token's user), a stale
accept gets the conflict question, train and cancel on the server, a wrong token shows the 401 message, and a
server killed while a correction is edited loses nothing: the correction is kept as a draft and offered again."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backend.jobs import list_jobs
from backend.project import Project
from backend.project.sample import copy_sample
from backend.review.corrections import list_drafts
from backend.review.queue import review_rows
from helpers.plugin_fixtures import write_fake_pseudo_labels
from helpers.orthanc import free_port
from helpers.jobs import SMALL  # the tiny preset on 16^3 patches: cheap steps on two cores
from helpers.semiseg_server import serving
from napari_semiseg.review import CORRECTION, KEEP
from napari_semiseg.review.connect import FOLDER, SERVER

pytest_plugins = ["helpers.plugin_fixtures"]  # answers

pytestmark = [pytest.mark.gui, pytest.mark.slow]
DOCS = Path(__file__).resolve().parents[2] / "docs"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # not committed, as test_plugin_screenshots.py's


@pytest.fixture
def served(tmp_path):
    project = copy_sample(tmp_path / "served", "brain_tissue")
    write_fake_pseudo_labels(project)
    with serving(project.root, tmp_path / "server") as server:
        yield server, project


@pytest.fixture
def remote_docks(make_napari_viewer, qtbot, answers, monkeypatch, tmp_path):
    """A viewer with both docks and nothing open; the client's cache (the mirror, the drafts) under tmp_path."""
    from napari_semiseg.review import ReviewDock
    from napari_semiseg.training import TrainingDock

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _record_main_thread_requests(monkeypatch)
    import napari.utils.notifications as notifications

    ERRORS.clear()
    monkeypatch.setattr(notifications, "show_error", ERRORS.append)
    viewer = make_napari_viewer()
    review, training = ReviewDock(viewer), TrainingDock(viewer)
    viewer.window.add_dock_widget(review, name="Review pseudo labels")
    viewer.window.add_dock_widget(training, name="Train and infer", tabify=True)
    yield review, training
    review._baseline = None
    training._timer.stop()
    process = training._choices_process
    if process.state() != process.ProcessState.NotRunning:
        process.kill()
        process.waitForFinished(5000)


ON_MAIN_THREAD: list[str] = []
ERRORS: list[str] = []  # the napari error notifications the docks showed


def _record_main_thread_requests(monkeypatch) -> None:
    """Every request the client sends on the main (event-loop) thread is recorded in ON_MAIN_THREAD."""
    from backend.remote.transport import Transport

    ON_MAIN_THREAD.clear()
    for name in ("_send", "download", "sse"):
        original = getattr(Transport, name)

        def wrapped(self, method_or_path, *args, _original=original, **kwargs):
            if threading.current_thread() is threading.main_thread():
                ON_MAIN_THREAD.append(f"{method_or_path} {args[:1]}")
            return _original(self, method_or_path, *args, **kwargs)
        monkeypatch.setattr(Transport, name, wrapped)


def _fill(review, url: str, token: str) -> None:
    panel = review.connection
    panel.mode_combo.setCurrentText(SERVER)
    panel.url_edit.setText(url)
    panel.token_edit.setText(token)


def _connect(qtbot, review, url: str, token: str) -> None:
    _fill(review, url, token)
    with qtbot.waitSignal(review.table_refreshed, timeout=60000):
        review.connection.connect_button.click()


def _paint(review, qtbot, value: int = 1) -> np.ndarray:
    layer = review.viewer.layers[CORRECTION]
    layer.brush_size = 6
    z = int(review.viewer.dims.point[0] / layer.scale[0])
    for y in range(40, 60, 3):
        layer.paint((z, y, 45), value)
    qtbot.wait(50)
    return np.array(layer.data)


def _load(qtbot, review, case: str) -> float:
    """Load ``case`` from the server; the longest gap of a 10 ms main-thread timer meanwhile (ms)."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    with qtbot.waitSignal(review.case_loaded, timeout=60000, raising=False) as loaded:
        assert review.select_case(case)
    assert loaded.signal_triggered, f"{case} not loaded; errors shown: {ERRORS}"
    timer.stop()
    return 1000 * max(np.diff(ticks)) if len(ticks) > 1 else float("nan")


def test_both_docks_drive_a_server(remote_docks, served, qtbot, answers):
    review, training = remote_docks
    server, project = served
    window = review.viewer.window._qt_window
    window.resize(1500, 1300)
    window.show()
    qtbot.waitExposed(window)

    review.advance_check.setChecked(False)  # stay on the case after accepting (the conflict below is on it)
    _connect(qtbot, review, server.url, server.tokens["boss"])
    assert review.project.server == server.url and training.state.is_remote()
    assert "as boss (trainer)" in review.connection.message.text()
    # the training form offers the server's methods, presets and devices (asked over HTTP in a worker)
    qtbot.waitUntil(lambda: not training.form.local and bool(training.choices.get("devices")), timeout=60000)
    assert training.choices["devices"] == ["cpu"]  # the server's (a CPU server here), not asked of this process
    assert set(training.choices["methods"]) >= {"diffrect", "diffcl", "genericssl", "supervised"}
    # PACS import and export would write the local mirror, not the server's project: not offered
    assert review.pacs.isHidden() and review.editor.export_button.parentWidget().isHidden()
    expected = [r["case"] for r in review_rows(project)]
    assert review.table_cases() == expected  # the server's review order
    assert f"\n{server.url} (mirrored in " in review.project_label.text()
    doubtful = next(r["case"] for r in review_rows(project) if not r["labeled"])

    stall_ms = _load(qtbot, review, review.visible_rows()[0]["case"])
    assert review.case == doubtful and sorted(review.views) == ["diffcl:cs", "diffcl:ds", "genericssl:combined",
                                                                "genericssl:diffusion"]
    print(f"longest main-thread gap while the first case loaded from the server: {stall_ms:.0f} ms")

    review.start_from("diffcl:cs")
    corrected = _paint(review, qtbot)
    with qtbot.waitSignal(review.table_refreshed, timeout=60000), \
            qtbot.waitSignal(review.accepted, timeout=60000) as accepted:
        review.accept()
    assert np.array_equal(project.read_label(doubtful).array, corrected)  # on the server's disk
    assert project.history(doubtful)[-1]["user"] == "boss"
    assert accepted.args[1]["voxels_edited"] > 0
    training.parent().raise_()
    qtbot.wait(300)
    review.parent().raise_()
    qtbot.wait(300)
    ARTIFACTS.mkdir(exist_ok=True)
    review.viewer.screenshot(str(ARTIFACTS / "remote_docks.png"), canvas_only=False)
    if os.environ.get("SEMISEG_UPDATE_DOCS"):  # the README's picture (a plain test run leaves docs/ alone)
        shutil.copyfile(ARTIFACTS / "remote_docks.png", DOCS / ".screenshot-remote.png")
        os.replace(DOCS / ".screenshot-remote.png", DOCS / "screenshot-remote.png")

    # someone else accepts the case on the server: this viewer's next accept is refused (409) and asks
    project.accept(doubtful, np.zeros_like(corrected), source="manual", user="other")
    again = _paint(review, qtbot, value=2)
    answers.queue.append(KEEP)
    review.accept()
    qtbot.waitUntil(lambda: any(t == "The label changed on disk" for t, _, _ in answers.asked), timeout=60000)
    qtbot.waitUntil(lambda: doubtful in list_drafts(review.project), timeout=20000)
    assert project.history(doubtful)[-1]["user"] == "other"  # theirs was not overwritten
    assert np.array_equal(review.viewer.layers[CORRECTION].data, again)

    # train on the server, follow it, cancel it
    training.set_choices({"methods": {"supervised": ["tiny"]}, "devices": ["cpu"]})
    training.overrides = dict(SMALL)
    training.steps_spin.setValue(5000)
    with qtbot.waitSignal(training.job_started, timeout=60000) as started:
        training.start_training()
    job_id = started.args[0]
    assert [j["id"] for j in list_jobs(project.root)] == [job_id]  # the server's job
    qtbot.waitUntil(lambda: training.monitor._last_step >= 2, timeout=240000)
    with qtbot.waitSignal(training.job_finished, timeout=120000) as finished:
        training.cancel()
    assert finished.args == [job_id, "cancelled"]
    assert list_jobs(project.root)[0]["state"] == "cancelled"
    qtbot.waitUntil(lambda: training.resume_button.isEnabled(), timeout=20000)  # the server's job list, fetched

    # the server dies while a correction is being edited: nothing is lost
    second = next(c for c in review.table_cases() if c != doubtful and not project.is_labeled(c))
    stall_ms = _load(qtbot, review, second)  # the layers exist: only their data changes
    print(f"longest main-thread gap while the next case loaded from the server: {stall_ms:.0f} ms")
    review.start_from("diffcl:ds")
    edited = _paint(review, qtbot)
    server.kill()
    review.accept()
    qtbot.waitUntil(lambda: second in list_drafts(review.project), timeout=60000)
    qtbot.waitUntil(lambda: not review._busy, timeout=20000)
    assert "kept as a draft" in review.status.text()
    assert np.array_equal(review.viewer.layers[CORRECTION].data, edited) and not project.is_labeled(second)
    server.start()  # back on the same port
    answers.queue.append(KEEP)
    _load(qtbot, review, doubtful)
    answers.queue.append("Restore")
    _load(qtbot, review, second)
    qtbot.waitUntil(lambda: any(t == "Unsaved correction found" and second in text for t, text, _ in answers.asked),
                    timeout=20000)
    assert np.array_equal(review.viewer.layers[CORRECTION].data, edited)
    # every request ran in a worker thread (the main thread only built layers): a slow or dead server never
    # freezes napari
    assert ON_MAIN_THREAD == []


def test_401_and_refused_messages_then_back_to_a_project_folder(remote_docks, served, qtbot):
    review, training = remote_docks
    server, project = served
    assert review.connection.server_box.isHidden()  # "Project folder" is the default
    _fill(review, server.url, "not-a-token")
    with qtbot.waitSignal(review.connection.tested, timeout=30000) as tested:
        review.connection.test_button.click()
    assert tested.args[0] is False and "401" in tested.args[1]
    assert "401 unauthorized" in review.connection.message.text() and review.project is None
    _fill(review, server.url, server.tokens["ann"])
    with qtbot.waitSignal(review.connection.tested, timeout=30000) as tested:
        review.connection.test_button.click()
    assert tested.args == [True, f"{Project(server.root).name} on {server.url} as ann (annotator)"]
    _fill(review, f"http://127.0.0.1:{free_port()}", server.tokens["ann"])  # nothing listens there
    with qtbot.waitSignal(review.connection.tested, timeout=30000) as tested:
        review.connection.connect_button.click()
    assert tested.args[0] is False and "connection refused" in tested.args[1] and review.project is None

    # an annotator connects, then goes back to a project folder: local jobs, PACS and Export again
    _connect(qtbot, review, server.url, server.tokens["ann"])
    assert training.state.is_remote() and review.pacs.isHidden()
    assert "as ann (annotator)" in review.connection.message.text()
    review.connection.mode_combo.setCurrentText(FOLDER)
    assert review.connection.server_box.isHidden() and not review.open_button.isHidden()
    with qtbot.waitSignal(review.table_refreshed, timeout=60000):
        review.open_project(project.root)
    assert not training.state.is_remote() and training.state.jobs().root == project.root
    assert training.form.local  # this machine's methods and devices again (the form's child process)
    assert not review.pacs.isHidden() and not review.editor.export_button.parentWidget().isHidden()
