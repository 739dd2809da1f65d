"""The docks with real background jobs (a tiny supervised training in a child process, then inference): live
progress while the UI keeps running, cancel, resume, and the review table refreshing when inference ends.

Slow: each job imports torch and trains on real volumes in a child process.
"""
from __future__ import annotations
from backend.project.runs import methods_with_pseudo_labels

import importlib.util
from pathlib import Path

import pytest

from bench.ui import Ticks  # the 10 ms timer whose tick gaps are the event loop's stalls

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project

pytestmark = [pytest.mark.gui, pytest.mark.slow]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _engine_missing() -> str | None:
    for module in ("backend.jobs", "backend.engine.training", "backend.engine.inference", "backend.methods.supervised"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not there yet"
    return None


@pytest.fixture(autouse=True)
def _need_engine():
    reason = _engine_missing()
    if reason:
        pytest.skip(f"needs the training engine: {reason}")


def _setup(training, steps: int, **overrides) -> list[dict]:
    training.set_choices({"methods": {"supervised": ["tiny", "quick"]}, "devices": ["cpu"]})
    training.method_combo.setCurrentText("supervised")
    training.preset_combo.setCurrentText("tiny")
    training.steps_spin.setValue(steps)
    training.overrides = overrides or None
    events: list[dict] = []
    training.event_received.connect(events.append)
    return events


def _grab(widget, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert widget.grab().save(str(path))
    return path


def test_train_live_cancel_resume_then_infer_refreshes_the_review_table(docks, qtbot):
    review, training = docks
    events = _setup(training, steps=30, val_every=5, checkpoint_every=5)
    ticks = Ticks().start()
    job = training.start_training()
    assert job and training.is_running() and training.cancel_button.isEnabled()
    assert not training.train_button.isEnabled()
    # progress and a validation arrive in the dock while the event loop keeps turning
    qtbot.waitUntil(lambda: any(e["type"] == "validation" for e in events), timeout=400000)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and training.progress.value() == progress[-1]["step"]
    assert "ETA" in training.progress.format() and training.loss_plot.series["loss"]
    assert training.dice_label.text().startswith("Validation Dice: ")
    elapsed = sum(ticks.gaps)
    assert len(ticks.gaps) > elapsed / 0.010 * 0.3, "the event loop hardly ran while the job trained"
    training.viewer.window._qt_window.show()
    dock_widget = training.parent()
    dock_widget.raise_()
    qtbot.wait(300)
    _grab(training, "training_dock_mid_run.png")
    _grab(training.viewer.window._qt_window, "training_window_mid_run.png")
    # cancel: the job checkpoints and stops
    with qtbot.waitSignal(training.job_finished, timeout=120000) as finished:
        training.cancel()
    ticks.stop()
    assert finished.args == [job, "cancelled"]
    assert training.progress.format() == "train cancelled"
    assert training.resume_button.isEnabled() and training.train_button.isEnabled()
    # resume continues the same run from its checkpoint in a new job; cancel it again after its first step
    cancelled_at = max(e.get("step", 0) for e in events)
    events.clear()
    resumed = training.resume()
    assert resumed and resumed != job
    qtbot.waitUntil(lambda: any(e["type"] == "progress" for e in events), timeout=300000)
    start = next(e for e in events if e["type"] == "start")
    assert start["resumed"] is True and start["step"] >= cancelled_at - 5
    with qtbot.waitSignal(training.job_finished, timeout=120000) as finished:
        training.cancel()
    assert finished.args[1] == "cancelled"
    # inference with that model: pseudo labels of every unlabeled case, then the review table refreshes
    training.model_list.refresh()
    assert training.selected_model() is not None and training.selected_model()[0] == "supervised"
    labeled = len(review.project.labeled_cases())
    assert training.models_table.item(0, 2).text() == str(labeled)  # trained on every labeled case
    with qtbot.waitSignal(review.table_refreshed, timeout=400000):
        with qtbot.waitSignal(training.job_finished, timeout=400000) as finished:
            training.start_inference()
    assert finished.args[1] == "done"
    assert review.methods_in_table() == ["supervised"]
    project = review.project
    assert methods_with_pseudo_labels(project) == ["supervised"]
    with qtbot.waitSignal(review.case_loaded, timeout=60000) as loaded:
        review.next_case()
    assert any(layer.name.startswith("supervised:") for layer in review.viewer.layers)
    assert loaded.args[0] in project.unlabeled_cases()


def test_event_loop_never_stalls_while_a_job_trains(docks, qtbot):
    """No stall over 200 ms in 20 s of a training job (the dock polls its events every 250 ms)."""
    _review, training = docks
    events = _setup(training, steps=400)
    job = training.start_training()
    assert job
    qtbot.waitUntil(lambda: any(e["type"] == "progress" for e in events), timeout=300000)
    ticks = Ticks().start()
    qtbot.wait(20000)
    ticks.stop()
    received = len([e for e in events if e["type"] == "progress"])
    with qtbot.waitSignal(training.job_finished, timeout=120000):
        training.cancel()
    worst = max(ticks.gaps)
    print(f"\n20 s of training: {len(ticks.gaps)} ticks, worst gap {worst * 1000:.0f} ms, "
          f"99th percentile {sorted(ticks.gaps)[int(len(ticks.gaps) * 0.99)] * 1000:.0f} ms, "
          f"{received} progress events shown")
    assert received >= 2
    assert worst < 0.200
