"""``python -m backend.jobs run PROJECT_ROOT JOB_ID``: the child process of a job (started by ``start_job``)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.jobs", description="run one semiseg job (the child)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the job whose spec.json is in PROJECT_ROOT/semiseg/jobs/JOB_ID")
    p.add_argument("project_root")
    p.add_argument("job_id")
    args = parser.parse_args(argv)
    from backend.jobs.process import lower_priority
    from backend.jobs.runner import run_job

    lower_priority()
    return run_job(args.project_root, args.job_id)


if __name__ == "__main__":
    sys.exit(main())
