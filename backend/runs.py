"""Which trained run a method's inference uses by default: the rule, free of torch.

Both the engine (:func:`backend.training.best_run`, which loads the model) and the review dock (which must not
import torch in napari's process) choose runs with these two functions, so they cannot disagree.
"""
from __future__ import annotations

from typing import Any, Sequence


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
