"""Trained runs and pseudo-label runs: the run table, each method's best and default review run, a run's
pseudo-label scores, and a run's weights (``best.pt``, or the last ``checkpoint.pt``)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from backend.project import Project
from backend.project.runs import best_runs, methods_with_pseudo_labels, pseudo_runs, run_checkpoint, run_table
from backend.review.queue import default_runs
from backend.server.auth import User
from backend.server.deps import get_project, require
from backend.server.files import file_response

router = APIRouter()
WEIGHTS = "application/octet-stream"


@router.get("/runs")
def runs(project: Project = Depends(get_project), user: User = Depends(require("read"))) -> dict[str, Any]:
    """``runs``: every trained run (:func:`backend.project.runs.run_table`); ``best``: the run inference uses per
    method; ``pseudo``: runs with pseudo labels per method; ``review``: the runs the review shows by default."""
    table = run_table(project)
    return {"runs": table, "best": best_runs(project, table),
            "pseudo": {m: pseudo_runs(project, m) for m in methods_with_pseudo_labels(project)},
            "review": default_runs(project)}


@router.get("/scores/{method}")
def scores(method: str, run: str | None = None, project: Project = Depends(get_project),
           user: User = Depends(require("read"))) -> dict[str, Any]:
    """A pseudo-label run's ``scores.json`` (the latest run when ``run`` is not given)."""
    known = pseudo_runs(project, method) if method in methods_with_pseudo_labels(project) else []
    if not known or (run is not None and run not in known):
        raise HTTPException(404, f"no pseudo labels of {method}{':' + run if run else ''} in this project")
    return project.scores(method, run)


@router.get("/runs/{method}/{run}/weights")
def weights(request: Request, method: str, run: str, which: str = "best", project: Project = Depends(get_project),
            user: User = Depends(require("read"))) -> Response:
    """The run's weights file: ``best.pt`` (the best validation; ``which=last``: ``checkpoint.pt``)."""
    if not any(r["method"] == method and r["run"] == run and r["has_checkpoint"] for r in run_table(project)):
        raise HTTPException(404, f"no trained run {method}:{run} in this project")
    if which not in ("best", "last"):
        raise HTTPException(422, "which must be 'best' or 'last'")
    return file_response(request, run_checkpoint(project, method, run, which), media_type=WEIGHTS)
