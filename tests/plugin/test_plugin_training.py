"""The training dock: choices, live display of a job's events, the models table, and the docks' link (inference
done -> the review table refreshes).  Real background jobs are in test_plugin_jobs.py (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.io.atomic import write_json_atomic
from helpers.plugin_fixtures import FAKE_VIEWS, sort_by, write_fake_pseudo_labels

pytestmark = pytest.mark.gui


def test_the_docks_share_the_project(docks, brain_project):
    review, training = docks
    assert training.state is review.state and training.state.project.root == brain_project.root
    assert str(brain_project.root) in training.project_label.text()


def test_methods_presets_and_devices_come_from_a_child_process(docks, qtbot):
    _review, training = docks
    if not training.choices:
        with qtbot.waitSignal(training.choices_loaded, timeout=120000):
            pass
    methods = [training.method_combo.itemText(i) for i in range(training.method_combo.count())]
    assert "supervised" in methods
    assert training.method_combo.currentText() == "diffrect"  # a semi-supervised method, not the baseline
    training.method_combo.setCurrentText("supervised")
    presets = [training.preset_combo.itemText(i) for i in range(training.preset_combo.count())]
    assert "tiny" in presets and training.preset_combo.currentText() == "quick"
    devices = [training.device_combo.itemText(i) for i in range(training.device_combo.count())]
    assert devices[0] == "auto" and "cpu" in devices
    training.preset_combo.setCurrentText("tiny")
    training.steps_spin.setValue(30)
    training.overrides = {"val_every": 10}
    assert training.spec("train") == {"kind": "train", "method": "supervised", "device": "auto", "preset": "tiny",
                                      "steps": 30, "overrides": {"val_every": 10}}
    assert training.spec("infer") == {"kind": "infer", "method": "supervised", "device": "auto"}


def test_job_events_drive_progress_curves_and_dice(docks, monkeypatch):
    _review, training = docks
    import napari.utils.notifications as notifications

    errors: list[str] = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    training.set_choices({"methods": {"diffcl": ["tiny"]}, "devices": ["cpu"]})
    training.job_id, training.job_kind = "20260101-000000-train-abcd", "train"
    training._timer.start()
    training.monitor.show_event({"type": "start", "run": "r1", "method": "diffcl", "device": "cpu", "total": 100})
    assert training.progress.maximum() == 100
    for step in (10, 20, 30):
        training.monitor.show_event({"type": "progress", "step": step, "total": 100, "eta_s": 75.0 - step,
                              "losses": {"loss_sup": 1.0 / step, "loss_cons": 0.5 / step, "lambda": 0.1}})
    assert training.progress.value() == 30
    assert training.progress.format() == "train step 30/100  ETA 45 s"
    assert [p[0] for p in training.loss_plot.series["loss_sup"]] == [10, 20, 30]
    assert set(training.loss_plot.series) == {"loss_sup", "loss_cons"}  # a weight is no loss
    training.monitor.show_event({"type": "validation", "step": 30, "dice": {"GM": 0.8, "WM": 0.7}, "mean": 0.75})
    assert training.dice_label.text().startswith("Validation Dice: 0.750")
    assert training.calibration_label.text() == "Calibration Dice: -"  # diffcl reports no tau
    assert "GM 0.800" in training.dice_label.text()
    assert training.dice_plot.series["mean"] == [(30.0, 0.75)]
    assert "training cases" not in training.dice_label.text()
    training.monitor.show_event({"type": "validation", "step": 40, "dice": {"GM": 0.9, "WM": 0.8}, "mean": 0.85,
                          "val_on_train": True})
    assert training.dice_label.text().endswith("at step 40 on the training cases")
    training.monitor.show_event({"type": "error", "kind": "oom", "message": "CUDA out of memory", "traceback": "..."})
    assert not training._timer.isActive()
    assert errors and "CUDA out of memory" in errors[0] and "oom" in errors[0]
    assert training.progress.format() == "train error"


def test_loss_plot_draws_a_few_losses_with_a_legend_apart_and_calibration_dice_on_its_own(docks, qtbot):
    """DiffRect's progress events carry 12 scalars: the plot draws the first LOSS_SERIES losses (the total
    first), the legend sits below the curves without overlap, tau_l/tau_u go to the calibration Dice line."""
    from napari_semiseg.training import LOSS_SERIES

    _review, training = docks
    training.set_choices({"methods": {"diffrect": ["tiny"]}, "devices": ["cpu"]})
    training.job_id, training.job_kind = "20260101-000000-train-abcd", "train"
    training._timer.start()
    losses = {"loss": 2.0, "loss_sup": 0.9, "loss_semi": 0.4, "loss_rect": 0.3, "loss_lat_u": 0.2, "loss_lat_l": 0.2,
              "loss_dec_l": 0.5, "loss_dec_u": 0.6, "tau_l": 0.61, "tau_u": 0.83, "confident": 0.7,
              "consistency_weight": 0.1}
    for step in (1, 2, 3):
        training.monitor.show_event({"type": "progress", "step": step, "total": 10, "losses": losses})
    plot = training.loss_plot
    assert list(plot.series) == ["loss", "loss_sup", "loss_semi", "loss_rect"][:LOSS_SERIES]
    assert plot.left_out == {"loss_lat_u", "loss_lat_l", "loss_dec_l", "loss_dec_u"}
    assert not {"tau_l", "tau_u", "confident", "consistency_weight"} & set(plot.series)
    assert training.calibration_label.text() == ("Calibration Dice (eq. 6) at step 3: tau_l 0.610 (weak vs label), "
                                                 "tau_u 0.830 (strong vs weak)")
    assert training.dice_label.text() == "Validation Dice: -"
    entries = plot.legend_entries()
    assert len(entries) == LOSS_SERIES + 1 and entries[-1] == "+4 more not drawn"
    assert entries[0] == "loss 2" and all(e.split()[0] in plot.legend.text() for e in entries)
    # the legend is a label of its own under the curves (never over them); in a 300 px wide dock it wraps onto
    # more rows, and the widget grows by the rows its width needs
    from napari_semiseg._plot import CurvePlot

    alone = CurvePlot(plot.title, log_y=True, max_series=LOSS_SERIES)  # the same plot, laid out 300 px wide
    for name, points in plot.series.items():
        for x, y in points:
            alone.add_point(name, x, y)
    for name in plot.left_out:
        alone.add_point(name, 1, 1.0)
    assert alone.legend.text() == plot.legend.text()
    alone.resize(300, 400)
    alone.layout().activate()
    assert alone.legend.geometry().top() > alone.plot.geometry().bottom()
    assert alone.legend.wordWrap() and alone.legend.geometry().right() < 300
    line = alone.legend.fontMetrics().lineSpacing()
    assert alone.legend.heightForWidth(300) >= 2 * line > alone.legend.heightForWidth(3000)
    assert alone.legend.height() >= alone.legend.heightForWidth(300)  # every row it needs, under the curves
    training.monitor.show_event({"type": "done", "run": "r"})


def test_models_table_shows_the_labeled_set_size_of_each_model(docks, brain_project):
    _review, training = docks
    for run, count, dice in (("20250101-000000", 1, 0.61), ("20250102-000000", 2, 0.7)):
        folder = brain_project.model_dir("diffcl", run)
        write_json_atomic(folder / "run.json", {"method": "diffcl", "labeled_count": count,
                                                "last_validation": {"mean": dice}})
        (folder / "checkpoint.pt").write_bytes(b"")
    training.set_choices({"methods": {"diffcl": ["tiny"], "supervised": ["tiny"]}, "devices": ["cpu"]})
    training.model_list.refresh()
    rows = [[training.models_table.item(i, j).text() for j in range(5)]
            for i in range(training.models_table.rowCount())]
    labeled = len(brain_project.labeled_cases())  # a model trained on another labeled set says so

    def count(n: int) -> str:
        return str(n) if n == labeled else f"{n} (now {labeled})"

    assert rows == [["diffcl", "20250102-000000", count(2), "0.700", "best"],
                    ["diffcl", "20250101-000000", count(1), "0.610", ""]]
    training.method_combo.setCurrentText("diffcl")
    assert training.selected_model() == ("diffcl", "20250102-000000")
    spec = training.spec("infer")
    assert spec["method"] == "diffcl" and spec["run"] == "20250102-000000"


def test_inference_done_refreshes_the_review_table(docks, qtbot, brain_project):
    review, training = docks
    assert review.methods_in_table() == []
    sort_by(qtbot, review, "mean")  # the column shows each method's agreement between its views
    write_fake_pseudo_labels(brain_project)  # what the inference job writes
    training.job_id, training.job_kind = "20260101-000000-infer-abcd", "infer"
    with qtbot.waitSignal(review.table_refreshed, timeout=20000):
        training.monitor.finish("done", {"run": "x"})
    assert review.methods_in_table() == sorted(FAKE_VIEWS)
    assert review.run_combo.count() == 1 + len(FAKE_VIEWS)
    first = review.table_cases()[0]
    assert not brain_project.is_labeled(first)
    scores = json.loads((brain_project.pseudo_dir("diffcl", "20250101-000000") / "scores.json").read_text())
    mean = review.table.item(0, 2).text().split()[0]
    assert mean == f"{scores['cases'][first]['agreement_mean']:.3f}" and np.isfinite(float(mean))


TOY = '''
from backend.methods.supervised import Supervised

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project


class Toy(Supervised):
    """A method from outside the tree: the supervised baseline under another name."""

    name = "toy"
    presets = {"tiny": dict(Supervised.presets["tiny"])}


METHODS = [Toy]
'''


def test_a_method_from_semiseg_methods_path_is_offered(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A method kept outside the tree ($SEMISEG_METHODS_PATH) shows up in the dock's method list, with its presets,
    through the same child process that lists the built-in ones."""
    from napari_semiseg.training import TrainingDock

    folder = tmp_path / "plugins" / "toymethod"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(TOY)
    monkeypatch.setenv("SEMISEG_METHODS_PATH", str(tmp_path / "plugins"))
    dock = TrainingDock(make_napari_viewer())
    try:
        with qtbot.waitSignal(dock.choices_loaded, timeout=120000):
            pass
        methods = [dock.method_combo.itemText(i) for i in range(dock.method_combo.count())]
        assert "toy" in methods and {"diffrect", "diffcl", "genericssl", "supervised"} <= set(methods)
        dock.method_combo.setCurrentText("toy")
        assert [dock.preset_combo.itemText(i) for i in range(dock.preset_combo.count())] == ["tiny"]
        assert dock.spec("train")["method"] == "toy" and dock.spec("train")["preset"] == "tiny"
    finally:
        process = dock._choices_process
        if process.state() != process.ProcessState.NotRunning:
            process.kill()
            process.waitForFinished(5000)
