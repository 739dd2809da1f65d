"""``semiseg train | infer | export``: the engine's commands (registered into :mod:`backend.cli`).

Importing this module is cheap (no torch): the engine is imported inside the commands, so ``semiseg cases`` and
``semiseg export`` stay fast.  ``--background`` hands the work to a job (``backend.jobs.start_job``) and prints
the job id; otherwise the command runs here and prints one line per progress event.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backend.cli.project import format_case_table
from backend.text import format_duration
from backend.review.queue import review_rows



# ---- event lines ---------------------------------------------------------------------------------------------
def format_event(event: dict[str, Any]) -> str | None:
    """One human-readable line for a training or inference event (None for events not worth a line)."""
    kind = event.get("type")
    if kind == "start":
        if "cases" in event:
            model = event.get("model") or {}
            how = ""
            if model:
                dice = "" if model.get("dice") is None else f", validation Dice {model['dice']:.3f}"
                how = (f" ({model['checkpoint']} checkpoint, step {model['step']}{dice}; "
                       f"{'run named' if model['chosen_by'] == 'named' else 'best run by validation'})")
            return (f"infer {event['method']} run {event['run']}{how}: {event['total']} cases on "
                    f"{event['device']}")
        resumed = f", resumed at step {event['step']}" if event.get("resumed") else ""
        procs = f" x{event['world_size']}" if event.get("world_size", 1) > 1 else ""
        if event.get("cpu_threads"):
            procs += f" ({event['cpu_threads']} thread{'s' if event['cpu_threads'] > 1 else ''})"
        return (f"train {event['method']} ({event.get('preset') or 'paper defaults'}) run {event['run']} on "
                f"{event['device']}{procs}: {len(event['labeled_cases'])} labeled, "
                f"{len(event['unlabeled_cases'])} unlabeled cases, {event['total']} steps{resumed}")
    if kind == "progress":
        if "case" in event:
            agree = event.get("agreement_mean")
            score = "" if agree is None else f"  agreement {agree:.3f}"
            return (f"case {event['step']}/{event['total']} {event['case']}: {event['seconds']:.1f}s{score}  "
                    f"eta {format_duration(event.get('eta_s'))}")
        losses = "  ".join(f"{k} {v:.4f}" for k, v in event.get("losses", {}).items())
        return (f"step {event['step']}/{event['total']}  {losses}  lr {event['lr']:.2e}  "
                f"{event['seconds_per_step']:.3f} s/step  eta {format_duration(event.get('eta_s'))}")
    if kind == "validation":
        dice = "  ".join(f"{k} {v:.3f}" for k, v in event["dice"].items())
        note = " (on training cases)" if event.get("val_on_train") else ""
        return f"validation at step {event['step']}: Dice {dice}  mean {event['mean']:.3f}{note}"
    if kind == "checkpoint":
        return f"checkpoint at step {event['step']}: {event['path']}"
    if kind == "cancelled":
        return f"cancelled at step {event['step']} (checkpoint kept; continue with --run {event.get('run')} --resume)"
    if kind == "preempted":  # a SLURM job at its time limit or preempted (backend.jobs.slurm): not the end
        return f"stopped by the scheduler at step {event.get('step')} (checkpoint kept): requeued, it resumes there"
    if kind == "done":
        return f"done: run {event['run']}, {event['step']} steps" if "path" not in event else \
            f"done: run {event['run']}, {event['step']} cases, scores in {event['path']}"
    return None


def _print_event(event: dict[str, Any]) -> None:
    line = format_event(event)
    if line:
        print(line, flush=True)


def _start_background(project: Path, spec: dict[str, Any], args: argparse.Namespace) -> int:
    """The hook into the jobs subsystem: start the job on ``--backend`` (a local child, or a SLURM job through
    submitit: backend.jobs.backends), print its id."""
    backend = job_backend(args)
    job_id = backend.submit(project, spec)
    print(job_id)
    if backend.name != "local":
        from backend.jobs.store import JobPaths

        record = JobPaths.existing(project, job_id).backend_record() or {}
        print(f"{job_id}: SLURM job {record.get('scheduler_job')} ({record.get('gpus')} GPUs, {args.time or 60} min"
              f"{', partition ' + args.partition if args.partition else ''}); follow it with: semiseg wait "
              f"{project} {job_id}", file=sys.stderr)
    return 0


def job_backend(args: argparse.Namespace) -> Any:
    """The job backend of --backend, --partition, --gpus, --time, --slurm-folder (checked before any work)."""
    from backend.jobs.backends import get_backend

    return get_backend(args.backend, partition=args.partition, gpus=args.gpus, time_min=args.time,
                       folder=args.slurm_folder)


def _nproc(args: argparse.Namespace) -> int:
    """--nproc, else one process per --gpus on SLURM, else 1."""
    if args.nproc is not None:
        return args.nproc
    return (args.gpus or 1) if args.backend == "slurm" else 1


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from backend.project import Project

    project = Project.open(args.project)
    preset = None if args.preset in ("none", "paper") else args.preset
    if args.resume and not args.run:
        from backend.project.runs import latest_run

        args.run = latest_run(project, args.method)
    args.nproc = _nproc(args)
    job_backend(args)
    if args.background or args.backend != "local":
        return _start_background(project.root, {
            "kind": "train", "method": args.method, "preset": preset, "steps": args.steps, "device": args.device,
            "run": args.run, "resume": args.resume, "nproc": args.nproc}, args)
    if args.nproc > 1:
        from backend.engine.distributed import train_distributed

        train_distributed(project, args.method, nproc=args.nproc, preset=preset, steps=args.steps,
                          device=args.device, run=args.run, resume=args.resume, on_event=_print_event)
        return 0
    from backend.engine.training import train

    train(project, args.method, preset=preset, steps=args.steps, device=args.device, run=args.run,
          resume=args.resume, on_event=_print_event)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from backend.project import Project

    project = Project.open(args.project)
    job_backend(args)
    if args.background or args.backend != "local":
        return _start_background(project.root, {
            "kind": "infer", "method": args.method, "preset": None, "steps": None, "device": args.device,
            "run": args.run, "resume": False, "nproc": 1, **({"cases": args.cases} if args.cases else {})}, args)
    from backend.engine.inference import infer

    infer(project, args.method, run=args.run, device=args.device, cases=args.cases or None, on_event=_print_event,
          checkpoint=args.checkpoint)
    print()
    print(format_case_table(review_rows(project)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from backend.review.export import export

    if args.format == "dicom-seg":  # one DICOM Segmentation per DICOM-imported case (backend.dicom.seg)
        from backend.dicom.seg import export_seg

        paths = export_seg(args.project, args.dest, source=args.source, run=args.run, seg_type=args.seg_type)
    else:
        paths = export(args.project, args.dest, fmt=args.format, source=args.source, run=args.run)
    for path in paths:
        print(path)
    print(f"{len(paths)} files written to {args.dest}", file=sys.stderr)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from backend.jobs.choices import training_choices

    choices = training_choices()
    if args.json:
        print(json.dumps(choices, indent=2))
        return 0
    for name, presets in choices["methods"].items():
        print(f"{name}: presets {', '.join(presets)}")
    print(f"devices: {', '.join(choices['devices'])}")
    return 0


_METHODS_HELP = "method name (semiseg methods lists them)"


def add_backend_args(p: argparse.ArgumentParser, what: str = "where a background job runs (slurm implies --background)"
                     ) -> None:
    """--backend, --partition, --gpus, --time, --slurm-folder: for train, infer and serve."""
    p.add_argument("--backend", choices=["local", "slurm"], default="local",
                   help=f"{what}: this machine, or a SLURM job through submitit (the project folder must be on "
                        "the filesystem the nodes share)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--gpus", type=int, help="SLURM: GPUs on the node (default: --nproc; 0 with --device cpu)")
    p.add_argument("--time", type=int, metavar="MIN",
                   help="SLURM: time limit in minutes (default 60); at the limit the job checkpoints and is "
                        "requeued, resuming from that checkpoint")
    p.add_argument("--slurm-folder", type=Path,
                   help="submitit's folder (sbatch script, task log; default semiseg/jobs/<id>/submitit)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the methods (built in, and found in $SEMISEG_METHODS_PATH) and presets")
    p.set_defaults(func=cmd_methods)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a method on the project's labeled (and unlabeled) cases")
    p.set_defaults(func=cmd_train)
    p.add_argument("project", type=Path)
    p.add_argument("--method", required=True, help=_METHODS_HELP)
    p.add_argument("--preset", default="quick",
                   help="preset of the method (tiny, quick, or a paper setting; 'paper' for the paper defaults)")
    p.add_argument("--steps", type=int,
                   help="training steps (default: the preset's). It rescales every schedule tied to the run "
                        "length (lr decay, consistency ramp-ups, the step a loss or branch switches on, e.g. "
                        "DiffRect's rectification start) by steps / the preset's steps, so a shortened run is a "
                        "shortened paper run; with --resume it extends the run instead (schedules kept)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--nproc", type=int,
                   help="data-parallel processes (torch.distributed; default 1, on SLURM one per --gpus)")
    p.add_argument("--run", help="run name (new run), or the run to continue with --resume")
    p.add_argument("--resume", action="store_true", help="continue a run from its checkpoint (default: the latest)")
    p.add_argument("--background", action="store_true", help="run as a background job and print its id")
    add_backend_args(p)

    p = sub.add_parser("infer", help="write pseudo labels and agreement scores for the unlabeled cases")
    p.add_argument("project", type=Path)
    p.set_defaults(func=cmd_infer)
    p.add_argument("--method", required=True, help=_METHODS_HELP)
    p.add_argument("--run", help="trained run to use (default: the run with the best validation Dice)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="the run's checkpoint: 'best' (highest validation Dice, the default) or 'last' step")
    p.add_argument("--device", default="auto")
    p.add_argument("--cases", nargs="+", help="only these cases (default: every unlabeled case)")
    p.add_argument("--background", action="store_true", help="run as a background job and print its id")
    add_backend_args(p)

    p = sub.add_parser("export", help="export labels or pseudo labels (.nii.gz, .nrrd, Slicer .seg.nrrd, DICOM-SEG)")
    p.set_defaults(func=cmd_export)
    p.add_argument("project", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--format", choices=["nii.gz", "nrrd", "seg.nrrd", "dicom-seg"], default="nii.gz")
    p.add_argument("--seg-type", choices=["binary", "labelmap"], default="binary",
                   help="DICOM-SEG type of --format dicom-seg (default %(default)s)")
    p.add_argument("--source", default="labels", help="'labels' (the verified labels) or a method name")
    p.add_argument("--run", help="the method's inference run (default: the latest)")

