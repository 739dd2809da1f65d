"""The main job (``scripts/run.sh``): sample project, training and inference of every method, the review queue,
then napari with the docks when a display is present.

Usage: ``python -m backend.demo [PROJECT_DIR] [--preset quick|tiny] [--methods a,b] [--no-viewer]``
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from backend.cli import format_case_table
from backend.methods import method_names
from backend.project import Project
from backend.sample import copy_sample

DEFAULT_METHODS = ("supervised", "diffrect", "diffcl", "genericssl")


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.demo", description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", type=Path, default=Path("semiseg-sample"))
    parser.add_argument("--preset", default="quick", help="training preset of every method (tiny: seconds)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--no-viewer", action="store_true", help="do not open napari even with a display")
    args = parser.parse_args(argv)

    from backend.inference import infer
    from backend.training import train

    project = Project.open(args.project) if (args.project / "dataset.json").is_file() else copy_sample(args.project)
    print(f"Project {project.root}\n{format_case_table(project.case_table())}\n")
    for method in args.methods.split(","):
        if method not in method_names():
            print(f"skipping unknown method {method}")
            continue
        start = time.perf_counter()
        last = [0.0]

        def show(event: dict) -> None:
            if event.get("type") == "progress" and time.perf_counter() - last[0] > 5:
                last[0] = time.perf_counter()
                losses = " ".join(f"{k}={v:.3f}" for k, v in list(event.get("losses", {}).items())[:4])
                print(f"  {method} step {event['step']}/{event['total']} {losses}", flush=True)

        run = train(project, method, preset=args.preset, on_event=show)
        infer(project, method, run=run)
        print(f"{method}: trained and inferred run {run} in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nReview queue (most doubtful first):\n{format_case_table(project.case_table())}")
    if _has_display() and not args.no_viewer:
        print("Opening napari with the review and training docks ...")
        return subprocess.call([sys.executable, "-m", "napari_semiseg", str(project.root)])
    print("No display: run `python -m napari_semiseg PROJECT` on a machine with a screen to review.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
