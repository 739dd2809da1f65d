"""Background jobs: training and inference in a child process (``python -m backend.jobs run ROOT JOB``).

napari's process never trains: the UI stays responsive, a crash or an out-of-memory error in training cannot take
the viewer down, and the same job runs from the CLI or on a server.  A job is a folder
``semiseg/jobs/<id>/`` (``spec.json``, ``events.jsonl``, ``log.txt``); any process can read its state.

* :func:`start_job` spawns the child and returns the job id (one training job per project: a second one raises
  :class:`backend.errors.JobBusyError` naming the running job);
* :func:`read_events` reads the event stream incrementally; :func:`job_status` / :func:`list_jobs` summarise it;
* :func:`cancel_job` sends SIGTERM: the child checkpoints and exits with a ``cancelled`` event;
* :func:`resume_job` continues a cancelled, failed or killed training run from its last checkpoint;
* :func:`wait_job` polls until the job ends.

Importing this package does not import torch (the child does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.jobs.api import FINAL_STATES, cancel_job, resume_job, start_job, wait_job
from backend.jobs.events import TERMINAL, classify_error, read_lines
from backend.jobs.status import job_status, list_jobs
from backend.jobs.store import JobPaths


def read_events(project_root: str | Path, job_id: str, offset: int = 0,
                max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Events of job ``job_id`` after byte ``offset``, and the offset to pass next time (never a partial line).
    ``max_bytes`` bounds one call's read, for catching up with a long run's stream a slice at a time."""
    return read_lines(JobPaths.existing(project_root, job_id).events, offset, max_bytes)


__all__ = ["FINAL_STATES", "TERMINAL", "cancel_job", "classify_error", "job_status", "list_jobs", "read_events",
           "resume_job", "start_job", "wait_job"]
