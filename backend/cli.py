"""``semiseg``: the command line over the backend (the same operations the plugin's docks run).

Bad input ends with one line ``semiseg: <file>: <problem>`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from backend.errors import InputError, JobBusyError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(func: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = func
        return func
    return register


# ---- foundation commands -------------------------------------------------------------------------------------
@command("init")
def cmd_init(args: argparse.Namespace) -> int:
    from backend.importer import init_project

    project = init_project(args.project, args.images, args.labels, args.labels_json, args.modality)
    print(f"{project.root}: {len(project.case_ids())} cases, {len(project.labeled_cases())} labeled")
    return 0


@command("cases")
def cmd_cases(args: argparse.Namespace) -> int:
    from backend.project import Project

    rows = Project.open(args.project).case_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_case_table(rows))
    return 0


def format_duration(seconds: float | None) -> str:
    """A duration for progress lines and ETAs: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"`` (``"-"`` for None)."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_case_table(rows: list[dict]) -> str:
    """The case table as aligned text, most doubtful (lowest agreement) unlabeled case first."""
    methods = sorted({m for row in rows for m in row["scores"]})
    header = ["case", "labeled", "shape (z,y,x)", "spacing (x,y,z) mm"] + [f"{m} agree" for m in methods]
    lines = []
    for row in sort_review_queue(rows):
        cells = [row["case"], "yes" if row["labeled"] else "no", "x".join(map(str, row["shape"])),
                 "x".join(f"{s:g}" for s in row["spacing"])]
        for m in methods:
            score = row["scores"].get(m, {}).get("mean")
            cells.append("-" if score is None else f"{score:.3f}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*cells) for cells in [header, *lines])


def sort_review_queue(rows: list[dict]) -> list[dict]:
    """Unlabeled first, then by the lowest agreement of any method (no score sorts after scored cases)."""
    def key(row: dict):
        scores = [s["mean"] for s in row["scores"].values() if s.get("mean") is not None]
        return (row["labeled"], min(scores) if scores else 2.0, row["case"])
    return sorted(rows, key=key)


@command("accept")
def cmd_accept(args: argparse.Namespace) -> int:
    from backend.project import Project
    from backend.volume import read_volume

    project = Project.open(args.project)
    label = read_volume(args.label_file)
    record = project.accept(args.case, label, source=args.source or str(args.label_file), label_file=args.label_file)
    print(f"{args.case}: accepted ({record['voxels_changed']} voxels changed); "
          f"{len(project.labeled_cases())} labeled cases")
    return 0


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    from backend.sample import copy_sample

    project = copy_sample(args.dest, args.task)
    print(f"{project.root}: sample project '{args.task}' with {len(project.case_ids())} cases")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description="Semi-supervised segmentation review backend")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a project from a folder of scans (plain, Decathlon or nnU-Net raw)")
    p.add_argument("project", type=Path)
    p.add_argument("--images", type=Path, required=True, help="folder of images, or a Decathlon/nnU-Net folder")
    p.add_argument("--labels", type=Path, help="folder of labels matched to images by case name")
    p.add_argument("--labels-json", type=Path, help='label names, e.g. {"background": 0, "liver": 1}')
    p.add_argument("--modality", choices=["MR", "CT", "other"], help="intensity normalisation (default MR)")

    p = sub.add_parser("cases", help="list every case: labeled or not, shape, spacing, agreement scores")
    p.add_argument("project", type=Path)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("accept", help="add a human-verified label to the labeled set")
    p.add_argument("project", type=Path)
    p.add_argument("case")
    p.add_argument("label_file", type=Path)
    p.add_argument("--source", help="where the label came from (default: the file name)")

    p = sub.add_parser("sample", help="copy the real sample project to DEST")
    p.add_argument("dest", type=Path)
    p.add_argument("--task", choices=["brain_tissue", "lesions"], default="brain_tissue")

    for extend in PARSER_EXTENSIONS:
        extend(sub)
    return parser


# Later modules (engine, jobs, export) add their sub-commands here, keeping one parser.
PARSER_EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    _load_extensions()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"semiseg: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or missing folder: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"semiseg: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except JobBusyError as exc:
        print(f"semiseg: {exc}", file=sys.stderr)
        return 3


def _load_extensions() -> None:
    """Import the modules that register engine commands (kept apart so ``semiseg cases`` never imports torch)."""
    import importlib

    for module in ("backend.cli_engine", "backend.cli_jobs"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":
    # ``python -m backend.cli`` runs this file as ``__main__``, a second copy of the module; the extension
    # modules register into ``backend.cli``, so run that copy's main.
    from backend.cli import main as _main

    sys.exit(_main())
