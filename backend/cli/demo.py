"""The first run (scripts/run.sh): pseudo labels of every method on the sample project in minutes, then review.

The sample project gets its shipped pretrained checkpoints, every method infers the unlabeled cases with them,
the review queue is printed with the commands to review and to train (or training runs when asked with
``--train``), and napari opens with the docks when a display is present.

Usage: ``python -m backend.cli.demo [PROJECT_DIR] [--methods a,b] [--train] [--preset P] [--steps N] [--no-viewer]``

Without ``--train`` nothing is trained: the shipped checkpoints (``backend.project.sample.install_pretrained``, run
``0-pretrained`` of each method) infer the unlabeled cases, which takes a minute or two on a 2-core CPU.  With
``--train`` every method is then trained on the project (``--preset``, default ``tiny``: a few minutes for the
four methods on a 2-core CPU; ``quick`` takes about half an hour there) and inferred again with the run of the
best validation Dice.  Every phase prints progress lines with the elapsed time and an ETA.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from backend.cli.project import format_case_table
from backend.text import format_duration
from backend.errors import InputError
from backend.methods import method_names
from backend.project import Project
from backend.project.sample import PRETRAINED_RUN, copy_sample, install_pretrained, pretrained_methods
from backend.project.runs import pseudo_runs
from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES, review_rows

DEFAULT_METHODS = ("supervised", "diffrect", "diffcl", "genericssl")
DEFAULT_TRAIN_PRESET = "tiny"
SAMPLE_TASK = "brain_tissue"
ETA_PRIOR_S = 20.0  # seconds of expected work the ETA trusts the expected times for, before the measured pace
FALLBACK_INFER_S = 20.0  # per method and case, before anything was timed (a 3D diffusion method on 2 CPU cores)


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class Clock:
    """Elapsed time since the first run started, printed at the start of every progress line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        print(f"[{format_duration(self.elapsed()):>11}] {text}", flush=True)


def open_command(project: Path) -> tuple[str, str]:
    """The exact commands that open the review in napari: ``(with a display, without one via xvfb-run)``."""
    cmd = f"{shlex.quote(sys.executable)} -m napari_semiseg {shlex.quote(str(project))}"
    return cmd, f"xvfb-run -a {cmd}"


def _prepare_project(path: Path, methods: list[str], clock: Clock) -> Project:
    """Open ``path``, or copy the sample there; install the shipped checkpoints where they fit the project."""
    if (path / "dataset.json").is_file():
        project = Project.open(path)
        clock.say(f"project {project.root} (existing)")
    else:
        project = copy_sample(path, SAMPLE_TASK)
        clock.say(f"copied the {SAMPLE_TASK} sample project to {project.root}")
    shipped = [m for m in methods if m in pretrained_methods(SAMPLE_TASK)]
    if shipped and set(project.case_ids()) >= {"mni152_t1", "itk_kmeans_t1", "colin27_ch2"}:
        try:
            install_pretrained(project, SAMPLE_TASK, shipped)
        except InputError as exc:  # the sample's labeled case was removed or relabeled away
            clock.say(f"pretrained checkpoints not installed: {exc}")
    return project


def _prior_infer_seconds(project: Project, method: str, run: str) -> float:
    """Expected seconds to infer every unlabeled case with ``run``: what the training script measured for the
    shipped checkpoints (2 cases), else a rough constant per case."""
    from backend.project.runs import run_info

    measured = (run_info(project, method, run).get("pretrained") or {}).get("inference_seconds")
    cases = max(1, len(project.unlabeled_cases()))
    if measured:
        return float(measured) / 2 * cases
    return FALLBACK_INFER_S * cases


def infer_all(project: Project, jobs: list[tuple[str, str | None]], clock: Clock, *, device: str = "auto") -> None:
    """Infer each ``(method, run)`` (run None: the engine's choice, the best validation Dice) with progress lines
    and an ETA for the whole phase (expected times rescaled by how fast the finished work went)."""
    from backend.engine.inference import infer

    if not jobs:
        return
    expected = {m: _prior_infer_seconds(project, m, r or PRETRAINED_RUN) for m, r in jobs}
    done_expected = 0.0
    phase_start = clock.elapsed()
    total_cases = len(project.unlabeled_cases())
    clock.say(f"inferring {total_cases} unlabeled case{'s' * (total_cases != 1)} with {len(jobs)} "
              f"method{'s' * (len(jobs) != 1)} (ETA {format_duration(sum(expected.values()))})")
    for i, (method, run) in enumerate(jobs, 1):
        method_expected = expected[method]

        def show(event: dict, method: str = method, i: int = i, method_expected: float = method_expected) -> None:
            if event.get("type") == "start":
                model = event.get("model") or {}
                chosen = f", chosen by {model['chosen_by']}" if model.get("chosen_by") else ""
                clock.say(f"{method} ({i}/{len(jobs)}): run {event.get('run')}{chosen}, device {event.get('device')}, "
                          f"{event['total']} case{'s' * (event['total'] != 1)}")
            elif event.get("type") == "progress":
                share = event["step"] / max(1, event["total"])
                work_done = done_expected + share * method_expected
                spent = clock.elapsed() - phase_start
                # pace against the expected times, shrunk towards 1 while little is done (the first model load
                # also pays the imports, which would otherwise inflate the ETA of the rest)
                rate = (spent + ETA_PRIOR_S) / (work_done + ETA_PRIOR_S)
                remaining = (sum(expected.values()) - work_done) * rate
                agree = event.get("agreement_mean")
                agree_text = "one view" if agree is None else f"agreement Dice {agree:.3f}"
                clock.say(f"  {method}: case {event['step']}/{event['total']} {event['case']} in "
                          f"{event['seconds']:.1f} s ({agree_text}); ETA {format_duration(remaining)}")

        clock.say(f"{method} ({i}/{len(jobs)}): loading the model ...")
        infer(project, method, run=run, device=device, on_event=show)
        done_expected += method_expected


def train_all(project: Project, methods: list[str], preset: str, steps: int | None, clock: Clock,
              *, device: str = "auto") -> list[str]:
    """Train each method (``preset``, ``steps``) with progress lines (method's step, elapsed, ETA); return the
    methods trained."""
    from backend.methods import get_method
    from backend.engine.training import train

    trained = []
    for i, method in enumerate(methods, 1):
        if preset not in get_method(method).presets:
            clock.say(f"{method}: no preset '{preset}' (presets: {', '.join(get_method(method).presets)}); skipped")
            continue
        last = [0.0]

        def show(event: dict, method: str = method, i: int = i) -> None:
            kind = event.get("type")
            now = time.perf_counter()
            if kind == "start":
                clock.say(f"training {method} ({i}/{len(methods)}), preset {preset}, {event['total']} steps, "
                          f"device {event['device']}")
            elif kind == "progress" and (now - last[0] >= 10 or event["step"] == event["total"]):
                last[0] = now
                clock.say(f"  {method} step {event['step']}/{event['total']} ({event['seconds_per_step']:.2f} s/step); "
                          f"ETA of {method} {format_duration(event['eta_s'])}")
            elif kind == "validation" and event.get("mean") is not None:
                clock.say(f"  {method} validation Dice {event['mean']:.3f} at step {event['step']}")

        run = train(project, method, preset=preset, steps=steps, device=device, on_event=show)
        clock.say(f"{method}: trained run {run}")
        trained.append(method)
    return trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", type=Path, default=Path("semiseg-sample"),
                        help="project folder: an existing project, or where to copy the sample (default ./semiseg-sample)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--train", action="store_true", help="also train every method, then infer with the best run")
    parser.add_argument("--preset", default=DEFAULT_TRAIN_PRESET,
                        help="training preset with --train (default tiny: minutes on 2 CPU cores; quick: ~30 min)")
    parser.add_argument("--steps", type=int, help="training steps with --train (default: the preset's)")
    parser.add_argument("--device", default="auto", help="auto|cuda|mps|cpu")
    parser.add_argument("--no-viewer", action="store_true", help="do not open napari even with a display")
    args = parser.parse_args(argv)

    clock = Clock()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        print(f"semiseg: unknown method(s) {', '.join(unknown)} (methods: {', '.join(method_names())})",
              file=sys.stderr)
        return 2
    try:
        project = _prepare_project(args.project, methods, clock)
    except InputError as exc:
        print(f"semiseg: {exc}", file=sys.stderr)
        return 2

    # 1. pseudo labels from the shipped checkpoints (or from the best trained run where one exists)
    jobs: list[tuple[str, str | None]] = []
    untrained = []
    for method in methods:
        from backend.project.runs import model_runs

        runs = model_runs(project, method)
        if not runs:
            untrained.append(method)
        elif pseudo_runs(project, method):
            clock.say(f"{method}: pseudo labels of run {pseudo_runs(project, method)[-1]} already there")
        else:
            jobs.append((method, None))
    for method in untrained:
        clock.say(f"{method}: no pretrained checkpoint{'' if args.train else ' (train it with --train)'}")
    infer_all(project, jobs, clock, device=args.device)
    print(f"\nReview queue (most doubtful first; '{DEFAULT_SORT_SCORE}' = {SORT_SCORES[DEFAULT_SORT_SCORE]}):\n"
          f"{format_case_table(review_rows(project))}\n", flush=True)
    clock.say("review queue ready")

    # 2. training, only when asked
    root = project.root.resolve()
    if args.train:
        trained = train_all(project, methods, args.preset, args.steps, clock, device=args.device)
        infer_all(project, [(m, None) for m in trained], clock, device=args.device)
        print(f"\nReview queue after training:\n{format_case_table(review_rows(project))}\n", flush=True)
        clock.say("done")
    else:
        python = shlex.quote(sys.executable)
        print("To train every method on this project (then infer with the best run by validation; the tiny preset "
              "takes minutes on a 2-core CPU, --preset quick about half an hour):\n"
              f"  {python} -m backend.cli.demo {shlex.quote(str(root))} --train --preset {args.preset}\n"
              f"or one method:  {shlex.quote(str(Path(sys.executable).with_name('semiseg')))} train "
              f"{shlex.quote(str(root))} --method {methods[0] if methods else 'diffrect'} --preset quick\n")

    with_display, headless = open_command(root)
    print(f"To review in napari:\n  {with_display}")
    if not _has_display():
        where = "" if shutil.which("xvfb-run") else " (xvfb-run: Debian package xvfb)"
        print(f"No display here: on this machine napari runs only under a virtual display{where}:\n  {headless}")
    if _has_display() and not args.no_viewer:
        clock.say("opening napari with the review and training docks ...")
        return subprocess.call([sys.executable, "-m", "napari_semiseg", str(root)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
