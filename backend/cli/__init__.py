"""``semiseg``: the command line over the backend (the same operations the plugin's docks run).

One argparse parser, built here from each command module's ``add_parsers``; every command imports what it needs
when it runs, so ``semiseg cases`` never imports torch.  Bad input ends with one line ``semiseg: <file>:
<problem>`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from backend.errors import InputError, JobBusyError


def build_parser() -> argparse.ArgumentParser:
    from backend.cli import dicom, engine, jobs, project

    parser = argparse.ArgumentParser(prog="semiseg", description="Semi-supervised segmentation review backend")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (project, engine, jobs, dicom):
        module.add_parsers(sub)
    from backend.cli import server
    server.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
