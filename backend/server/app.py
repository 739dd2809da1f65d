"""The FastAPI application over one project folder: :func:`create_app` (routes under :data:`PREFIX`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from backend.errors import InputError, JobBusyError, LabelConflictError
from backend.jobs.backends import JobBackend, LocalBackend
from backend.project import Project
from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES
from backend.server import routes_cases, routes_jobs, routes_runs
from backend.server.auth import TokenStore, User
from backend.server.deps import get_project, require

API_VERSION = 1
PREFIX = f"/api/v{API_VERSION}"


def _error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return handler


def create_app(project_root: str | Path, tokens_path: str | Path, job_backend: JobBackend | None = None) -> FastAPI:
    """The server of the project at ``project_root`` (opened once here: an interrupted accept is recovered),
    authenticating against the tokens file ``tokens_path``; jobs start on ``job_backend`` (default: local)."""
    project = Project.open(project_root)
    app = FastAPI(title="semiseg", version=str(API_VERSION), docs_url=f"{PREFIX}/docs", redoc_url=None,
                  openapi_url=f"{PREFIX}/openapi.json")
    app.state.project_root = project.root
    app.state.tokens = TokenStore(tokens_path)
    app.state.job_backend = job_backend or LocalBackend()
    # Bad input is one line; a label changed meanwhile and a busy training slot are conflicts.
    app.add_exception_handler(LabelConflictError, _error(409))
    app.add_exception_handler(JobBusyError, _error(409))
    app.add_exception_handler(InputError, _error(400))

    @app.get(f"{PREFIX}/health")
    def health() -> dict[str, Any]:
        """Unauthenticated liveness: nothing about the project."""
        return {"status": "ok", "api": API_VERSION}

    @app.get(f"{PREFIX}/info")
    def info(project: Project = Depends(get_project), user: User = Depends(require("read"))) -> dict[str, Any]:
        return {"api": API_VERSION, "name": project.name, "modality": project.modality,
                "labels": {str(k): v for k, v in project.labels.items()}, "num_classes": project.num_classes,
                "cases": len(project.case_ids()), "labeled": len(project.labeled_cases()),
                "user": user.name, "role": user.role, "sort_scores": SORT_SCORES, "default_sort": DEFAULT_SORT_SCORE,
                "job_backend": app.state.job_backend.name}

    for module in (routes_cases, routes_jobs, routes_runs):
        app.include_router(module.router, prefix=PREFIX)
    return app
