"""The child process of a job: ``python -m backend.jobs run PROJECT_ROOT JOB_ID``.

It reads ``spec.json``, holds the job's locks, runs :func:`backend.engine.training.train` or
:func:`backend.engine.inference.infer` with an ``on_event`` that appends to ``events.jsonl`` and a ``should_stop`` that
turns true on SIGTERM / SIGINT (CTRL_BREAK on Windows), and always ends with exactly one final event:

* ``done`` (exit 0), ``cancelled`` (exit 0; training saved a checkpoint first),
* ``preempted`` (exit 0) instead of ``cancelled`` when a scheduler stopped it (see :mod:`backend.jobs.slurm`): not
  a final event, the scheduler requeues the job and it continues from this checkpoint,
* ``error`` (exit 1; ``kind`` ``"oom"`` or ``"exception"``, the message and the traceback's tail), or
  ``error`` with ``kind`` ``"busy"`` (exit 3) when another training job holds the project.

The engine itself emits ``done``/``cancelled``; the runner holds that final event back until it has released
the training lock (so whoever sees it can start the next training at once), and writes one itself when the engine
returned without.  The alive lock stays held until the process exits.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from backend.jobs.events import TERMINAL, EventWriter, error_event, now_iso
from backend.io.filelock import FileLock, same_file
from backend.jobs.process import cancel_signals, inherited_fds
from backend.jobs.store import JobPaths

EXIT_OK, EXIT_ERROR, EXIT_BUSY = 0, 1, 3


class StopFlag:
    """Set by a cancel signal; ``should_stop`` for the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def install(self) -> None:
        def handler(signum, _frame):
            first = not self._event.is_set()
            self._event.set()
            if first:  # os.write: print() from a handler can collide with a print it interrupted
                os.write(2, f"semiseg job: received signal {signal.Signals(signum).name}: stopping after the "
                            f"current step (training saves a checkpoint first)\n".encode())
        for sig in cancel_signals():
            signal.signal(sig, handler)


def _hold_locks(paths: JobPaths, kind: str) -> tuple[FileLock | None, FileLock | None, bool]:
    """The alive lock and (training) the project's training lock: inherited from start_job when it handed them
    over, taken here otherwise (Windows, or a child started by hand).  Returns (alive, train, busy)."""
    fds = inherited_fds()
    train_path = paths.dir.parent / "train.lock"

    def adopt(name: str, path: Path) -> FileLock:
        fd = fds.get(name)
        if fd is not None and same_file(fd, path):
            return FileLock(path, fd)
        return FileLock(path)

    alive = adopt("alive", paths.alive_lock)
    if not alive.try_acquire():
        alive = None  # only a status probe at this very instant; liveness then falls back to the process id
    if kind != "train":
        return alive, None, False
    train = adopt("train", train_path)
    if not train.try_acquire():
        return alive, None, True
    if "train" not in fds:  # took it ourselves: say who holds it
        from backend.jobs.api import TRAIN_HOLDER
        from backend.io.atomic import write_json_atomic

        write_json_atomic(paths.dir.parent / TRAIN_HOLDER, {"job": paths.id})
    return alive, train, False


def _engine(kind: str, nproc: int) -> Callable[..., str]:
    """The engine entry for the job: inference, training in this process, or data-parallel training over
    ``nproc`` processes (:func:`backend.engine.distributed.train_distributed`: torchrun, same events; cancel reaches
    the workers through ``should_stop``, which it turns into a SIGTERM for torchrun)."""
    if kind == "infer":
        from backend.engine.inference import infer

        return infer
    if nproc > 1:
        import functools

        from backend.engine.distributed import train_distributed

        return functools.partial(train_distributed, nproc=nproc)
    from backend.engine.training import train

    return train


def run_job(project_root: str | Path, job_id: str) -> int:
    """Run job ``job_id`` of the project at ``project_root`` in this process; returns the exit code.

    The final event is written only after the training lock is released, so a caller that sees ``done``,
    ``cancelled`` or ``error`` can start the next training job at once.
    """
    stop = StopFlag()
    stop.install()
    paths = JobPaths(Path(project_root).resolve() / "semiseg" / "jobs", job_id)
    paths.ready.write_text(f"{os.getpid()}\n")
    if paths.cancel.exists():  # cancel asked for before the handler was installed
        stop.set()
    writer = EventWriter(paths.events)
    alive = train_lock = None
    final: dict[str, Any] | None = None
    code = EXIT_ERROR
    try:
        spec = paths.read_spec()
        alive, train_lock, busy = _hold_locks(paths, spec["kind"])
        if busy:
            from backend.jobs.api import busy_message

            final = {"type": "error", "kind": "busy", "exception": "JobBusyError",
                     "message": busy_message(paths.dir.parent), "traceback": None}
            code = EXIT_BUSY
        elif stop():
            final, code = {"type": "cancelled", "message": "cancelled before it started"}, EXIT_OK
        else:
            final, code = _run(project_root, spec, paths, writer, stop), EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - every failure must end as an error event
        traceback.print_exc()
        final, code = error_event(exc), EXIT_ERROR
    finally:
        if train_lock is not None:
            train_lock.release()
        if final is not None:
            if final["type"] == "cancelled" and paths.stopped_by_scheduler():  # not final: requeued, resumes
                final = {**final, "type": "preempted"}  # (backend.jobs.slurm)
            writer.emit(final)
            print(f"semiseg job {paths.id}: {final['type']}", file=sys.stderr, flush=True)
        writer.close()
        # ``alive`` stays locked until the process is gone: the kernel drops it at exit.
    return code


def _run(project_root: str | Path, spec: dict[str, Any], paths: JobPaths, writer: EventWriter,
         stop: StopFlag) -> dict[str, Any]:
    """Run the engine; returns the final event (the engine's own ``done``/``cancelled``, held back until the
    caller has released the training lock)."""
    from backend.project import Project

    project = Project.open(project_root)
    engine = _engine(spec["kind"], int(spec.get("nproc") or 1))
    held: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        if held:  # nothing after the final event
            return
        if event.get("type") in TERMINAL:
            held.append({"time": now_iso(), **event})
        else:
            writer.emit(event)

    common = dict(run=spec.get("run"), device=spec.get("device") or "auto", on_event=on_event, should_stop=stop)
    print(f"semiseg job {paths.id}: {spec['kind']} {spec['method']} "
          f"(preset {spec.get('preset')}, steps {spec.get('steps')}, device {common['device']})", flush=True)
    if spec["kind"] == "train":
        run = engine(project, spec["method"], preset=spec.get("preset"), steps=spec.get("steps"),
                     resume=bool(spec.get("resume")), overrides=spec.get("overrides"), **common)
    else:
        run = engine(project, spec["method"], cases=spec.get("cases"), **common)
    if held:
        final = held[0]
        final.setdefault("run", run)
        return final
    return {"type": "cancelled" if stop() else "done", "run": run}


__all__ = ["run_job", "StopFlag"]
