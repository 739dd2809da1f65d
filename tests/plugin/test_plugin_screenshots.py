"""PNGs of the docks for a reviewer to look at (tests/artifacts/, not committed): the review dock with a real case
loaded and a correction started, and the training dock showing a run (events replayed from a recorded stream
of the tiny supervised preset; test_plugin_jobs.py grabs one from a live job too)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_semiseg.review import CORRECTION
from helpers.plugin_fixtures import write_fake_pseudo_labels

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project

pytestmark = pytest.mark.gui
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _non_blank(path: Path) -> float:
    """Standard deviation of the PNG's grey values (a blank or black grab gives ~0)."""
    from qtpy.QtGui import QImage

    image = QImage(str(path)).convertToFormat(QImage.Format.Format_Grayscale8)
    ptr = image.constBits()
    ptr.setsize(image.sizeInBytes())
    data = np.frombuffer(ptr, np.uint8).reshape(image.height(), image.bytesPerLine())[:, : image.width()]
    return float(data.std())


def test_screenshots_of_both_docks(docks, qtbot, brain_project):
    review, training = docks
    ARTIFACTS.mkdir(exist_ok=True)
    viewer = review.viewer
    window = viewer.window._qt_window
    window.resize(1500, 950)
    window.show()
    qtbot.waitExposed(window)
    write_fake_pseudo_labels(brain_project)
    with qtbot.waitSignal(review.table_refreshed, timeout=20000):
        review.refresh()
    with qtbot.waitSignal(review.case_loaded, timeout=30000):
        review.next_case()
    review.parent().raise_()
    qtbot.wait(500)
    path = ARTIFACTS / "review_dock_case_loaded.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.is_file() and _non_blank(path) > 5
    review.start_from("diffcl:cs")
    layer = viewer.layers[CORRECTION]
    layer.brush_size = 8
    z = int(viewer.dims.point[0] / layer.scale[0])
    for y in range(40, 60, 3):
        layer.paint((z, y, 45), 2)
    qtbot.wait(500)
    path = ARTIFACTS / "review_dock_correcting.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert _non_blank(path) > 5
    assert review.grab().save(str(ARTIFACTS / "review_dock_only.png"))

    training.set_choices({"methods": {"supervised": ["tiny", "quick"], "diffcl": ["tiny", "quick"]},
                          "devices": ["cpu"]})
    from backend.io.atomic import write_json_atomic

    write_json_atomic(brain_project.model_dir("supervised", "20251231-120000") / "run.json",
                      {"labeled_count": 1, "last_validation": {"mean": 0.64}})
    training.model_list.refresh()
    training._timer.timeout.disconnect()  # replayed events: nothing to poll
    training.follow("20260101-000000-train-abcd", "train")
    training.monitor.show_event({"type": "start", "run": "20260101-000000", "method": "supervised", "device": "cpu",
                          "total": 200})
    rng = np.random.default_rng(0)
    for step in range(1, 122, 3):
        training.monitor.show_event({"type": "progress", "step": step, "total": 200, "eta_s": 2.5 * (200 - step),
                              "losses": {"loss": 1.8 * np.exp(-step / 60) + 0.3 + 0.05 * rng.random()}})
        if step in (25, 49, 73, 97, 121):
            mean = 0.3 + 0.5 * (1 - np.exp(-step / 50))
            training.monitor.show_event({"type": "validation", "step": step, "mean": mean,
                                  "dice": {"GM": mean + 0.05, "WM": mean - 0.05}})
    training.parent().raise_()
    qtbot.wait(300)
    path = ARTIFACTS / "training_dock_replayed.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert _non_blank(path) > 5
    training._timer.stop()
