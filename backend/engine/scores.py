"""Review scores that try to predict the error of a pseudo label, per case and per slab of slices.

Every score is oriented "higher = more trustworthy" and lies in [0, 1], so the review queue sorts each one the
same way (lowest first = most doubtful first):

* ``mean`` (own-view agreement, :func:`backend.engine.metrics.agreement`): the mean Dice between every pair of one
  method's views.  It cannot see an error every view of one model shares.
* ``cross`` (cross-method agreement): the mean Dice of this method's primary view against every other method's
  primary view of the same case (the ensemble the dock shows).  Independent models rarely share an error.
* ``tta`` (test-time-augmentation agreement): the Dice of the primary view against the primary view of the image
  mirrored left-right, mirrored back (flip TTA; MONAI Label's epistemic / TTA scoring is the anchor: disagreement
  of the predictions under perturbation).
* ``confidence`` (1 - softmax entropy): one minus the mean normalised entropy ``-sum p log p / log K`` of the
  primary view's class probabilities over the voxels it labels as a structure (a mean over the whole volume is
  dominated by confident background).

Dice: mean over foreground classes (:func:`backend.engine.metrics.dice_per_class`).  The slab versions
(:func:`slab_scores`) compute the same quantities on ``arrays[z0:z1]``: the benchmark (``bench/review_loop.py``)
measures each score's rank correlation with the true Dice per slab.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from backend.engine.metrics import agreement, dice_per_class

SCORES = ("mean", "cross", "tta", "confidence")  # the keys the review queue knows (backend.review.queue)
TTA_AXIS = -1  # x of [C, Z, Y, X]: the left-right mirror (the sample volumes are RAS; brains are near symmetric)


def mean_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of two label arrays (1.0 when neither has any foreground class, see metrics)."""
    dice = dice_per_class(a, b, num_classes)
    return float(dice.mean()) if dice.size else 1.0


def normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """``-sum_k p_k log p_k / log K`` of ``[K, ...]`` class probabilities: 0 when sure, 1 when uniform."""
    k = prob.shape[0]
    p = prob.float().clamp_min(1e-12)
    return -(p * p.log()).sum(0) / float(np.log(k)) if k > 1 else torch.zeros_like(p[0])


def confidence(entropy: np.ndarray, label: np.ndarray) -> float | None:
    """``1 - mean entropy`` over the voxels ``label`` marks as a structure; None when it marks none."""
    inside = np.asarray(label) > 0
    if not inside.any():
        return None
    return float(1.0 - np.asarray(entropy, dtype=np.float64)[inside].mean())


def cross_agreement(primary: np.ndarray, others: Sequence[np.ndarray], num_classes: int) -> float | None:
    """Mean Dice of ``primary`` against each of ``others`` (other methods' primary views); None without others."""
    if not others:
        return None
    return float(np.mean([mean_dice(primary, o, num_classes) for o in others]))


def case_scores(views: dict[str, np.ndarray], primary_view: str, num_classes: int, *,
                entropy: np.ndarray | None = None, tta_label: np.ndarray | None = None,
                labels: dict[int, str] | None = None) -> dict:
    """Every per-case score of one method's review of one case (what ``scores.json`` keeps per case):
    the own-view agreement of :func:`backend.engine.metrics.agreement` plus ``tta_agreement`` and ``confidence``
    (None when the method gives no class probabilities)."""
    out = agreement(views, num_classes, labels)
    primary = views[primary_view]
    out["tta_agreement"] = None if tta_label is None else round(mean_dice(primary, tta_label, num_classes), 6)
    conf = None if entropy is None else confidence(entropy, primary)
    out["confidence"] = None if conf is None else round(conf, 6)
    return out


def slabs(depth: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ``(z0, z1)`` ranges covering ``range(depth)`` as evenly as possible."""
    edges = np.linspace(0, depth, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def slab_scores(views: dict[str, np.ndarray], primary_view: str, num_classes: int, z0: int, z1: int, *,
                entropy: np.ndarray | None = None, tta_label: np.ndarray | None = None,
                others: Sequence[np.ndarray] = ()) -> dict[str, float | None]:
    """Every score (:data:`SCORES`) of axial slices ``z0:z1`` of one case."""
    part = {v: a[z0:z1] for v, a in views.items()}
    s = case_scores(part, primary_view, num_classes,
                    entropy=None if entropy is None else entropy[z0:z1],
                    tta_label=None if tta_label is None else tta_label[z0:z1])
    return {"mean": s["agreement_mean"], "tta": s["tta_agreement"], "confidence": s["confidence"],
            "cross": cross_agreement(part[primary_view], [o[z0:z1] for o in others], num_classes)}
