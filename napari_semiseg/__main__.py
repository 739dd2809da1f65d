"""``python -m napari_semiseg [PROJECT | --sample brain_tissue|lesions]``: napari with the review and training docks,
the project open and the most doubtful case loaded."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def open_viewer(project: Path | None = None, sample: str | None = None, show: bool = True):
    """A napari viewer with both docks; opens ``project`` (or a copy of ``sample``) and its first case."""
    import napari

    from napari_semiseg.review import ReviewDock
    from napari_semiseg.training import TrainingDock

    viewer = napari.Viewer(title="napari-semiseg", show=show)
    review = ReviewDock(viewer)
    training = TrainingDock(viewer)
    viewer.window.add_dock_widget(review, name="Review pseudo labels", area="right")
    viewer.window.add_dock_widget(training, name="Train and infer", area="right", tabify=True)
    review.parent().raise_()
    if sample:
        review.open_sample(sample)
    elif project is not None:
        review.open_project(project)
    if review.project is not None:
        def first_case() -> None:
            review.table_refreshed.disconnect(first_case)
            review.next_case()
        review.table_refreshed.connect(first_case)
    return viewer, review, training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_semiseg", description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", type=Path, help="a project folder (with dataset.json)")
    parser.add_argument("--sample", choices=["brain_tissue", "lesions"],
                        help="open a copy of a sample project (in ~/semiseg-sample/<name>)")
    args = parser.parse_args(argv)
    import napari

    open_viewer(args.project, args.sample)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
