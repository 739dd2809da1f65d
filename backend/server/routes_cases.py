"""Cases: the review queue with its scores, a case's image, accepted label and pseudo-label views as NIfTI bytes
(content-hash ETags), accepting a corrected label (If-Match of the label version it started from), flags."""
from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from backend.io.volume import read_volume
from backend.project import ANY, Project
from backend.project.checks import FILE_ENDING, check_label
from backend.project.runs import methods_with_pseudo_labels, pseudo_runs
from backend.review.corrections import accept_correction, flag_case, unflag_case
from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES, default_runs, review_rows
from backend.review.views import pseudo_views
from backend.server.auth import User
from backend.server.deps import get_project, known_case, require
from backend.server.files import file_response, send_open

router = APIRouter()


def parse_runs(project: Project, runs: str | None) -> dict[str, str]:
    """``"method:run,method:run"`` -> ``{method: run}``, each checked against the project's pseudo-label runs
    (404 otherwise); None or "" -> the review's default runs (each method's best)."""
    if not runs:
        return default_runs(project)
    out = {}
    for item in runs.split(","):
        method, _, run = item.partition(":")
        if method not in methods_with_pseudo_labels(project) or run not in pseudo_runs(project, method):
            raise HTTPException(404, f"no pseudo labels of run '{item}' in this project")
        out[method] = run
    return out


def quoted(version: str | None) -> str | None:
    return None if version is None else f'"{version}"'


@router.get("/cases")
def list_cases(score: str = DEFAULT_SORT_SCORE, runs: str | None = None, project: Project = Depends(get_project),
               user: User = Depends(require("read"))) -> dict[str, Any]:
    """The review queue (:func:`backend.review.queue.review_rows`, the order ``semiseg cases`` prints), each row
    with its ``label_version``."""
    if score not in SORT_SCORES:
        raise HTTPException(422, f"unknown review score '{score}' (scores: {', '.join(SORT_SCORES)})")
    chosen = parse_runs(project, runs)
    rows = review_rows(project, chosen, score)
    for row in rows:
        row["label_version"] = project.label_version(row["case"])
    return {"cases": rows, "runs": chosen, "score": score}


@router.get("/cases/{case}")
def case_detail(case: str = Depends(known_case), runs: str | None = None, project: Project = Depends(get_project),
                user: User = Depends(require("read"))) -> dict[str, Any]:
    """One case: labeled or not, its label version, shape, spacing and the pseudo-label views of ``runs``."""
    shape, spacing = project.image_header(case)
    views = {}
    for name, path in pseudo_views(project, case, parse_runs(project, runs)).items():
        method, _, view = name.partition(":")
        views[name] = {"method": method, "run": path.parent.parent.name, "view": view}
    return {"case": case, "labeled": project.is_labeled(case), "label_version": project.label_version(case),
            "shape": list(shape), "spacing": list(spacing), "views": views}


@router.get("/cases/{case}/image")
def case_image(request: Request, case: str = Depends(known_case), project: Project = Depends(get_project),
               user: User = Depends(require("read"))) -> Response:
    return file_response(request, project.image_path(case))


@router.get("/cases/{case}/label")
def case_label(request: Request, case: str = Depends(known_case), project: Project = Depends(get_project),
               user: User = Depends(require("read"))) -> Response:
    """The accepted label; its ETag is the label version (what a PUT names in If-Match).  404 when none."""
    for _ in range(5):  # an accept renamed a new label into place between the two looks: look again
        version = project.label_version(case)
        if version is None:
            raise HTTPException(404, f"case '{case}' has no accepted label")
        try:
            handle = open(project.label_path(case), "rb")
        except FileNotFoundError:
            continue
        if project.label_version(case) == version:
            return send_open(request, handle, project.label_path(case), etag=quoted(version))
        handle.close()
    raise HTTPException(503, f"the label of case '{case}' keeps changing; try again")


@router.get("/cases/{case}/views/{method}/{run}/{view}")
def case_view(request: Request, method: str, run: str, view: str, case: str = Depends(known_case),
              project: Project = Depends(get_project), user: User = Depends(require("read"))) -> Response:
    path = pseudo_views(project, case, parse_runs(project, f"{method}:{run}")).get(f"{method}:{view}")
    if path is None:
        raise HTTPException(404, f"no view '{view}' of {method}:{run} for case '{case}'")
    return file_response(request, path)


def expected_version(request: Request) -> str | None | object:
    """The label version the client started from: ``If-Match: "<version>"``, or ``If-None-Match: *`` for "the
    case had no label"; ``If-Match: *`` overwrites whatever is there (``Project.accept``'s default, what
    ``semiseg accept`` does).  428 without any of them: a client must say which."""
    if_match = request.headers.get("if-match", "").strip()
    if if_match == "*":
        return ANY
    if if_match:
        return if_match.strip('"')
    if request.headers.get("if-none-match", "").strip() == "*":
        return None
    raise HTTPException(428, "a label PUT needs If-Match: \"<label version>\" (If-None-Match: * for a case "
                             "without a label, If-Match: * to overwrite whatever is there)")


@router.put("/cases/{case}/label")
async def put_label(request: Request, case: str = Depends(known_case), source: str = "manual",
                    seconds: float = 0.0, voxels_edited: int | None = None, project: Project = Depends(get_project),
                    user: User = Depends(require("annotate"))) -> dict[str, Any]:
    """Accept a corrected label (NIfTI bytes, the image's grid) through the same journaled accept as the CLI and
    the review dock (:func:`backend.review.corrections.accept_correction`); provenance is the token's user."""
    version = expected_version(request)
    body = await request.body()
    return await run_in_threadpool(_accept, project, case, body, version, source, seconds, voxels_edited, user)


def _accept(project: Project, case: str, body: bytes, version: str | None | object, source: str, seconds: float,
            voxels_edited: int | None, user: User) -> dict[str, Any]:
    project.tmp_dir.mkdir(parents=True, exist_ok=True)
    upload = project.tmp_dir / f"upload-{secrets.token_hex(8)}{FILE_ENDING}"
    try:
        upload.write_bytes(body)
        label = read_volume(upload)
    finally:
        upload.unlink(missing_ok=True)
    # the geometry is checked here: accept_correction takes an array in the image's grid
    array = check_label(label, project.image_geometry(case), project.labels, f"uploaded label of case '{case}'")
    extra: dict[str, Any] = {"via": "server"}
    if voxels_edited is not None:
        extra["voxels_edited"] = int(voxels_edited)
    record = accept_correction(project, case, array, source=source, seconds=seconds, extra=extra, user=user.name,
                               expected_version=version)
    return {**record, "label_version": project.label_version(case)}


@router.post("/cases/{case}/flag")
def flag(case: str = Depends(known_case), reason: str = Body("", embed=True), project: Project = Depends(get_project),
         user: User = Depends(require("annotate"))) -> dict[str, Any]:
    return flag_case(project, case, reason, user=user.name)


@router.delete("/cases/{case}/flag")
def unflag(case: str = Depends(known_case), project: Project = Depends(get_project),
           user: User = Depends(require("annotate"))) -> dict[str, Any]:
    unflag_case(project, case)
    return {"case": case, "flagged": False}
