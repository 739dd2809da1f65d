"""Job backends: where a job's child process runs.  One small interface, two implementations.

* :class:`LocalBackend`: the child on this machine (``python -m backend.jobs run ROOT JOB``, what
  :func:`backend.jobs.start_job` has always done);
* :class:`backend.jobs.slurm.SubmititBackend`: the same child inside a SLURM job, submitted through submitit
  (``semiseg train --backend slurm``).

Whatever the backend, a job is its folder ``semiseg/jobs/<id>/`` and ``events.jsonl`` there is the one progress
source: :func:`backend.jobs.job_status`, :func:`backend.jobs.read_events`, :func:`backend.jobs.cancel_job` and
:func:`backend.jobs.resume_job` work on any job from any process that sees the folder (the CLI, the server, napari),
because a scheduler's job records its backend and scheduler job id in ``backend.json``
(:func:`backend_from_record` turns that back into the backend).  So ``status``, ``events``, ``cancel`` and ``resume``
are the same functions for every backend; what differs is ``submit`` and two hooks: ``stop`` (how a cancel reaches
the child) and ``alive`` (whether the child runs or is still to run).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

from backend.errors import InputError
from backend.jobs.store import JobPaths

BACKENDS = ("local", "slurm")


class JobBackend(abc.ABC):
    """Where jobs run.  ``submit`` starts one; the rest take any job's id (whichever backend ran it)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def submit(self, project_root: str | Path, spec: dict[str, Any]) -> str:
        """Start (or queue) a job of ``spec`` (see :data:`backend.jobs.store.DEFAULTS`) and return its id."""

    def status(self, project_root: str | Path, job_id: str) -> dict[str, Any]:
        """The job's state (:func:`backend.jobs.job_status`)."""
        from backend.jobs.status import job_status

        return job_status(project_root, job_id)

    def events(self, project_root: str | Path, job_id: str, offset: int = 0,
               max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Events after byte ``offset`` and the next offset (:func:`backend.jobs.read_events`)."""
        from backend.jobs import read_events

        return read_events(project_root, job_id, offset, max_bytes)

    def cancel(self, project_root: str | Path, job_id: str) -> None:
        """Stop the job: training checkpoints, the events end in ``cancelled`` (:func:`backend.jobs.cancel_job`)."""
        from backend.jobs.api import cancel_job

        cancel_job(project_root, job_id)

    def resume(self, project_root: str | Path, job_id: str) -> str:
        """A new job continuing ``job_id``'s run from its last checkpoint, on the backend that ran it
        (:func:`backend.jobs.resume_job`); returns the new id."""
        from backend.jobs.api import resume_job

        return resume_job(project_root, job_id)

    # ---- hooks for cancel_job and job_status (a scheduler's jobs only) ----
    def stop(self, paths: JobPaths, status: dict[str, Any]) -> None:
        """Deliver a cancel (``paths.cancel`` is already written) to the job's child."""
        raise NotImplementedError

    def alive(self, paths: JobPaths, record: dict[str, Any]) -> bool:
        """Whether the job is queued, running or requeued (not gone) by this backend's reckoning."""
        raise NotImplementedError


class LocalBackend(JobBackend):
    """The child on this machine, started by :func:`backend.jobs.start_job` (cancel: SIGTERM; alive: its lock)."""

    name = "local"

    def submit(self, project_root: str | Path, spec: dict[str, Any]) -> str:
        from backend.jobs import start_job

        return start_job(project_root, spec)


def get_backend(name: str, **options: Any) -> JobBackend:
    """The backend called ``name`` (``local`` or ``slurm``); ``options`` for SLURM: ``partition``, ``gpus``,
    ``time_min``, ``folder`` (see :class:`backend.jobs.slurm.SubmititBackend`)."""
    if name == "local":
        if any(v is not None for v in options.values()):
            given = ", ".join(k for k, v in options.items() if v is not None)
            raise InputError(None, f"the local backend takes no scheduler options ({given}); use --backend slurm")
        return LocalBackend()
    if name == "slurm":
        from backend.jobs.slurm import SubmititBackend

        return SubmititBackend(cluster="slurm", **{k: v for k, v in options.items() if v is not None})
    raise InputError(None, f"unknown job backend {name!r} (backends: {', '.join(BACKENDS)})")


def backend_from_record(record: dict[str, Any]) -> JobBackend:
    """The backend that submitted a job, from its ``backend.json``, with the same resources (for resume)."""
    if record.get("backend") == "slurm":
        from backend.jobs.slurm import SubmititBackend

        return SubmititBackend.from_record(record)
    raise InputError(None, f"job backend {record.get('backend')!r} is not known here (backends: "
                           f"{', '.join(BACKENDS)})")


def backend_of(project_root: str | Path, job_id: str) -> JobBackend:
    """The backend that runs job ``job_id``."""
    record = JobPaths.existing(project_root, job_id).backend_record()
    return LocalBackend() if record is None else backend_from_record(record)


__all__ = ["BACKENDS", "JobBackend", "LocalBackend", "backend_from_record", "backend_of", "get_backend"]
