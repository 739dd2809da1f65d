"""Review-loop logic behind the plugin's review dock (no Qt here): the review queue, the pseudo-label views of a
case, majority vote and voxel-wise disagreement of the views, drafts of unsaved corrections, flags, and accepting
a correction into the labeled set with its review history.

On disk (inside the project's ``semiseg/`` folder)::

    pseudo/<method>/<run>/<case>/<view>.nii.gz    pseudo labels (written by the engine)
    drafts/<case>.nii.gz, drafts/<case>.json      the unsaved correction of a case and what it started from
    flags.json                                    {case: {"time", "user", "reason"}}: cases put aside for a second look
    models/<method>/<run>/run.json                what a model was trained on ("labeled_count", "best", ...)

Before a label is accepted the dock asks :func:`accept_warnings` whether it needs a confirmation (empty, or a class
the views or the accepted label have is gone), and :func:`slice_profile` gives the per-slice disagreement the
clinician jumps through, worst slice first.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backend.project import FILE_ENDING, Project, _user_name, check_case_name, write_json_atomic
from backend.runs import pick_best_run, run_best_dice
from backend.volume import Volume, read_volume, strip_suffix, write_volume

MAJORITY = "majority"  # the name of the majority-vote "view"
ALL_METHODS = "all methods"  # the disagreement of every view of every method


# ---- the review queue ----------------------------------------------------------------------------------------
def sort_review_queue(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unlabeled cases first, then the lowest agreement of any method first (the most doubtful case leads);
    cases without a score come after the scored ones; ties by case name."""
    def key(row: dict[str, Any]):
        means = [s["mean"] for s in row["scores"].values() if s.get("mean") is not None]
        return (bool(row["labeled"]), min(means) if means else 2.0, row["case"])
    return sorted(rows, key=key)


def default_runs(project: Project) -> dict[str, str]:
    """``{method: run}`` whose pseudo labels the review shows by default, for every method that has pseudo labels:
    the run inference uses by default (the best by validation, :func:`best_runs`) when it has pseudo labels, else
    the newest run with pseudo labels.  So a newer, worse model's pseudo labels never replace a better one's in the
    review queue."""
    best = best_runs(project)
    out = {}
    for method in project.methods_with_pseudo_labels():
        runs = project.runs(method)
        out[method] = best[method] if best.get(method) in runs else runs[-1]
    return out


def review_rows(project: Project, runs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The case table of :meth:`Project.case_table` restricted to ``runs`` (``{method: run}``; default
    :func:`default_runs`, each method's best run), plus ``flagged`` and ``draft`` columns, in review order."""
    runs = default_runs(project) if runs is None else runs
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
    """``{"<method>:<view>": path}`` of every pseudo label of ``case`` in ``runs`` (default: :func:`default_runs`)."""
    check_case_name(case)
    runs = default_runs(project) if runs is None else runs
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


def view_method(view: str) -> str:
    """The method of a ``<method>:<view>`` name."""
    return view.split(":", 1)[0]


def disagreement_by_method(views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{method: where that method's own views differ}`` for every method with two or more views, plus
    :data:`ALL_METHODS` (every view of every method) when more than one method has views.  One method's
    disagreement says how unsure that method is; mixing methods mostly shows how they differ."""
    by_method: dict[str, list[np.ndarray]] = {}
    for name, array in views.items():
        by_method.setdefault(view_method(name), []).append(array)
    out = {m: disagreement(arrays) for m, arrays in by_method.items() if len(arrays) > 1}
    if len(by_method) > 1:
        out[ALL_METHODS] = disagreement(list(views.values()))
    return out


def slice_profile(mask: np.ndarray) -> np.ndarray:
    """Voxels set in ``mask`` per axial slice (axis 0 of ``[z, y, x]``), int64, one entry per slice."""
    mask = np.asarray(mask)
    return np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1).astype(np.int64)


def worst_slice(profile: Sequence[int] | np.ndarray) -> int | None:
    """The slice with the most disagreement (the lowest index on ties), None when the views agree everywhere."""
    profile = np.asarray(profile)
    if profile.size == 0 or not profile.any():
        return None
    return int(np.argmax(profile))


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


# ---- models -------------------------------------------------------------------------------------------------------
def model_runs(project: Project) -> list[dict[str, Any]]:
    """Every trained model run: ``{"method", "run", "labeled_count", "best_dice", "has_checkpoint",
    ...run.json}``, oldest run first."""
    root = project.semiseg / "models"
    out = []
    if root.is_dir():
        for run_json in sorted(root.glob("*/*/run.json")):
            try:
                data = json.loads(run_json.read_text())
            except ValueError:
                data = {}
            out.append({**data, "method": run_json.parent.parent.name, "run": run_json.parent.name,
                        "labeled_count": data.get("labeled_count"), "best_dice": run_best_dice(data),
                        "has_checkpoint": (run_json.parent / "checkpoint.pt").is_file()})
    return sorted(out, key=lambda r: (r["run"], r["method"]))


def best_runs(project: Project, runs: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """``{method: run}``: the run inference uses by default, the one with the highest best validation Dice
    (ties: the newest; the newest run when none validated): :func:`backend.runs.pick_best_run`, the rule of
    ``backend.training.best_run``, read from ``run.json`` files only, so napari's process never imports torch."""
    runs = model_runs(project) if runs is None else runs
    candidates: dict[str, list[tuple[str, float | None]]] = {}
    for run in sorted(runs, key=lambda r: r["run"]):  # oldest first: a later run wins ties
        if run.get("has_checkpoint"):  # else still starting, or its checkpoint is gone: inference cannot use it
            candidates.setdefault(run["method"], []).append((run["run"], run["best_dice"]))
    return {method: pick_best_run(pairs) for method, pairs in candidates.items()}


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
