"""Pseudo labels for the unlabeled cases from a trained run, and the agreement scores the review queue sorts by.

Output, per run (the run name is the model run's):

* ``semiseg/pseudo/<method>/<run>/<case>/<view>.nii.gz``: every view ``Method.pseudo_labels`` returns, uint8 in
  the image's exact geometry;
* ``semiseg/pseudo/<method>/<run>/scores.json``: per case, Dice agreement between every pair of views (per
  class and mean), the worst class, and each view's class volumes in ml.  Written last and atomically, so a
  run whose ``scores.json`` exists is complete; inferring a subset of cases into a run that has one merges
  the new cases into it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backend.engine.devices import pick_device
from backend.errors import InputError
from backend.engine.data import model_input, to_case_grid
from backend.methods import get_method
from backend.methods.base import Method
from backend.engine.metrics import volumes_ml
from backend.engine.scores import TTA_AXIS, case_scores, normalised_entropy
from backend.io.atomic import write_json_atomic
from backend.project import Project
from backend.engine.checkpoints import load_checkpoint
from backend.engine.devices import cpu_thread_policy
from backend.project.runs import best_run, run_checkpoint
from backend.io.volume import write_volume


def load_trained(project: Project, method: str, run: str | None = None, device: str = "auto",
                 checkpoint: str = "best") -> tuple[Method, str, dict[str, Any]]:
    """``(method instance in eval mode, run name, run.json)`` of a trained run.

    ``run`` None: the run with the best validation Dice (:func:`backend.project.runs.best_run`).  ``checkpoint``
    ``"best"`` loads the run's ``best.pt`` when it has one (else its last checkpoint), ``"last"`` the last
    checkpoint.  What was chosen is added to the returned info as ``"loaded": {"run", "chosen_by",
    "checkpoint", "step", "dice"}`` (``chosen_by``: ``"best validation"`` or ``"named"``).
    """
    cls = get_method(method)
    chosen_by = "named" if run else "best validation"
    run = run or best_run(project, method)
    if run is None:
        raise InputError(project.semiseg / "models" / method, f"no trained run of '{method}' (train it first)")
    folder = project.model_dir(method, run)
    path = run_checkpoint(project, method, run, checkpoint)
    if not path.is_file():
        raise InputError(folder, f"run '{run}' of '{method}' has no checkpoint")
    state = load_checkpoint(path)
    config = cls.config_class.from_dict(state["config"])
    model = cls(config, pick_device(device))
    model.load_state_dict(state["method"])
    model.eval()
    run_json = folder / "run.json"
    info = json.loads(run_json.read_text()) if run_json.is_file() else {}
    best = info.get("best") or {}
    which = "best" if path.name == "best.pt" else "last"
    dice = best.get("dice") if which == "best" else (info.get("last_validation") or {}).get("mean")
    info["loaded"] = {"run": run, "chosen_by": chosen_by, "checkpoint": which, "step": int(state["step"]),
                      "dice": dice}
    return model, run, info


def case_views(model: Method, project: Project, case: str) -> tuple[dict[str, np.ndarray], Any]:
    """``({view: uint8 [Z, Y, X]}, the case's image Volume)``: every review view of ``case``, computed on the
    model's preprocessing grid (``config.target_spacing``, ``config.intensity_window``) and resampled back,
    nearest neighbour, onto the case's own grid."""
    review = review_case(model, project, case, uncertainty=False)
    return review.views, review.image


@dataclasses.dataclass
class CaseReview:
    """What inference makes of one case, on the case's own grid: the views, the normalised entropy of the primary
    view's class probabilities (float32) and the primary view of the mirrored image mirrored back (the TTA label);
    the last two None when the method gives no probabilities (or ``uncertainty`` was off)."""

    views: dict[str, np.ndarray]
    image: Any
    entropy: np.ndarray | None = None
    tta_label: np.ndarray | None = None


def review_case(model: Method, project: Project, case: str, *, uncertainty: bool = True) -> CaseReview:
    """Every review view of ``case`` (see :func:`case_views`) and, with ``uncertainty``, the entropy map and the
    flip-TTA label of :mod:`backend.engine.scores` (two more passes of the primary view's network)."""
    volume, grid, image = model_input(project, case, model.config)
    with torch.inference_mode():  # no autograd bookkeeping at all (no version counters, no views tracked)
        views = model.pseudo_labels(volume)
    out = {}
    for view, array in views.items():
        if tuple(array.shape) != grid.shape:
            raise RuntimeError(f"{model.name}: view '{view}' has shape {array.shape}, the volume {grid.shape}")
        out[view] = np.ascontiguousarray(to_case_grid(array, grid, image), dtype=np.uint8)
    review = CaseReview(out, image)
    if uncertainty:
        with torch.inference_mode():
            prob = model.primary_probabilities(volume)
            if prob is not None:
                entropy = normalised_entropy(prob).cpu().numpy().astype(np.float32)
                review.entropy = to_case_grid(entropy, grid, image, nearest_float=True)
                mirrored = model.primary_probabilities(volume.flip(TTA_AXIS)).flip(TTA_AXIS)
                tta = mirrored.argmax(0).to(torch.uint8).cpu().numpy()
                review.tta_label = np.ascontiguousarray(to_case_grid(tta, grid, image), dtype=np.uint8)
    return review


def cross_method_pairs(project: Project, method: str, case: str, primary: np.ndarray, image: Any) -> dict[str, float]:
    """``{"<other method>:<run>": Dice}`` of ``primary`` (this method's primary view of ``case``) against the
    primary view of every other method's every run with pseudo labels of ``case`` (the review queue averages the
    pairs of the runs it shows: :mod:`backend.engine.scores`, ``cross``)."""
    from backend.engine.scores import mean_dice
    from backend.io.volume import read_volume
    from backend.project.runs import methods_with_pseudo_labels, pseudo_runs

    out: dict[str, float] = {}
    for other in methods_with_pseudo_labels(project):
        if other == method:
            continue
        for run in pseudo_runs(project, other):
            view = project.scores(other, run).get("primary_view") or get_method(other).primary_view
            path = project.pseudo_dir(other, run) / case / f"{view}.nii.gz"
            if path.is_file():
                label = read_volume(path)
                if image.geometry_mismatch(label) is None:
                    out[f"{other}:{run}"] = round(mean_dice(primary, label.array, project.num_classes), 6)
    return out


def infer(project: Project | str | Path, method: str, *, run: str | None = None, device: str = "auto",
          cases: list[str] | None = None, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, checkpoint: str = "best") -> str:
    """Write pseudo labels and ``scores.json`` for every unlabeled case (or ``cases``); return the run name.

    The model: ``run`` (default: the run with the best validation Dice) at its best checkpoint (``checkpoint=
    "last"``: its last one); see :func:`load_trained`.  The ``start`` event and ``scores.json`` say which
    (``"model": {"run", "chosen_by", "checkpoint", "step", "dice"}``).
    Events: ``start``, one ``progress`` per case (``step``/``total``/``case``/``seconds``/``eta_s``), then ``done``
    (or ``cancelled`` when ``should_stop`` returns True between cases: nothing of the unfinished run is scored).
    """
    project = project if isinstance(project, Project) else Project.open(project)
    model, run, info = load_trained(project, method, run, device, checkpoint)
    with cpu_thread_policy(model.device):  # the training's thread policy (see backend.engine.training)
        return _infer(project, method, model, run, info, cases, on_event, should_stop)


def _infer(project: Project, method: str, model: Method, run: str, info: dict[str, Any], cases: list[str] | None,
           on_event: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None) -> str:
    emit = on_event or (lambda event: None)
    todo = list(cases) if cases is not None else project.unlabeled_cases()
    known = set(project.case_ids())
    unknown = [c for c in todo if c not in known]
    if unknown:
        raise InputError(project.root, f"no case {', '.join(unknown)} in the project")
    out_dir = project.pseudo_dir(method, run)
    labels = project.labels
    num_classes = model.config.num_classes
    emit({"type": "start", "method": method, "run": run, "total": len(todo), "cases": todo,
          "device": str(model.device), "model": info["loaded"]})

    results: dict[str, Any] = {}
    started = time.perf_counter()
    for i, case in enumerate(todo):
        if should_stop is not None and should_stop():
            emit({"type": "cancelled", "step": i, "run": run})
            return run
        tic = time.perf_counter()
        review = review_case(model, project, case)
        views, image = review.views, review.image
        for view, array in views.items():
            write_volume(image.like(np.ascontiguousarray(array, dtype=np.uint8)), out_dir / case / f"{view}.nii.gz")
        scores = case_scores(views, model.primary_view, num_classes, entropy=review.entropy,
                             tta_label=review.tta_label, labels=labels)
        scores["cross_agreement"] = cross_method_pairs(project, method, case, views[model.primary_view], image)
        scores["volume_ml"] = {v: volumes_ml(a, num_classes, image.spacing, labels) for v, a in views.items()}
        results[case] = scores
        seconds = time.perf_counter() - tic
        per_case = (time.perf_counter() - started) / (i + 1)
        emit({"type": "progress", "step": i + 1, "total": len(todo), "case": case, "seconds": round(seconds, 3),
              "eta_s": round(per_case * (len(todo) - i - 1), 1), "agreement_mean": scores["agreement_mean"]})

    scores_path = out_dir / "scores.json"
    previous = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    merged = dict(previous.get("cases", {})) if cases is not None else {}
    merged.update(results)
    write_json_atomic(scores_path, {
        "method": method,
        "run": run,
        "views": list(model.views),
        "primary_view": model.primary_view,
        "labels": {str(k): v for k, v in labels.items() if k != 0},
        "labeled_count": int(info.get("labeled_count", len(project.labeled_cases()))),
        "model": info["loaded"],
        "cases": merged,
    })
    emit({"type": "done", "run": run, "step": len(todo), "path": str(scores_path)})
    return run
