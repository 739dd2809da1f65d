"""Corrections: the checks before an accept, drafts of unsaved corrections, flags, and accepting a correction into
the labeled set with its review history.

On disk (inside the project's ``semiseg/`` folder)::

    drafts/<case>.nii.gz, drafts/<case>.json      the unsaved correction of a case and what it started from
    flags.json                                    {case: {"time", "user", "reason"}}: cases put aside for a second look
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from backend.io.atomic import write_json_atomic
from backend.io.volume import Volume, read_volume, strip_suffix, write_volume
from backend.project import Project
from backend.project.checks import FILE_ENDING, check_case_name
from backend.project.journal import user_name


def accept_warnings(label: np.ndarray, references: dict[str, np.ndarray | None],
                    labels: dict[int, str]) -> list[str]:
    """Why accepting ``label`` needs the reviewer's confirmation (empty list: it does not).

    ``references`` are what the label is compared with (``{name: array}``: the case's pseudo-label views and its
    accepted label, None entries ignored).  A label that is all background, or that has none of a class that one
    of the references has, is most likely a slip (an erase over the whole volume, a fill with 0), not a finding.
    """
    label = np.asarray(label)
    present = np.bincount(label.ravel(), minlength=max(labels) + 1 if labels else 1) > 0
    out: list[str] = []
    if not present[1:].any():
        out.append("it is empty (background only)")
    for value, name in sorted(labels.items()):
        if value == 0 or (value < present.size and present[value]):
            continue
        holders = [ref for ref, array in references.items()
                   if array is not None and array.shape == label.shape and np.any(array == value)]
        if holders and present[1:].any():
            out.append(f"it has no '{name}' (label {value}), which {', '.join(holders)} "
                       f"{'has' if len(holders) == 1 else 'have'}")
    return out


# ---- drafts ------------------------------------------------------------------------------------------------------
def drafts_dir(project: Project) -> Path:
    return project.semiseg / "drafts"


def draft_path(project: Project, case: str) -> Path:
    return drafts_dir(project) / f"{check_case_name(case)}{FILE_ENDING}"


def save_draft(project: Project, case: str, label: Volume, info: dict[str, Any] | None = None) -> Path:
    """Write the unsaved correction of ``case`` atomically (the previous draft stays intact until the new one
    is complete); ``info`` (what it started from, seconds spent, ...) goes to a JSON file beside it."""
    path = draft_path(project, case)
    write_volume(label.like(np.asarray(label.array, dtype=np.uint8)), path)
    record = {"case": case, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(), **(info or {})}
    write_json_atomic(path.with_name(f"{case}.json"), record)
    return path


def load_draft(project: Project, case: str) -> tuple[Volume, dict[str, Any]] | None:
    """The draft of ``case`` and its info, or None when there is none (or it cannot be read)."""
    path = draft_path(project, case)
    if not path.is_file():
        return None
    try:
        volume = read_volume(path)
    except ValueError:
        return None
    info_path = path.with_name(f"{case}.json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return volume, info


def discard_draft(project: Project, case: str) -> None:
    path = draft_path(project, case)
    path.unlink(missing_ok=True)
    path.with_name(f"{case}.json").unlink(missing_ok=True)


def list_drafts(project: Project) -> list[str]:
    folder = drafts_dir(project)
    return sorted(strip_suffix(p) for p in folder.glob(f"*{FILE_ENDING}")) if folder.is_dir() else []


# ---- flags -------------------------------------------------------------------------------------------------------
def flags_path(project: Project) -> Path:
    return project.semiseg / "flags.json"


def flags(project: Project) -> dict[str, dict[str, Any]]:
    path = flags_path(project)
    return json.loads(path.read_text()) if path.is_file() else {}


def flag_case(project: Project, case: str, reason: str = "", user: str | None = None) -> dict[str, Any]:
    """Put ``case`` aside for a second look (kept in ``semiseg/flags.json``)."""
    if case not in project.case_ids():
        raise KeyError(f"no case '{case}'")
    record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(), "user": user or user_name(), "reason": reason}
    all_flags = flags(project)
    all_flags[case] = record
    write_json_atomic(flags_path(project), all_flags)
    return record


def unflag_case(project: Project, case: str) -> None:
    all_flags = flags(project)
    if all_flags.pop(case, None) is not None:
        write_json_atomic(flags_path(project), all_flags)


# ---- accepting a correction ---------------------------------------------------------------------------------------
def accept_correction(project: Project, case: str, label: np.ndarray, *, source: str,
                      start: np.ndarray | None = None, seconds: float = 0.0,
                      extra: dict[str, Any] | None = None, **check: Any) -> dict[str, Any]:
    """Accept the reviewer's label of ``case`` through :meth:`Project.accept` (validated, atomic, history).

    ``check`` is passed on to :meth:`Project.accept`: ``expected_version=<token>`` (the case's
    ``Project.label_version`` when the reviewer opened it) makes the write fail with ``LabelConflictError`` when
    the label changed on disk since (another viewer, the CLI).  The history record gains ``started_from`` (the
    view it was copied from, ``source``), ``voxels_edited`` (voxels the reviewer changed from that view; the
    record's own ``voxels_changed`` counts against the previous accepted label), ``seconds_spent`` on the case and
    ``accept_seconds`` (how long the write took).
    The case's draft and flag are cleared.
    """
    t0 = time.perf_counter()
    label = np.asarray(label)
    info: dict[str, Any] = {"started_from": source, "seconds_spent": round(float(seconds), 1)}
    if start is not None and start.shape == label.shape:
        info["voxels_edited"] = int(np.count_nonzero(start != label))
    info.update(extra or {})
    record = project.accept(case, label, source=source, extra=info, **check)
    discard_draft(project, case)
    unflag_case(project, case)
    record["accept_seconds"] = round(time.perf_counter() - t0, 3)
    return record
