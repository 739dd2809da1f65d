"""Segmentation metrics on label volumes, all computed by MONAI.

Inputs are integer label arrays ``[Z, Y, X]`` (class index per voxel); spacing is ``(z, y, x)`` in mm, i.e. the
array axes' order (``Volume.spacing`` is ``(x, y, z)``: pass ``volume.spacing[::-1]``).

Conventions where a class is absent:

* Dice and Jaccard: a class empty in both volumes scores 1.0 (nothing to find, nothing found); empty in one
  only scores 0.0 (MONAI's ``ignore_empty=False``).
* HD95 and ASD: 0.0 when empty in both, ``None`` when empty in exactly one (the distance is undefined; MONAI
  would return inf/nan with a warning).
"""
from __future__ import annotations

import warnings
from itertools import combinations
from typing import Any, Sequence

import numpy as np
import torch


def _as_batch(label: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[Z, Y, X]`` labels to a ``[1, 1, Z, Y, X]`` uint8/int tensor (no one-hot: MONAI compares per class)."""
    t = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if t.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        t = t.to(torch.int64)
    return t[None, None]


def dice_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of every foreground class ``1 .. num_classes - 1`` (float64 array), MONAI ``compute_dice``."""
    from monai.metrics import compute_dice

    p, r = _as_batch(pred), _as_batch(ref)
    if p.shape != r.shape:
        raise ValueError(f"shapes differ: {tuple(p.shape[2:])} vs {tuple(r.shape[2:])}")
    if num_classes < 2:
        return np.zeros(0)
    dice = compute_dice(p, r, include_background=False, ignore_empty=False, num_classes=num_classes)
    return dice[0].double().cpu().numpy()


def _one_hot_class(label: torch.Tensor, k: int) -> torch.Tensor:
    return (label == k)


def jaccard_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Jaccard (IoU) of every foreground class, MONAI ``compute_iou`` (one class at a time: no full one-hot)."""
    from monai.metrics import compute_iou

    p, r = _as_batch(pred), _as_batch(ref)
    out = []
    for k in range(1, num_classes):
        out.append(float(compute_iou(_one_hot_class(p, k).float(), _one_hot_class(r, k).float(),
                                     include_background=True, ignore_empty=False)[0, 0]))
    return np.asarray(out, dtype=np.float64)


def _distance(kind: str, pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float]) -> float | None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 0.0
    if has_p != has_r:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "hd95":
            value = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=list(spacing))
        else:
            value = compute_average_surface_distance(pred, ref, include_background=True, symmetric=True,
                                                     spacing=list(spacing))
    value = float(value.reshape(-1)[0])
    return value if np.isfinite(value) else None


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing_zyx: Sequence[float],
                         labels: dict[int, str] | None = None) -> dict[str, Any]:
    """Dice, Jaccard, HD95 (mm) and ASD (mm, symmetric) of every foreground class, plus their means.

    Returns ``{"dice": {cls: v}, "jaccard": {...}, "hd95": {...}, "asd": {...}, "mean": {metric: v}}`` where
    ``cls`` is the class name from ``labels`` (or the class index as a string).  Means skip ``None`` values
    (and are ``None`` when every class is undefined).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    names = [(labels or {}).get(k, str(k)) for k in range(1, num_classes)]
    dice = dice_per_class(pred, ref, num_classes)
    jacc = jaccard_per_class(pred, ref, num_classes)
    p, r = _as_batch(pred), _as_batch(ref)
    hd95, asd = [], []
    for k in range(1, num_classes):
        pk, rk = _one_hot_class(p, k), _one_hot_class(r, k)
        hd95.append(_distance("hd95", pk, rk, spacing_zyx))
        asd.append(_distance("asd", pk, rk, spacing_zyx))

    def mean(values):
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    result: dict[str, Any] = {
        "dice": dict(zip(names, map(float, dice))),
        "jaccard": dict(zip(names, map(float, jacc))),
        "hd95": dict(zip(names, hd95)),
        "asd": dict(zip(names, asd)),
    }
    result["mean"] = {key: mean(result[key].values()) for key in ("dice", "jaccard", "hd95", "asd")}
    return result


def agreement(views: dict[str, np.ndarray], num_classes: int, labels: dict[int, str] | None = None
              ) -> dict[str, Any]:
    """Dice agreement between every pair of pseudo-label views of one case (the review queue's score).

    Returns ``{"agreement": {"A|B": {"per_class": {name: dice}, "mean": m}}, "agreement_mean": mean of the pair
    means, "agreement_worst": min over pairs and classes}``; both summaries are ``None`` for a single view.
    """
    names = [(labels or {}).get(k, str(k)) for k in range(1, num_classes)]
    pairs: dict[str, Any] = {}
    worst: float | None = None
    for a, b in combinations(list(views), 2):
        dice = dice_per_class(views[a], views[b], num_classes)
        per_class = dict(zip(names, (round(float(d), 6) for d in dice)))
        pairs[f"{a}|{b}"] = {"per_class": per_class, "mean": round(float(dice.mean()), 6) if dice.size else 1.0}
        if dice.size:
            worst = float(dice.min()) if worst is None else min(worst, float(dice.min()))
    means = [p["mean"] for p in pairs.values()]
    return {
        "agreement": pairs,
        "agreement_mean": round(float(np.mean(means)), 6) if means else None,
        "agreement_worst": None if worst is None else round(worst, 6),
    }


def volumes_ml(label: np.ndarray, num_classes: int, spacing: Sequence[float],
               labels: dict[int, str] | None = None) -> dict[str, float]:
    """Volume of every foreground class in millilitres (voxel count x voxel volume / 1000)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=num_classes)
    return {(labels or {}).get(k, str(k)): round(float(counts[k]) * voxel_ml, 4) for k in range(1, num_classes)}
