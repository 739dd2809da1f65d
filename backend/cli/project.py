"""``semiseg init | cases | accept | sample``: the project's commands (no torch imported)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES


def cmd_init(args: argparse.Namespace) -> int:
    from backend.dicom import sidecar_hook
    from backend.project.importer import init_project

    project = init_project(args.project, args.images, args.labels, args.labels_json, args.modality,
                           series_hook=sidecar_hook)
    print(f"{project.root}: {len(project.case_ids())} cases, {len(project.labeled_cases())} labeled")
    return 0


def cmd_cases(args: argparse.Namespace) -> int:
    from backend.project import Project

    from backend.review.queue import review_rows

    rows = review_rows(Project.open(args.project), score=args.sort)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_case_table(rows, args.sort))
    return 0


def format_case_table(rows: list[dict], score: str = DEFAULT_SORT_SCORE) -> str:
    """The review queue (:func:`backend.review.queue.review_rows`, already in its order) as aligned text, one
    column of ``score`` per method."""
    methods = sorted({m for row in rows for m in row["scores"]})
    header = ["case", "labeled", "shape (z,y,x)", "spacing (x,y,z) mm"] + [f"{m} {score}" for m in methods]
    lines = []
    for row in rows:
        cells = [row["case"], "yes" if row["labeled"] else "no", "x".join(map(str, row["shape"])),
                 "x".join(f"{s:g}" for s in row["spacing"])]
        for m in methods:
            value = row["scores"].get(m, {}).get(score)
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*cells) for cells in [header, *lines])


def cmd_accept(args: argparse.Namespace) -> int:
    from backend.project import Project
    from backend.io.volume import read_volume

    project = Project.open(args.project)
    label = read_volume(args.label_file)
    record = project.accept(args.case, label, source=args.source or str(args.label_file), label_file=args.label_file)
    print(f"{args.case}: accepted ({record['voxels_changed']} voxels changed); "
          f"{len(project.labeled_cases())} labeled cases")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from backend.project.sample import copy_sample

    project = copy_sample(args.dest, args.task)
    print(f"{project.root}: sample project '{args.task}' with {len(project.case_ids())} cases")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a project from a folder of scans (plain, Decathlon or nnU-Net raw)")
    p.set_defaults(func=cmd_init)
    p.add_argument("project", type=Path)
    p.add_argument("--images", type=Path, required=True, help="folder of images, or a Decathlon/nnU-Net folder")
    p.add_argument("--labels", type=Path, help="folder of labels matched to images by case name")
    p.add_argument("--labels-json", type=Path, help='label names, e.g. {"background": 0, "liver": 1}')
    p.add_argument("--modality", choices=["MR", "CT", "other"], help="intensity normalisation (default MR)")

    p = sub.add_parser("cases", help="list every case in review order: labeled or not, shape, spacing, scores")
    p.add_argument("project", type=Path)
    p.add_argument("--sort", choices=list(SORT_SCORES), default=DEFAULT_SORT_SCORE,
                   help="the review score that orders the table and fills its columns (default %(default)s: "
                        f"{SORT_SCORES[DEFAULT_SORT_SCORE]})")
    p.set_defaults(func=cmd_cases)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("accept", help="add a human-verified label to the labeled set")
    p.add_argument("project", type=Path)
    p.set_defaults(func=cmd_accept)
    p.add_argument("case")
    p.add_argument("label_file", type=Path)
    p.add_argument("--source", help="where the label came from (default: the file name)")

    p = sub.add_parser("sample", help="copy the real sample project to DEST")
    p.add_argument("dest", type=Path)
    p.set_defaults(func=cmd_sample)
    p.add_argument("--task", choices=["brain_tissue", "lesions"], default="brain_tissue")
