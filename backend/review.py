"""Review-loop logic behind the plugin's review dock (no Qt here): the review queue, the pseudo-label views of a
case, majority vote and voxel-wise disagreement of the views, drafts of unsaved corrections, flags, and accepting
a correction into the labeled set with its review history.

On disk (inside the project's ``semiseg/`` folder)::

    pseudo/<method>/<run>/<case>/<view>.nii.gz    pseudo labels (written by the engine)
    drafts/<case>.nii.gz, drafts/<case>.json      the unsaved correction of a case and what it started from
    flags.json                                    {case: {"time", "user", "reason"}}: cases put aside for a second look
    models/<method>/<run>/run.json                what a model was trained on ("labeled_count", ...)
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backend.project import FILE_ENDING, Project, _user_name, check_case_name, write_json_atomic
from backend.volume import Volume, read_volume, strip_suffix, write_volume

MAJORITY = "majority"  # the name of the majority-vote "view"


# ---- the review queue ----------------------------------------------------------------------------------------
def sort_review_queue(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unlabeled cases first, then the lowest agreement of any method first (the most doubtful case leads);
    cases without a score come after the scored ones; ties by case name."""
    def key(row: dict[str, Any]):
        means = [s["mean"] for s in row["scores"].values() if s.get("mean") is not None]
        return (bool(row["labeled"]), min(means) if means else 2.0, row["case"])
    return sorted(rows, key=key)


def latest_runs(project: Project) -> dict[str, str]:
    """``{method: latest run}`` for every method that has pseudo labels."""
    return {m: project.runs(m)[-1] for m in project.methods_with_pseudo_labels()}


def review_rows(project: Project, runs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The case table of :meth:`Project.case_table` restricted to ``runs`` (``{method: run}``; default the
    latest run of every method), plus ``flagged`` and ``draft`` columns, in review order."""
    runs = latest_runs(project) if runs is None else runs
    scores = {m: project.scores(m, r) for m, r in runs.items()}
    flagged = flags(project)
    drafts = set(list_drafts(project))
    rows = []
    for row in project.case_table():
        case = row["case"]
        row["scores"] = {}
        for method, run_scores in scores.items():
            case_scores = run_scores.get("cases", {}).get(case)
            if case_scores:
                row["scores"][method] = {"run": runs[method], "mean": case_scores.get("agreement_mean"),
                                         "worst_class": case_scores.get("agreement_worst")}
        row["flagged"] = case in flagged
        row["draft"] = case in drafts
        rows.append(row)
    return sort_review_queue(rows)


# ---- the views of a case ---------------------------------------------------------------------------------------
def pseudo_views(project: Project, case: str, runs: dict[str, str] | None = None) -> dict[str, Path]:
    """``{"<method>:<view>": path}`` of every pseudo label of ``case`` in ``runs`` (default: latest runs)."""
    check_case_name(case)
    runs = latest_runs(project) if runs is None else runs
    views: dict[str, Path] = {}
    for method, run in sorted(runs.items()):
        folder = project.pseudo_dir(method, run) / case
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{FILE_ENDING}")):
                views[f"{method}:{strip_suffix(path)}"] = path
    return views


def read_views(project: Project, case: str, runs: dict[str, str] | None = None,
               image: Volume | None = None) -> dict[str, np.ndarray]:
    """Every pseudo-label view of ``case`` as uint8 ``[z, y, x]`` arrays, each checked against the image grid
    (a view that does not fit the image is skipped, never shown misaligned)."""
    image = image if image is not None else project.read_image(case)
    out: dict[str, np.ndarray] = {}
    for name, path in pseudo_views(project, case, runs).items():
        volume = read_volume(path)
        if image.geometry_mismatch(volume) is None:
            out[name] = volume.array.astype(np.uint8, copy=False)
    return out


def majority_vote(arrays: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Voxel-wise majority of the views (uint8).  A tie goes to the lower class value, so background wins
    ties against a structure: the reviewer then adds what is doubtful rather than erasing it."""
    if not arrays:
        raise ValueError("no views to vote over")
    counts = np.zeros((num_classes,) + arrays[0].shape, dtype=np.uint8)
    for array in arrays:
        for k in range(num_classes):
            counts[k] += array == k
    return np.argmax(counts, axis=0).astype(np.uint8)


def disagreement(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """1 where the views do not all agree, 0 where they do (uint8, one value so it draws in one colour)."""
    if not arrays:
        raise ValueError("no views")
    out = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays[1:]:
        out |= array != arrays[0]
    return out.view(np.uint8)


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
    record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(), "user": user or _user_name(), "reason": reason}
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
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accept the reviewer's label of ``case`` through :meth:`Project.accept` (validated, atomic, history).

    The history record gains ``started_from`` (the view it was copied from, ``source``), ``voxels_edited``
    (voxels the reviewer changed from that view; the record's own ``voxels_changed`` counts against the
    previous accepted label), ``seconds_spent`` on the case and ``accept_seconds`` (how long the write took).
    The case's draft and flag are cleared.
    """
    t0 = time.perf_counter()
    label = np.asarray(label)
    info: dict[str, Any] = {"started_from": source, "seconds_spent": round(float(seconds), 1)}
    if start is not None and start.shape == label.shape:
        info["voxels_edited"] = int(np.count_nonzero(start != label))
    info.update(extra or {})
    record = project.accept(case, label, source=source, extra=info)
    discard_draft(project, case)
    unflag_case(project, case)
    record["accept_seconds"] = round(time.perf_counter() - t0, 3)
    return record


# ---- models -------------------------------------------------------------------------------------------------------
def model_runs(project: Project) -> list[dict[str, Any]]:
    """Every trained model run: ``{"method", "run", "labeled_count", ...run.json}``, oldest run first."""
    root = project.semiseg / "models"
    out = []
    if root.is_dir():
        for run_json in sorted(root.glob("*/*/run.json")):
            try:
                data = json.loads(run_json.read_text())
            except ValueError:
                data = {}
            out.append({**data, "method": run_json.parent.parent.name, "run": run_json.parent.name,
                        "labeled_count": data.get("labeled_count")})
    return sorted(out, key=lambda r: (r["run"], r["method"]))


def training_choices() -> dict[str, Any]:
    """What the training dock offers: ``{"methods": {name: [presets]}, "devices": [...]}``.

    This imports torch and every method; the dock calls it in a child process (``python -m backend.review``)
    so napari's own process never loads torch.  A method whose module is missing or broken is left out.
    """
    from backend.devices import available_devices
    from backend.methods import get_method, method_names

    methods: dict[str, list[str]] = {}
    for name in method_names():
        try:
            methods[name] = list(get_method(name).presets)
        except Exception:  # noqa: BLE001 - a method still being written must not hide the others
            continue
    return {"methods": methods, "devices": available_devices()}


if __name__ == "__main__":
    print(json.dumps(training_choices()))
