"""``semiseg jobs | cancel | resume | wait``: background jobs from the command line (see :mod:`backend.jobs`).

Exit codes: 0 success (``wait``: the job is done or was cancelled), 1 the waited job failed or died,
2 bad input (no such project or job), 3 a training job is already running, 124 ``wait --timeout`` ran out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path




def _step(row: dict) -> str:
    if row.get("step") is None:
        return "-"
    return f"{row['step']}/{row['total']}" if row.get("total") else str(row["step"])


def format_jobs(rows: list[dict]) -> str:
    """Jobs as aligned text, newest first; an error's one-line message under its job."""
    header = ["job", "kind", "method", "state", "step", "run", "started", "ended"]
    lines = [[r["id"], r["kind"] or "-", r["method"] or "-",
              r["state"] + (" (cancelling)" if r.get("cancel_requested") and r["state"] in ("queued", "running")
                            else ""),
              _step(r), r.get("run") or "-", (r.get("started") or "-")[:19], (r.get("ended") or "-")[:19]]
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip()]
    for row, cells in zip(rows, lines):
        out.append(fmt.format(*cells).rstrip())
        if row.get("error") and row["state"] in ("error", "dead"):
            out.append(f"    {row['error']['kind']}: {row['error']['message']}")
    return "\n".join(out)


def cmd_jobs(args: argparse.Namespace) -> int:
    from backend.jobs import list_jobs

    rows = list_jobs(args.project)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"{args.project}: no jobs")
    else:
        print(format_jobs(rows))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from backend.jobs import cancel_job, job_status

    before = job_status(args.project, args.job)["state"]
    cancel_job(args.project, args.job)
    if before in ("queued", "running"):
        print(f"{args.job}: cancel requested (training saves a checkpoint, then stops)")
    else:
        print(f"{args.job}: already {before}; nothing to cancel")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from backend.jobs import job_status, resume_job

    job_id = resume_job(args.project, args.job)
    print(job_id)
    if args.wait:
        return _wait(args.project, job_id, None, quiet=False)
    status = job_status(args.project, job_id)
    print(f"{job_id}: {status['kind']} {status['method']} resuming run {status['run']}", file=sys.stderr)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return _wait(args.project, args.job, args.timeout, quiet=args.quiet)


def _describe(event: dict) -> str | None:
    """One line for the events worth printing while waiting: the engine CLI's wording where it has one."""
    try:
        from backend.cli.engine import format_event

        return format_event(event)
    except (ImportError, KeyError, TypeError, ValueError):
        pass
    kind = event.get("type")
    if kind == "progress":
        losses = event.get("losses") or {}
        loss = " ".join(f"{k} {v:.4g}" for k, v in losses.items() if isinstance(v, (int, float)))
        eta = f" eta {event['eta_s']:.0f}s" if isinstance(event.get("eta_s"), (int, float)) else ""
        return f"step {event.get('step')}/{event.get('total')} {loss}{eta}".rstrip()
    if kind in ("start", "checkpoint", "validation", "done", "cancelled"):
        keys = [k for k in event if k not in ("time", "type", "losses", "traceback")]
        return f"{kind}: " + ", ".join(f"{k}={event[k]}" for k in keys)
    return None


def _wait(project: Path, job_id: str, timeout: float | None, quiet: bool) -> int:
    from backend.jobs import FINAL_STATES, job_status, read_events

    deadline = None if timeout is None else time.monotonic() + timeout
    offset, last_progress = 0, 0.0
    while True:
        status = job_status(project, job_id)  # before reading events: the final one is then surely read below
        events, offset = read_events(project, job_id, offset)
        for event in events if not quiet else ():
            if event.get("type") == "progress":
                if time.monotonic() - last_progress < 5.0:
                    continue
                last_progress = time.monotonic()
            line = _describe(event)
            if line:
                print(f"{job_id}: {line}", file=sys.stderr, flush=True)
        if status["state"] in FINAL_STATES:
            break
        if deadline is not None and time.monotonic() >= deadline:
            print(f"semiseg: job {job_id} still {status['state']} after {timeout:g} s", file=sys.stderr)
            return 124
        time.sleep(0.25)
    state = status["state"]
    if state in ("error", "dead"):
        print(f"semiseg: job {job_id} {state}: {status['error']['message']}", file=sys.stderr)
        return 1
    print(f"{job_id}: {state} (run {status['run']}, step {_step(status)})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list the project's background jobs and their state, newest first")
    p.add_argument("project", type=Path)
    p.set_defaults(func=cmd_jobs)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cancel", help="stop a job (training saves a checkpoint first)")
    p.set_defaults(func=cmd_cancel)
    p.add_argument("project", type=Path)
    p.add_argument("job")

    p = sub.add_parser("resume", help="continue a cancelled, failed or killed job's run from its last checkpoint")
    p.add_argument("project", type=Path)
    p.set_defaults(func=cmd_resume)
    p.add_argument("job")
    p.add_argument("--wait", action="store_true", help="wait for the new job and print its progress")

    p = sub.add_parser("wait", help="wait for a job to end, printing its progress (exit 0 done/cancelled, 1 failed)")
    p.set_defaults(func=cmd_wait)
    p.add_argument("project", type=Path)
    p.add_argument("job")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 124)")
    p.add_argument("--quiet", action="store_true", help="print only the final state")

