"""Starting, cancelling, resuming and waiting for jobs (what the training dock and the CLI call).

None of these imports torch: starting a job from napari costs a few file writes and a ``fork``/``exec``.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from backend.errors import InputError, JobBusyError
from backend.jobs.events import EventWriter, error_event, now_iso
from backend.io.filelock import WINDOWS, FileLock
from backend.jobs.process import send_cancel, spawn
from backend.jobs.status import CHILDREN, job_status, process_alive
from backend.jobs.store import DEFAULTS, OPTIONAL, JobPaths, new_job, normalize_spec, write_spec
from backend.io.atomic import write_json_atomic
from backend.project import Project

FINAL_STATES = ("done", "error", "cancelled", "dead")
TRAIN_LOCK = "train.lock"
TRAIN_HOLDER = "train.holder.json"
EXIT_GRACE_S = 30.0  # how long wait_job waits for a child to exit after its final event


def busy_message(jobs: Path) -> str:
    """One line naming the training job that holds the project's lock."""
    try:
        holder = json.loads((jobs / TRAIN_HOLDER).read_text())["job"]
    except (OSError, ValueError, KeyError):
        holder = None
    root = jobs.parent.parent
    if holder is None:
        return f"another training job is running on {root}; wait for it to end or cancel it"
    detail = ""
    try:
        status = job_status(root, holder)
        detail = f" ({status['method']}, {status['state']}"
        if status.get("step") is not None and status.get("total"):
            detail += f", step {status['step']}/{status['total']}"
        detail += ")"
    except (InputError, OSError, ValueError):
        pass
    return (f"training job {holder}{detail} is already running on {root}; one training job per project at a "
            f"time: wait for it (semiseg wait) or cancel it (semiseg cancel {root} {holder})")


def start_job(project_root: str | Path, spec: dict[str, Any]) -> str:
    """Start a training or inference job in a child process and return its id.

    ``spec``: ``{"kind": "train"|"infer", "method", "preset", "steps", "device", "run", "resume", "nproc",
    "overrides"}`` (see :data:`backend.jobs.store.DEFAULTS`).  A training job is refused with
    :class:`~backend.errors.JobBusyError` while another one holds the project's training lock.
    """
    project = Project.open(project_root)
    spec = normalize_spec(spec)
    jobs = project.jobs_dir
    jobs.mkdir(parents=True, exist_ok=True)
    train_lock = FileLock(jobs / TRAIN_LOCK) if spec["kind"] == "train" else None
    if train_lock is not None and not train_lock.try_acquire():
        raise JobBusyError(busy_message(jobs))
    alive_lock = None
    try:
        paths = new_job(jobs, spec["kind"])
        fds: dict[str, int] = {}
        if not WINDOWS:  # hand the locked descriptors to the child: no gap in which a second job could start,
            # and none in which another process could see the job (listed once spec.json exists) as dead
            alive_lock = FileLock(paths.alive_lock)
            alive_lock.try_acquire()
            fds["alive"] = alive_lock.fd
            if train_lock is not None:
                fds["train"] = train_lock.fd
        paths.log.touch()
        paths.events.touch()
        write_spec(paths, {"id": paths.id, **spec, "project": str(project.root), "created": now_iso()})
        if train_lock is not None:
            write_json_atomic(jobs / TRAIN_HOLDER, {"job": paths.id})
        try:
            proc = spawn(project.root, paths.id, paths.log, fds)
        except OSError as exc:  # the job exists on disk: leave it in state "error" rather than "dead"
            writer = EventWriter(paths.events)
            writer.emit(error_event(exc))
            writer.close()
            raise
        CHILDREN[paths.id] = proc
        write_json_atomic(paths.launch, {"pid": proc.pid, "time": now_iso()})
    finally:
        for lock in (train_lock, alive_lock):
            if lock is None:
                continue
            if WINDOWS:  # pragma: no cover - the child takes the lock itself
                lock.release()
            else:
                lock.close_handed_over()
    return paths.id


def cancel_job(project_root: str | Path, job_id: str) -> None:
    """Ask a job to stop: the child checkpoints (training), writes a ``cancelled`` event and exits with 0.

    Sends SIGTERM (CTRL_BREAK on Windows) once the child can catch it; a child still starting reads the ``cancel``
    file instead.  Cancelling a job that has already ended does nothing.
    """
    paths = JobPaths.existing(project_root, job_id)
    status = job_status(project_root, job_id)
    if status["state"] in FINAL_STATES:
        return
    paths.cancel.write_text(now_iso() + "\n")
    record = paths.backend_record()
    if record is not None:  # a scheduler's job: its backend stops it (scancel), the child sees ``cancel``
        from backend.jobs.backends import backend_from_record

        backend_from_record(record).stop(paths, status)
        return
    # The child writes ``ready`` after installing its handler and reads ``cancel`` after writing ``ready``: either
    # it sees the file, or ``ready`` exists here and the signal is caught.
    if paths.ready.exists():
        pid = paths.pid()
        if pid:
            send_cancel(pid)


def resume_job(project_root: str | Path, job_id: str) -> str:
    """A new job that continues job ``job_id``'s run: training from the run's last checkpoint (``resume=True``),
    inference by running it again, on the backend that ran it (local, or SLURM with the same resources).
    Refused while the job is still running."""
    new_spec = resume_spec(project_root, job_id)
    record = JobPaths.existing(project_root, job_id).backend_record()
    if record is not None:
        from backend.jobs.backends import backend_from_record

        return backend_from_record(record).submit(project_root, new_spec)
    return start_job(project_root, new_spec)


def resume_spec(project_root: str | Path, job_id: str) -> dict[str, Any]:
    """The spec of the job that continues job ``job_id`` (see :func:`resume_job`)."""
    paths = JobPaths.existing(project_root, job_id)
    status = job_status(project_root, job_id)
    if status["state"] in ("queued", "running"):
        raise JobBusyError(f"job {job_id} is still {status['state']}; cancel it or wait for it before resuming")
    spec = paths.read_spec()
    run = status["run"]
    new_spec = {k: spec[k] for k in (*DEFAULTS, *OPTIONAL) if k in spec}
    new_spec["run"] = run
    new_spec["resumed_from"] = job_id
    if spec["kind"] == "train":
        if run is None:
            raise InputError(paths.dir, f"job {job_id} never named its run (it ended before training started); "
                                        f"start a new job instead")
        checkpoint = Project.open(project_root).model_dir(spec["method"], run) / "checkpoint.pt"
        if not checkpoint.is_file():
            raise InputError(checkpoint, f"job {job_id} left no checkpoint to resume from; start a new job instead")
        new_spec["resume"] = True
    return new_spec


def wait_job(project_root: str | Path, job_id: str, timeout: float | None = None,
             poll: float = 0.2) -> dict[str, Any]:
    """Poll until the job reaches a final state (done, error, cancelled, dead) and return its status.

    It also waits (up to :data:`EXIT_GRACE_S`, within ``timeout``) for the child to exit after its final event,
    so that everything it held is released when this returns.  Raises ``TimeoutError`` after ``timeout`` s.
    """
    paths = JobPaths.existing(project_root, job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    ended_at = None
    while True:
        status = job_status(project_root, job_id)
        now = time.monotonic()
        if status["state"] in FINAL_STATES:
            ended_at = ended_at or now
            if status["state"] == "dead" or now - ended_at > EXIT_GRACE_S or (deadline is not None and now >= deadline):
                return status
            proc = CHILDREN.get(job_id)
            if proc is not None:  # our own child: wait for its exit code
                remaining = EXIT_GRACE_S - (now - ended_at)
                if deadline is not None:
                    remaining = min(remaining, deadline - now)
                try:
                    proc.wait(timeout=max(0.0, remaining))
                except subprocess.TimeoutExpired:
                    pass
                return job_status(project_root, job_id)
            if not process_alive(paths):
                return job_status(project_root, job_id)  # again, now that the child is gone
        elif deadline is not None and now >= deadline:
            raise TimeoutError(f"job {job_id} still {status['state']} after {timeout:g} s")
        time.sleep(poll)
