"""Label information propagation by contrastive learning (Diff-CL Sec. 4.3, eq. 11-15) and its memory bank."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class ClassMemoryBank:
    """Per-class FIFO queues of L2-normalised feature vectors: the memory bank (MB) of Sec. 4.3.

    The paper stores the projected DS features of labeled voxels that DS predicts correctly, without giving a
    size; each class keeps the ``size`` most recent vectors.  State is three tensors (for checkpoints).
    """

    def __init__(self, num_classes: int, size: int, dim: int, device: torch.device | str = "cpu"):
        self.features = torch.zeros(num_classes, size, dim, device=device)
        self.ptr = torch.zeros(num_classes, dtype=torch.long)
        self.count = torch.zeros(num_classes, dtype=torch.long)

    @property
    def size(self) -> int:
        return self.features.shape[1]

    @torch.no_grad()
    def push(self, cls: int, feats: torch.Tensor) -> None:
        """Append ``[m, dim]`` vectors to class ``cls`` (normalised here), overwriting the oldest when full."""
        if feats.numel() == 0:
            return
        feats = F.normalize(feats.detach().float(), dim=1)[-self.size:]
        m = feats.shape[0]
        slots = (int(self.ptr[cls]) + torch.arange(m)) % self.size
        self.features[cls, slots.to(self.features.device)] = feats.to(self.features.device)
        self.ptr[cls] = (int(self.ptr[cls]) + m) % self.size
        self.count[cls] = min(self.size, int(self.count[cls]) + m)

    def sample(self, cls: int, p: int) -> torch.Tensor:
        """Up to ``p`` stored vectors of class ``cls``, drawn without replacement: ``a^gamma`` of Table 1."""
        n = int(self.count[cls])
        idx = torch.randperm(n)[:p].to(self.features.device)
        return self.features[cls, idx]

    def state(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.detach().cpu().clone(), "ptr": self.ptr.clone(),
                "count": self.count.clone()}

    def load(self, state: dict[str, Any]) -> None:
        feats = torch.as_tensor(state["features"])
        if feats.shape != self.features.shape:
            raise ValueError(f"memory bank shape {tuple(feats.shape)} does not match {tuple(self.features.shape)}")
        self.features.copy_(feats.to(self.features.device))
        self.ptr.copy_(torch.as_tensor(state["ptr"]))
        self.count.copy_(torch.as_tensor(state["count"]))


def select_pairs(anchors: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the top-k most similar (eq. 12) and least similar (eq. 13) candidates to one class's anchors.

    ``anchors [p, r]`` and ``candidates [q, r]`` are L2-normalised.  The score of ``b_j`` is
    ``sum_i cos(b_j, a_i)`` (eq. 12); eq. 13's ``sum_i (1 - cos(b_j, a_i)) = p - score`` is largest where the score
    is smallest.  ``k`` is clipped to ``q // 2`` so that positives and negatives never share a voxel.
    """
    score = (anchors @ candidates.t()).sum(0)
    k = max(1, min(k, candidates.shape[0] // 2))
    return score.topk(k).indices, (-score).topk(k).indices


def label_propagation_loss(anchors: list[torch.Tensor], candidates: torch.Tensor, k: int, tau: float,
                           reduction: str = "sum") -> torch.Tensor:
    """``L_cl`` of eq. 15 from per-class anchors ``a^gamma`` (``[p_gamma, r]`` each, from the memory bank) and
    unlabeled features ``b`` (``[q, r]``, from CS through the projection head).

    For class gamma, positives ``b^{gamma,P}`` and negatives ``b^{gamma,N}`` are chosen by :func:`select_pairs`;
    each (anchor a_i, positive b_j) pair costs eq. 14::

        -log( e^{cos(a_i,b_j)/tau} / (e^{cos(a_i,b_j)/tau} + sum_{b_alpha in b^{gamma,N}} e^{cos(a_i,b_alpha)/tau}) )

    Eq. 15 sums these over classes, anchors and positives: ``reduction="sum"`` (the default) is eq. 15;
    ``"mean"`` divides that sum by the number of terms, so that eta does not depend on p and k (Diff-CL's
    config uses it; see :mod:`backend.methods.diffcl.method` for the measurements behind that).  The sum's
    scale: a term is log(1 + k) when all cosines are equal, so at initialisation the sum is ~C p k log(1 + k)
    and it falls as the classes separate.  Measured with random unit features (C = 2, tau = 0.1):
    p = k = 64, q = 1024 (the paper presets' chosen sizes): 34650 (mean 4.2), 297 once the candidates sit near
    their class's anchors (cosine spread 0.1); times Table 2's eta that is 24000 / 208 for LA 4/76 (0.7), 243 / 2
    for Pancreas 6/56 (0.007), 10 / 0.09 for Pancreas 12/50 (0.0003), beside Dice + CE terms of ~1.  The tiny
    test preset (p = k = 8, q = 64): 164.  Classes without anchors are skipped; with none at all the loss is zero
    (still differentiable w.r.t. ``candidates``).  Cosine similarity (eq. 11) is the dot product of normalised
    vectors.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction '{reduction}'")
    b = F.normalize(candidates.float(), dim=1)
    total = b.sum() * 0.0
    terms = 0
    for a in anchors:
        if a.shape[0] == 0 or b.shape[0] < 2:
            continue
        a = F.normalize(a.float(), dim=1)
        sim = a @ b.t() / tau                                                 # [p, q]
        pos, neg = select_pairs(a, b, k)
        s_pos = sim[:, pos]                                                  # [p, k]
        neg_lse = torch.logsumexp(sim[:, neg], dim=1, keepdim=True)          # [p, 1]
        total = total + (torch.logaddexp(s_pos, neg_lse) - s_pos).sum()
        terms += s_pos.numel()
    if reduction == "mean" and terms:
        total = total / terms
    return total


def sample_voxels(features: torch.Tensor, count: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Up to ``count`` random voxel feature vectors ``[m, C]`` from ``features [B, C, *spatial]``, among the voxels
    where ``mask [B, *spatial]`` is True (all voxels when None)."""
    flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    if mask is None:
        idx = torch.randperm(flat.shape[0], device=flat.device)[:count]
    else:
        candidates = mask.reshape(-1).nonzero().squeeze(1)
        idx = candidates[torch.randperm(candidates.numel(), device=flat.device)[:count]]
    return flat[idx]
