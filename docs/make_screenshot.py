"""Regenerate ``docs/screenshot-review.png``: napari with the review dock on the most doubtful case of a project.

Usage::

    python docs/make_screenshot.py PROJECT          # a project with pseudo labels (e.g. after python -m backend.demo)
    python docs/make_screenshot.py --simulate       # the brain-tissue sample with simulated pseudo-label views

``--simulate`` copies the sample to ``<tmp>/semiseg-sample/brain_tissue`` and writes two methods' views made from
the held-aside reference label (the test fixture of ``tests/test_plugin_fixtures.py``); a real run gives a truer
picture.  Needs a display (``xvfb-run -a python docs/make_screenshot.py ...`` works headless).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", type=Path)
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot-review.png")
    args = parser.parse_args(argv)
    scratch = None
    if args.simulate:
        from backend.sample import copy_sample

        sys.path.insert(0, str(REPO / "tests"))
        from test_plugin_fixtures import write_fake_pseudo_labels

        scratch = Path(tempfile.mkdtemp())
        project = copy_sample(scratch / "semiseg-sample" / "brain_tissue", "brain_tissue")
        write_fake_pseudo_labels(project)
        root = project.root
    elif args.project is not None:
        root = args.project
    else:
        parser.error("give a PROJECT or --simulate")

    from qtpy.QtWidgets import QApplication

    from napari_semiseg.__main__ import open_viewer

    viewer, review, training = open_viewer(root, show=True)
    app = QApplication.instance()
    window = viewer.window._qt_window
    window.resize(1500, 950)
    deadline = time.time() + 120
    while review.case is None and time.time() < deadline:
        app.processEvents()
        time.sleep(0.01)
    if review.case is None:
        print("no case was loaded", file=sys.stderr)
        return 1
    review.parent().raise_()
    end = time.time() + 1.0
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"{args.out}: {review.case} of {root}")
    review._baseline = None
    training._choices_process.kill()
    training._choices_process.waitForFinished(5000)
    viewer.close()
    if scratch is not None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
