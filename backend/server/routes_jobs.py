"""Jobs: start training or inference (each its own process, through :func:`backend.jobs.start_job`), list them,
one job's status, its events (JSON slices or a server-sent event stream), cancel and resume."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from backend.errors import InputError
from backend.jobs import cancel_job, job_status, list_jobs, read_events, resume_job
from backend.jobs.store import JobPaths
from backend.project import Project
from backend.server.auth import User
from backend.server.deps import get_project, require
from backend.server.sse import event_stream

router = APIRouter()
CHOICES_TIMEOUT_S = 120


def known_job(job_id: str, project: Project = Depends(get_project)) -> JobPaths:
    """The job's files; 404 for an id the project does not have (or that is not a job id at all)."""
    try:
        return JobPaths.existing(project.root, job_id)
    except InputError:
        raise HTTPException(404, f"no job '{job_id}' in this project") from None


@router.get("/jobs")
def jobs(project: Project = Depends(get_project), user: User = Depends(require("read"))) -> list[dict[str, Any]]:
    return list_jobs(project.root)


@router.get("/choices")
def choices(request: Request, user: User = Depends(require("read"))) -> dict[str, Any]:
    """What the training form offers on this server: ``{"methods": {name: [presets]}, "devices": [...]}`` (its
    GPUs, not the client's).  Computed once, in a child process (``python -m backend.jobs.choices`` imports torch
    and every method, which the server's own process does not)."""
    if getattr(request.app.state, "choices", None) is None:
        done = subprocess.run([sys.executable, "-m", "backend.jobs.choices"], capture_output=True, text=True,
                              timeout=CHOICES_TIMEOUT_S)
        if done.returncode != 0:
            raise HTTPException(500, "could not list the methods and devices: "
                                     + (done.stderr.strip().splitlines() or ["no output"])[-1])
        request.app.state.choices = json.loads(done.stdout.strip().splitlines()[-1])
    return request.app.state.choices


@router.post("/jobs", status_code=201)
def start(request: Request, spec: dict[str, Any] = Body(...), project: Project = Depends(get_project),
          user: User = Depends(require("train"))) -> dict[str, Any]:
    """Start a job from its spec (``kind`` train|infer, ``method``, ``preset``, ``steps``, ``device``, ``nproc``,
    ...: :data:`backend.jobs.store.DEFAULTS`) on the server's job backend (``serve --backend``: this machine or
    SLURM); 409 while another training job runs."""
    job_id = request.app.state.job_backend.submit(project.root, spec)
    return job_status(project.root, job_id)


@router.get("/jobs/{job_id}")
def status(paths: JobPaths = Depends(known_job), project: Project = Depends(get_project),
           user: User = Depends(require("read"))) -> dict[str, Any]:
    return job_status(project.root, paths.id)


@router.get("/jobs/{job_id}/events")
def events(offset: int = 0, max_bytes: int | None = None, paths: JobPaths = Depends(known_job),
           project: Project = Depends(get_project), user: User = Depends(require("read"))) -> dict[str, Any]:
    """The events after byte ``offset`` and the offset to ask from next (:func:`backend.jobs.read_events`)."""
    found, offset = read_events(project.root, paths.id, max(0, offset), max_bytes)
    return {"events": found, "offset": offset}


@router.get("/jobs/{job_id}/stream")
def stream(request: Request, offset: int = 0, paths: JobPaths = Depends(known_job),
           project: Project = Depends(get_project), user: User = Depends(require("read"))) -> StreamingResponse:
    """Server-sent events from byte ``offset`` (or the ``Last-Event-ID`` of a reconnecting client)."""
    last = request.headers.get("last-event-id", "").strip()
    if last.isdigit():
        offset = int(last)
    return StreamingResponse(event_stream(request, paths.events, max(0, offset),
                                          lambda: job_status(project.root, paths.id)),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/jobs/{job_id}/cancel")
def cancel(paths: JobPaths = Depends(known_job), project: Project = Depends(get_project),
           user: User = Depends(require("train"))) -> dict[str, Any]:
    """Ask this job (only) to stop: it checkpoints and ends with a ``cancelled`` event."""
    cancel_job(project.root, paths.id)
    return job_status(project.root, paths.id)


@router.post("/jobs/{job_id}/resume", status_code=201)
def resume(paths: JobPaths = Depends(known_job), project: Project = Depends(get_project),
           user: User = Depends(require("train"))) -> dict[str, Any]:
    """A new job continuing this one's run from its last checkpoint (inference: run again)."""
    return job_status(project.root, resume_job(project.root, paths.id))
