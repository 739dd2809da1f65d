"""Regenerate ``docs/screenshot-review.png``: napari with the review dock on the most doubtful case of a project
whose pseudo labels come from trained models, at the slice where the views disagree most.

Usage::

    python -m backend.cli.demo DIR --no-viewer                 # the sample, every method inferred with real models
    xvfb-run -a python docs/make_screenshot.py DIR         # headless: Xvfb gives napari's canvas a display

The screenshot shows the class legend, the review table (agreement Dice per method), the first view of the case
with the disagreement outline of that method's views, and the per-slice disagreement profile.
"""
from __future__ import annotations
from backend.project.runs import methods_with_pseudo_labels

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _turn(app, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, help="a project with pseudo labels of trained models")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot-review.png")
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    args = parser.parse_args(argv)

    from qtpy.QtWidgets import QApplication

    from backend.project import Project
    from napari_semiseg.__main__ import open_viewer

    project = Project.open(args.project)
    if not methods_with_pseudo_labels(project):
        print(f"{args.project}: no pseudo labels yet (run `python -m backend.cli.demo {args.project} --no-viewer` or "
              f"`semiseg infer`)", file=sys.stderr)
        return 2
    viewer, review, training = open_viewer(project.root, show=True)
    app = QApplication.instance()
    window = viewer.window._qt_window
    window.resize(*args.size)
    deadline = time.time() + 120
    while review.case is None and time.time() < deadline:
        app.processEvents()
        time.sleep(0.01)
    if review.case is None:
        print("no case was loaded", file=sys.stderr)
        return 1
    review.parent().raise_()
    from qtpy.QtCore import Qt

    _turn(app, 0.5)  # the table filled: widen the dock to show every method's column without scrolling
    need = review.table.horizontalHeader().length() + review.table.verticalScrollBar().sizeHint().width() + 40
    window.resizeDocks([review.parent()], [max(need, review.width())], Qt.Orientation.Horizontal)
    review.go_to_worst_slice()
    _turn(app, 1.5)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"{args.out}: {review.case} of {project.root}, {len(review.views)} views, slice {review.current_slice()}")
    review._baseline = None
    training._timer.stop()
    training._choices_process.kill()
    training._choices_process.waitForFinished(5000)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
