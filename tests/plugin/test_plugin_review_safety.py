"""What makes a review session trustworthy, driven in real napari viewers on the real brain-tissue sample: the class
legend, the disagreement outline (per method, toggled, off in 3D) and its per-slice profile, cycling through the
views, the confirmation before an empty or class-dropping label is accepted, the conflict warning when two viewers
accept the same case, the run *Infer* uses (best by validation unless picked), and the question when napari
closes while a job runs."""
from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt

from backend.review.corrections import load_draft
from backend.review.views import ALL_METHODS, disagreement, read_views, slice_profile
from backend.review.colors import label_color
from backend.io.atomic import write_json_atomic
from backend.io.volume import read_volume
from napari_semiseg.review import ACCEPT_ANYWAY, CORRECTION, DISAGREEMENT, KEEP, OVERWRITE, ReviewDock
from napari_semiseg.training import CANCEL_JOB, KEEP_RUNNING, STAY, TrainingDock

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _answered(answers):
    """Every question a dock asks in this module is answered by the ``answers`` fixture."""
    return answers


def open_dock(make_napari_viewer, qtbot, root) -> ReviewDock:
    viewer = make_napari_viewer()
    dock = ReviewDock(viewer)
    viewer.window.add_dock_widget(dock, name="Review pseudo labels")
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
        dock.open_project(root)
    return dock


def load(qtbot, dock, case=None) -> str:
    with qtbot.waitSignal(dock.case_loaded, timeout=30000) as blocker:
        dock.select_case(case) if case else dock.next_case()
    return blocker.args[0]


def accept(qtbot, dock) -> dict:
    with qtbot.waitSignal(dock.accepted, timeout=30000) as blocker:
        dock.accept()
    return blocker.args[1]


@pytest.fixture
def dock(make_napari_viewer, qtbot, reviewed_project):
    widget = open_dock(make_napari_viewer, qtbot, reviewed_project.root)
    widget.advance_check.setChecked(False)
    yield widget
    widget.editor.autosave.stop()
    widget._baseline = None


def test_legend_names_every_class_in_its_layer_colour(dock, reviewed_project):
    texts = [w.text() for w in dock.legend_box.findChildren(type(dock.status)) if w.objectName() == "legend_entry"]
    assert texts == ["1 GM", "2 WM", "views disagree (outline)"]
    assert [rgb for _t, rgb in dock.legend[:2]] == [pytest.approx(label_color(1)), pytest.approx(label_color(2))]
    dock.grab()  # laid out: no legend text is cut
    for label in dock.legend_box.findChildren(type(dock.status)):
        if label.objectName() == "legend_entry":
            assert label.width() >= label.fontMetrics().horizontalAdvance(label.text())


def test_disagreement_outline_per_method_toggle_3d_and_worst_slice(dock, qtbot, reviewed_project):
    case = load(qtbot, dock)
    views = read_views(reviewed_project, case)
    layer = dock.viewer.layers[DISAGREEMENT]
    keys = [dock.disagreement_combo.itemData(i) for i in range(dock.disagreement_combo.count())]
    assert keys == ["diffcl", "genericssl", ALL_METHODS]
    assert layer.contour > 0 and layer.visible  # an outline, not a filled block
    # another method: its own views' disagreement, and its profile
    dock.disagreement_combo.setCurrentIndex(1)
    expected = disagreement([views["genericssl:combined"], views["genericssl:diffusion"]])
    assert np.array_equal(layer.data, expected)
    assert dock.profile_plot.profile == slice_profile(expected).tolist()
    # the toggle (checkbox and Shift+D)
    dock.disagreement_check.setChecked(False)
    assert not layer.visible
    from napari.utils.key_bindings import KeyBinding

    keys_bound = {str(k): v for k, v in dock.viewer.keymap.items()}
    keys_bound[str(KeyBinding.from_str("Shift-D"))](dock.viewer)
    assert dock.disagreement_check.isChecked() and layer.visible
    # off in 3D, back in 2D
    dock.viewer.dims.ndisplay = 3
    assert not layer.visible
    dock.viewer.dims.ndisplay = 2
    assert layer.visible
    # the choice holds for the next case
    other = load(qtbot, dock, [c for c in dock.table_cases() if c != case][0])
    other_views = read_views(reviewed_project, other)
    assert dock.disagreement_shown() == "genericssl"
    assert np.array_equal(dock.viewer.layers[DISAGREEMENT].data, disagreement(
        [other_views["genericssl:combined"], other_views["genericssl:diffusion"]]))
    load(qtbot, dock, case)
    # the worst slice, by button / Shift+W, and by a click on the profile
    worst = int(np.argmax(slice_profile(expected)))
    assert dock.go_to_worst_slice() == worst and dock.current_slice() == worst
    window = dock.viewer.window._qt_window
    window.show()
    qtbot.waitExposed(window)
    plot = dock.profile_plot
    rect = plot._plot_rect()
    target = len(plot.profile) // 4
    x = int(rect.left() + (target + 0.5) * rect.width() / len(plot.profile))
    qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, int(rect.center().y())))
    assert dock.current_slice() == target and plot.current == target


def test_one_key_cycles_through_the_views(dock, qtbot):
    load(qtbot, dock)
    names = list(dock.views)
    assert dock.visible_view() == names[0]
    from napari.utils.key_bindings import KeyBinding

    handler = {str(k): v for k, v in dock.viewer.keymap.items()}[str(KeyBinding.from_str("Shift-V"))]
    seen = []
    for _ in names:
        handler(dock.viewer)
        seen.append(dock.visible_view())
    assert seen == names[1:] + names[:1]  # each view alone, in turn, back to the first


def test_empty_or_class_dropping_label_is_accepted_only_after_confirming(dock, qtbot, reviewed_project, answers):
    project = reviewed_project
    case = load(qtbot, dock)
    dock.start_from("diffcl:cs")
    layer = dock.viewer.layers[CORRECTION]
    layer.data = np.zeros_like(layer.data)  # an erase over the whole volume
    dock.accept()  # the box is closed: Cancel
    title, text, buttons = answers.asked[-1]
    assert title == "Accept this label?" and "empty (background only)" in text and buttons[0] == ACCEPT_ANYWAY
    qtbot.wait(200)
    assert not project.is_labeled(case) and "not accepted" in dock.status.text()
    # a label without WM although every view has WM
    data = read_views(project, case)["diffcl:cs"].copy()
    data[data == 2] = 1
    layer.data = data
    dock.accept()
    assert "no 'WM' (label 2)" in answers.asked[-1][1] and "diffcl:cs" in answers.asked[-1][1]
    qtbot.wait(200)
    assert not project.is_labeled(case)
    answers.queue = [ACCEPT_ANYWAY]
    accept(qtbot, dock)
    assert np.array_equal(read_volume(project.label_path(case)).array, data)
    # a plain correction is accepted without a question
    asked = len(answers.asked)
    other = [c for c in project.unlabeled_cases() if c != case][0]
    load(qtbot, dock, other)
    dock.start_from("diffcl:ds")
    accept(qtbot, dock)
    assert len(answers.asked) == asked and project.is_labeled(other)


def test_two_viewers_accepting_one_case_conflict_is_caught(make_napari_viewer, qtbot, reviewed_project, answers):
    project = reviewed_project
    first = open_dock(make_napari_viewer, qtbot, project.root)
    second = open_dock(make_napari_viewer, qtbot, project.root)
    for dock in (first, second):
        dock.advance_check.setChecked(False)
    case = load(qtbot, first)
    assert load(qtbot, second, case) == case
    first.start_from("diffcl:cs")
    accept(qtbot, first)
    theirs = read_volume(project.label_path(case)).array.copy()
    # the second viewer opened the case before that accept: its accept is refused, and it is asked
    second.start_from("genericssl:combined")
    mine = np.asarray(second.correction_layer.data).copy()
    assert not np.array_equal(mine, theirs)
    second.accept()  # the box is closed: keep as draft
    qtbot.waitUntil(lambda: any(a[0] == "The label changed on disk" for a in answers.asked), timeout=30000)
    assert answers.asked[-1][2] == [OVERWRITE, KEEP]
    qtbot.waitUntil(lambda: not second._busy, timeout=10000)
    assert np.array_equal(read_volume(project.label_path(case)).array, theirs)  # not overwritten
    volume, _info = load_draft(project, case)
    assert np.array_equal(volume.array, mine)  # the correction is kept
    assert len(project.history(case)) == 1
    # asked again, the reviewer overwrites
    answers.queue = [OVERWRITE]
    with qtbot.waitSignal(second.accepted, timeout=30000):
        second.accept()
    assert np.array_equal(read_volume(project.label_path(case)).array, mine)
    assert len(project.history(case)) == 2
    # the second viewer now holds the latest version: its next accept goes through without a question
    asked = len(answers.asked)
    second.correction_layer.data_setitem((np.array([3]), np.array([3]), np.array([3])), 1)
    accept(qtbot, second)
    assert len(answers.asked) == asked
    # and the first viewer, which has not seen those writes, is warned
    first.start_from("diffcl:cs")
    first.accept()
    qtbot.waitUntil(lambda: len(answers.asked) > asked, timeout=30000)
    assert answers.asked[-1][0] == "The label changed on disk"
    qtbot.waitUntil(lambda: not first._busy, timeout=10000)
    for dock in (first, second):
        dock._baseline = None


def test_a_label_accepted_from_the_command_line_meanwhile_is_not_overwritten_silently(dock, qtbot, reviewed_project,
                                                                                        answers, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    project = reviewed_project
    case = load(qtbot, dock)
    dock.start_from("diffcl:cs")
    mine = np.asarray(dock.correction_layer.data).copy()
    theirs = read_views(project, case)["genericssl:combined"]
    path = tmp_path / "theirs.nii.gz"
    from backend.io.volume import write_volume

    write_volume(project.read_image(case).like(theirs), path)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "backend.cli", "accept", str(project.root), case, str(path)],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    dock.accept()  # the box is closed: keep as draft
    qtbot.waitUntil(lambda: any(a[0] == "The label changed on disk" for a in answers.asked), timeout=30000)
    qtbot.waitUntil(lambda: not dock._busy, timeout=10000)
    assert np.array_equal(read_volume(project.label_path(case)).array, theirs)
    assert np.array_equal(load_draft(project, case)[0].array, mine)
    assert "kept as a draft" in dock.status.text()


@pytest.fixture
def training(make_napari_viewer, brain_project):
    viewer = make_napari_viewer()
    dock = TrainingDock(viewer)
    viewer.window.add_dock_widget(dock, name="Train and infer")
    dock.state.set_project(type(brain_project).open(brain_project.root))
    yield dock
    dock._timer.stop()
    process = dock._choices_process
    if process.state() != process.ProcessState.NotRunning:
        process.kill()
        process.waitForFinished(5000)


def _fake_run(project, method, run, dice):
    folder = project.model_dir(method, run)
    write_json_atomic(folder / "run.json", {"method": method, "labeled_count": 1,
                                            "best": {"step": 100, "dice": dice},
                                            "last_validation": {"mean": dice, "step": 100}})
    (folder / "checkpoint.pt").write_bytes(b"")  # only its presence matters here


def test_infer_uses_the_best_run_by_validation_unless_the_user_picks_one(training, brain_project):
    training.set_choices({"methods": {"supervised": ["tiny"], "diffrect": ["tiny"]}, "devices": ["cpu"]})
    assert training.method_combo.currentText() == "diffrect"  # a semi-supervised method by default
    _fake_run(brain_project, "diffrect", "20260101-000000", 0.759)
    _fake_run(brain_project, "diffrect", "20260102-000000", 0.134)  # newer, far worse
    training.model_list.refresh()
    assert training.spec("infer")["run"] == "20260101-000000"
    assert training.model_label.text() == ("Infer uses: diffrect run 20260101-000000, best by validation "
                                           "(validation Dice 0.759)")
    table = training.models_table
    rows = {table.item(i, 1).text(): i for i in range(table.rowCount())}
    assert table.item(rows["20260101-000000"], 4).text() == "best"
    assert not training.best_button.isEnabled()
    # the user clicks the newer run: Infer uses it, and the dock says it is their pick
    table.selectRow(rows["20260102-000000"])
    assert training.spec("infer")["run"] == "20260102-000000"
    assert training.model_label.text().endswith("20260102-000000, your pick (validation Dice 0.134)")
    assert table.item(rows["20260102-000000"], 4).text() == "picked"
    assert table.item(rows["20260101-000000"], 4).text() == ""
    training.model_list.refresh()  # a refresh (a job's checkpoint, an accept) keeps the pick
    assert training.spec("infer")["run"] == "20260102-000000"
    training.best_button.click()
    assert training.spec("infer")["run"] == "20260101-000000" and "best by validation" in training.model_label.text()
    # a better run arrives: followed without a pick
    _fake_run(brain_project, "diffrect", "20260103-000000", 0.80)
    training.model_list.refresh()
    assert training.spec("infer")["run"] == "20260103-000000"


def test_closing_napari_while_a_job_runs_asks(training, qtbot, answers, monkeypatch):
    window = training.viewer.window._qt_window
    window.show()
    qtbot.waitExposed(window)
    training.job_id, training.job_kind = "20260101-000000-train-abcd", "train"
    training._timer.timeout.disconnect()  # no real job to poll
    training._timer.start()
    answers.queue = [STAY]
    assert window.close() is False and window.isVisible()
    title, _text, buttons = answers.asked[-1]
    assert title == "A train job is running" and buttons == [KEEP_RUNNING, CANCEL_JOB, STAY]
    from qtpy.QtGui import QCloseEvent

    cancelled = []
    monkeypatch.setattr(training, "cancel", lambda: cancelled.append(True))
    answers.queue = [CANCEL_JOB]
    assert training._close_guard.eventFilter(window, QCloseEvent()) is False and cancelled == [True]
    answers.queue = [KEEP_RUNNING]
    assert training._close_guard.eventFilter(window, QCloseEvent()) is False
    training._timer.stop()
    asked = len(answers.asked)
    assert training._close_guard.eventFilter(window, QCloseEvent()) is False  # nothing runs: no question
    assert len(answers.asked) == asked


def test_a_method_with_one_view_gets_no_agreement_column(make_napari_viewer, qtbot, reviewed_project):
    """The supervised baseline has one view: no agreement Dice, so no column of dashes squeezing the table."""
    import json

    from backend.io.volume import write_volume
    from helpers.plugin_fixtures import FAKE_RUN, sort_by

    project = reviewed_project
    cases = {}
    for case in project.unlabeled_cases():
        write_volume(project.read_image(case).like(read_views(project, case)["diffcl:cs"]),
                     project.pseudo_dir("supervised", FAKE_RUN) / case / "prediction.nii.gz")
        cases[case] = {"agreement": {}, "agreement_mean": None, "agreement_worst": None}
    (project.pseudo_dir("supervised", FAKE_RUN) / "scores.json").write_text(json.dumps({"cases": cases}))
    dock = open_dock(make_napari_viewer, qtbot, project.root)
    sort_by(qtbot, dock, "mean")
    assert "supervised" in dock.methods_in_table()
    headers = [dock.table.horizontalHeaderItem(i).text() for i in range(dock.table.columnCount())]
    assert [h.split("\n")[0] for h in headers] == ["case", "status", "diffcl", "genericssl"]
    load(qtbot, dock)
    assert "supervised:prediction" in dock.views  # its view is still shown and cycled through
