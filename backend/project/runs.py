"""Runs on disk, in one place: trained models (``semiseg/models/<method>/<run>/``) and their pseudo labels
(``semiseg/pseudo/<method>/<run>/``), and the rule that picks the run inference uses by default.

Free of torch: the engine (which then loads the checkpoint, :func:`backend.engine.checkpoints.load_checkpoint`)
and the review dock (napari's process never imports torch) choose runs with the same functions, so they cannot
disagree.  Run names are UTC timestamps, so they sort oldest first.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from backend.errors import InputError

if TYPE_CHECKING:
    from backend.project import Project

CHECKPOINT = "checkpoint.pt"  # the last step, for resuming
BEST = "best.pt"  # the weights of the best validation so far
SCORES = "scores.json"


# ---- the default-run rule -------------------------------------------------------------------------------------
def run_best_dice(info: dict[str, Any]) -> float | None:
    """The best validation mean Dice a run reached (``run.json`` ``best``; runs written before ``best.pt``
    existed fall back to their last validation), None when it never validated."""
    best = info.get("best") or {}
    if best.get("dice") is not None:
        return float(best["dice"])
    last = info.get("last_validation") or {}
    return None if last.get("mean") is None else float(last["mean"])


def pick_best_run(candidates: Sequence[tuple[str, float | None]]) -> str | None:
    """The run with the highest best validation Dice among ``(run, best_dice)`` pairs given oldest first (ties:
    the newest); runs that never validated come last (the newest of them when no run validated); None when
    there is no run."""
    if not candidates:
        return None
    scored = [(dice, index, run) for index, (run, dice) in enumerate(candidates) if dice is not None]
    return max(scored)[2] if scored else candidates[-1][0]


# ---- trained models ---------------------------------------------------------------------------------------------
def model_runs(project: Project, method: str) -> list[str]:
    """Runs of ``method`` that hold a checkpoint, oldest first."""
    folder = project.semiseg / "models" / method
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / CHECKPOINT).is_file())


def latest_run(project: Project, method: str) -> str:
    runs = model_runs(project, method)
    if not runs:
        raise InputError(project.semiseg / "models" / method, f"no trained run of '{method}' (train it first)")
    return runs[-1]


def run_info(project: Project, method: str, run: str) -> dict[str, Any]:
    """A run's ``run.json`` ({} when missing or unreadable)."""
    return _read_run_json(project.model_dir(method, run) / "run.json")


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def best_run(project: Project, method: str) -> str | None:
    """The run of ``method`` inference uses by default (:func:`pick_best_run` over its trained runs)."""
    return pick_best_run([(r, run_best_dice(run_info(project, method, r))) for r in model_runs(project, method)])


def run_table(project: Project) -> list[dict[str, Any]]:
    """Every trained model run of every method: ``{"method", "run", "labeled_count", "best_dice",
    "has_checkpoint", ...run.json}``, oldest run first."""
    root = project.semiseg / "models"
    out = []
    if root.is_dir():
        for run_json in sorted(root.glob("*/*/run.json")):
            data = _read_run_json(run_json)
            out.append({**data, "method": run_json.parent.parent.name, "run": run_json.parent.name,
                        "labeled_count": data.get("labeled_count"), "best_dice": run_best_dice(data),
                        "has_checkpoint": (run_json.parent / CHECKPOINT).is_file()})
    return sorted(out, key=lambda r: (r["run"], r["method"]))


def best_runs(project: Project, table: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """``{method: run}``: :func:`best_run` of every method, from one :func:`run_table` (given or read)."""
    table = run_table(project) if table is None else table
    candidates: dict[str, list[tuple[str, float | None]]] = {}
    for row in sorted(table, key=lambda r: r["run"]):  # oldest first: a later run wins ties
        if row.get("has_checkpoint"):  # else still starting, or its checkpoint is gone: inference cannot use it
            candidates.setdefault(row["method"], []).append((row["run"], row["best_dice"]))
    return {method: pick_best_run(pairs) for method, pairs in candidates.items()}


def run_checkpoint(project: Project, method: str, run: str, which: str = "best") -> Path:
    """The checkpoint file of ``run`` to load: ``best.pt`` when ``which == "best"`` and the run has one, else
    ``checkpoint.pt`` (the last step)."""
    if which not in ("best", "last"):
        raise InputError(None, f"checkpoint must be 'best' or 'last' (got '{which}')")
    folder = project.model_dir(method, run)
    if which == "best" and (folder / BEST).is_file():
        return folder / BEST
    return folder / CHECKPOINT


def new_run_name(project: Project, method: str) -> str:
    """A UTC timestamp, with ``-2``, ``-3``, ... when taken; the folder is created to claim the name."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = project.semiseg / "models" / method
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        name = stamp if i == 1 else f"{stamp}-{i}"
        try:
            (base / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise RuntimeError("cannot find a free run name")


# ---- pseudo labels ----------------------------------------------------------------------------------------------
def pseudo_runs(project: Project, method: str) -> list[str]:
    """Runs of ``method`` that have pseudo labels (a ``scores.json``), oldest first."""
    folder = project.semiseg / "pseudo" / method
    return sorted(p.name for p in folder.iterdir() if (p / SCORES).is_file()) if folder.is_dir() else []


def methods_with_pseudo_labels(project: Project) -> list[str]:
    folder = project.semiseg / "pseudo"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and pseudo_runs(project, p.name))
