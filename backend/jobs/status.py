"""The state of a job, read from its files (any process can ask: the plugin, the CLI, another shell).

``state`` is

* ``done``, ``cancelled`` or ``error``: the child wrote that final event;
* ``running``: the child is alive and the engine has started (a ``start`` or later event);
* ``queued``: the child is alive but still starting (importing torch, loading the project);
* ``dead``: no final event and the child is gone (SIGKILL, the kernel's out-of-memory killer, a machine crash).

"Alive" is answered by the job's ``alive.lock`` (held by the child, released by the kernel when it dies), so a
zombie process or a reused process id cannot make a dead job look alive.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from backend.jobs.events import TERMINAL, parse_lines, read_lines
from backend.io.filelock import WINDOWS, is_locked
from backend.jobs.process import pid_alive
from backend.jobs.store import JobPaths, jobs_dir

# Children started by this process, so that they are reaped (no zombies under a long-lived napari).
CHILDREN: dict[str, subprocess.Popen] = {}
EXIT_CODES: dict[str, int] = {}  # exit codes of reaped children of this process

LAUNCH_GRACE_S = 10.0  # Windows: a job without a process id yet counts as starting for this long
SKIM_BYTES = 256 * 1024  # event streams longer than twice this are skimmed (head + tail) on first look
_cache_lock = threading.Lock()
_summaries: dict[str, dict[str, Any]] = {}  # events path -> folded summary + offset (read incrementally)


def _fold(summary: dict[str, Any], event: dict[str, Any]) -> None:
    """Fold one event into the running summary of a job."""
    kind = event.get("type")
    if "step" in event:
        summary["step"] = event["step"]
    if "total" in event:
        summary["total"] = event["total"]
    if event.get("run"):
        summary["run"] = event["run"]
    if kind == "start":
        summary["started"] = summary["started"] or event.get("time")
        summary["device"] = event.get("device", summary.get("device"))
    if kind in TERMINAL and summary["final"] is None:
        summary["final"] = event
    if summary["first_time"] is None:
        summary["first_time"] = event.get("time")
    summary["last_time"] = event.get("time")


def _skim(path: Path, summary: dict[str, Any]) -> None:
    """First look at a long event stream: fold its head (the start event) and its tail (the latest step, the
    final event) only, so the first status of a days-long run stays fast; later calls read what follows."""
    with open(path, "rb") as handle:
        head = handle.read(SKIM_BYTES)
        handle.seek(-SKIM_BYTES, os.SEEK_END)
        tail_start = handle.tell()
        tail = handle.read()
    for event in parse_lines(head[: head.rfind(b"\n") + 1]):
        _fold(summary, event)
    first = tail.find(b"\n") + 1  # the tail's first line is cut
    end = tail.rfind(b"\n") + 1
    for event in parse_lines(tail[first:end]):
        _fold(summary, event)
    summary["offset"] = tail_start + end


def _summary(paths: JobPaths) -> dict[str, Any]:
    key = str(paths.events)
    with _cache_lock:
        try:
            st = os.stat(paths.events)
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident, st = None, None
        summary = _summaries.get(key)
        if summary is None or summary["ident"] != ident or (st is not None and st.st_size < summary["offset"]):
            summary = {"ident": ident, "offset": 0, "step": None, "total": None, "run": None, "started": None,
                       "device": None, "final": None, "first_time": None, "last_time": None}
        if summary["offset"] == 0 and st is not None and st.st_size > 2 * SKIM_BYTES:
            _skim(paths.events, summary)
        events, summary["offset"] = read_lines(paths.events, summary["offset"])
        for event in events:
            _fold(summary, event)
        _summaries[key] = summary
        return dict(summary)


def process_alive(paths: JobPaths) -> bool:
    """Whether the job's child process is still running (it may be past its final event, shutting down).
    A scheduler's job (``backend.json``) is asked of its scheduler: queued, running or requeued counts as alive."""
    record = paths.backend_record()
    if record is not None:
        from backend.jobs.slurm import scheduler_alive

        return scheduler_alive(paths, record)
    if not WINDOWS and paths.alive_lock.exists():
        return is_locked(paths.alive_lock)
    pid = paths.pid()
    if WINDOWS and pid is None and not paths.launch.exists():  # start_job between writing the spec and spawning
        try:
            return time.time() - paths.spec.stat().st_mtime < LAUNCH_GRACE_S
        except OSError:
            return False
    return pid_alive(pid)


def _reap(job_id: str) -> None:
    proc = CHILDREN.get(job_id)
    if proc is not None and proc.poll() is not None:
        EXIT_CODES[job_id] = proc.returncode
        CHILDREN.pop(job_id, None)


def status_of(paths: JobPaths) -> dict[str, Any]:
    spec = paths.read_spec()
    _reap(paths.id)
    alive = process_alive(paths)  # before reading events: a child that ends in between has written its final event
    summary = _summary(paths)
    final = summary["final"]
    error = None
    if final is not None:
        state = final["type"]
        if state == "error":
            error = {k: final.get(k) for k in ("kind", "exception", "message", "traceback")}
    elif alive:
        state = "running" if summary["first_time"] is not None else "queued"
    else:
        state = "dead"
        error = {"kind": "dead", "exception": None, "traceback": None,
                 "message": f"the job's process ended without a final event (killed, out of memory, or the machine "
                            f"stopped); its output is in {paths.log}"}
    return {
        "id": paths.id,
        "kind": spec.get("kind"),
        "method": spec.get("method"),
        "state": state,
        "pid": paths.pid(),
        "step": summary["step"],
        "total": summary["total"],
        "run": spec.get("run") or summary["run"],
        "error": error,
        "started": summary["started"] or summary["first_time"],
        "ended": final.get("time") if final else None,
        # beyond the contract: what a dock or `semiseg jobs` may want to show
        "created": spec.get("created"),
        "preset": spec.get("preset"),
        "device": summary["device"] or spec.get("device"),
        "resumed_from": spec.get("resumed_from"),
        "cancel_requested": paths.cancel.exists(),
        "last_event": summary["last_time"],
        "exit_code": EXIT_CODES.get(paths.id),  # known only in the process that started the job
        "backend": (paths.backend_record() or {"backend": "local"})["backend"],
    }


def job_status(project_root: str | Path, job_id: str) -> dict[str, Any]:
    """The state of job ``job_id`` (see the module docstring)."""
    return status_of(JobPaths.existing(project_root, job_id))


def list_jobs(project_root: str | Path) -> list[dict[str, Any]]:
    """:func:`job_status` of every job in the project, newest first."""
    folder = jobs_dir(project_root)
    if not folder.is_dir():
        return []
    rows = []
    for child in folder.iterdir():
        if not child.is_dir() or not (child / "spec.json").is_file():
            continue
        try:
            rows.append(status_of(JobPaths(folder, child.name)))
        except (ValueError, OSError):  # not a job folder, or a spec being written
            continue
    return sorted(rows, key=lambda r: (r.get("created") or "", r["id"]), reverse=True)
