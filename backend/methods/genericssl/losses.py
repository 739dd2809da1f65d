"""A&D's losses: L_DiceCE (eq. 2, 6, 8) and the Difficulty-aware Re-weighting Strategy (DRS, eq. 3-5).

``L_DiceCE(p, y) = lambda_ce L_CE + lambda_dice L_Dice``.  The paper defines it as ``(L_CE + L_Dice) / 2`` (eq. 2);
the published code sums the two terms (``DC_and_CE_loss``, weights 1 and 1), which doubles every loss and so the
effective learning rate: :class:`backend.methods.genericssl.method.GenericSSLConfig` takes the published scale (1, 1) by
default, and ``lambda_ce = lambda_dice = 0.5`` gives the paper's.  Where the paper is silent, the published code's
choices: the Dice term is a batch Dice (MONAI ``DiceLoss(batch=True)``) over the foreground classes, and the
class weights of eq. 6 weight both the cross entropy (PyTorch's weighted mean) and the per-class Dice terms.  The
published Dice loss is ``-Dice`` with smoothing 1, MONAI's is ``1 - Dice`` with smoothing 1e-5: a constant offset
(same gradients) and a smoothing that is negligible on batch sums over whole patches.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice


def dice_ce(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
            lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = False) -> torch.Tensor:
    """``lambda_ce * CE + lambda_dice * Dice`` for logits ``[B, K, ...]`` and an integer label ``[B, 1, ...]``.

    With ``class_weights`` (``[K]``, eq. 6): ``CE`` is the class-weighted cross entropy and ``Dice`` is
    ``1/K' sum_k w_k Dice_k`` over the ``K'`` classes the Dice covers.
    """
    logits = logits.float()
    dice_fn = DiceLoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=True,
                       reduction="none")
    per_class = dice_fn(logits, target).flatten()  # [K'] (foreground only unless include_background)
    if class_weights is not None:
        w = class_weights.to(logits.device, torch.float32)
        per_class = per_class * (w if include_background else w[1:])
    ce = F.cross_entropy(logits, target[:, 0].long(), weight=None if class_weights is None else
                         class_weights.to(logits.device, torch.float32))
    return lambda_ce * ce + lambda_dice * per_class.mean()


def hard_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, absent: float = 0.5
              ) -> torch.Tensor:
    """Per-class Dice ``[K]`` of ``argmax(logits)`` against ``target`` over the whole batch (background included),
    clamped to ``[eps, 1]``.

    A class absent from both prediction and target scores ``absent`` (0.5): the published DRS measures Dice with
    ``SoftDiceLoss(smooth=1e-8)``, whose ``(2 tp + 1e-8) / (2 tp + fp + fn + 1e-8 + 1e-8)`` is 1/2 for such a
    class; a class predicted but absent from the target scores 0 (then ``eps``), as there.
    """
    k = logits.shape[1]
    pred = F.one_hot(logits.argmax(1), k).movedim(-1, 1).float()
    true = F.one_hot(target[:, 0].long(), k).movedim(-1, 1).float()
    # fold the batch into the first spatial axis: one Dice per class over the whole batch
    fold = lambda t: t.movedim(0, 1).reshape(1, k, -1, *t.shape[3:])  # noqa: E731
    dice = compute_dice(fold(pred), fold(true), include_background=True, ignore_empty=True)[0]
    predicted = pred.sum(dim=(0, *range(2, pred.ndim))) > 0
    empty = torch.where(predicted, torch.zeros_like(dice), torch.full_like(dice, absent))
    return torch.where(torch.isnan(dice), empty, dice).clamp(eps, 1.0)


class DifficultyWeights:
    """DRS class weights ``w_k = w_lambda_k * d_k ** alpha`` (eq. 3-5), updated once per iteration.

    ``lambda_k`` is the Dice of ``D(xi)``'s prediction on the labeled batch.  With ``Delta = lambda_e - lambda_{e-1}``
    and ``r = ln(lambda_e / lambda_{e-1})`` (the Population Stability Index term), each iteration adds
    ``max(Delta, 0) r`` to "learned" and ``min(Delta, 0) r`` to "not learned" (both >= 0); over the last ``tau``
    iterations ``d_k = du_k / dl_k`` (eq. 4).  ``w_lambda_k`` accumulates ``1 - lambda_k`` over the same window.

    Choices where the paper is silent: ``mode="ema"`` (default, the published code) accumulates with a running
    average of momentum ``(tau - 1) / tau``; ``mode="window"`` keeps the exact last-``tau`` sums of eq. 3.  In both,
    ``w_lambda`` is the average (not the sum) of ``1 - lambda`` (a sum only rescales every class by ``tau``), and
    weights are multiplied by ``K`` (as published) so that ``1/K sum_k w_k L_k`` of eq. 6 keeps the scale of an
    unweighted loss.  As published, the Dice before the first iteration is taken as ``eps``: the first iteration
    then counts as fast learning for every class, which damps ``d_k`` (and keeps the ratio of eq. 4 away from
    ``eps``-sized denominators) while the statistics fill up; in window mode this entry leaves after ``tau``
    iterations, in EMA mode it decays.
    """

    def __init__(self, num_classes: int, tau: int = 50, alpha: float = 0.2, mode: str = "ema",
                 eps: float = 1e-8, device: torch.device | str = "cpu"):
        if mode not in ("window", "ema"):
            raise ValueError(f"unknown DRS mode '{mode}' (window, ema)")
        self.num_classes, self.tau, self.alpha, self.mode, self.eps = num_classes, tau, alpha, mode, eps
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        k, dev = self.num_classes, self.device
        self.last_dice = torch.full((k,), self.eps, device=dev)
        self.count = 0  # iterations recorded
        if self.mode == "window":
            self.learn = torch.zeros(self.tau, k, device=dev)
            self.unlearn = torch.zeros(self.tau, k, device=dev)
            self.reverse = torch.zeros(self.tau, k, device=dev)
        else:
            self.learn = torch.zeros(k, device=dev)
            self.unlearn = torch.zeros(k, device=dev)
            self.reverse = torch.ones(k, device=dev)
        self.weights = torch.ones(k, device=dev)

    @torch.no_grad()
    def update(self, dice: torch.Tensor) -> torch.Tensor:
        """Record this iteration's per-class Dice ``[K]`` and return the new weights ``[K]``."""
        dice = dice.detach().to(self.device, torch.float32).clamp(self.eps, 1.0)
        delta = dice - self.last_dice
        log_ratio = torch.log(dice / self.last_dice)
        learn = delta.clamp_min(0) * log_ratio  # max(Delta, 0) ln(lambda_e / lambda_e-1) >= 0
        unlearn = delta.clamp_max(0) * log_ratio  # min(Delta, 0) ln(...) >= 0
        self.last_dice = dice
        if self.mode == "window":
            slot = self.count % self.tau
            self.learn[slot], self.unlearn[slot], self.reverse[slot] = learn, unlearn, 1.0 - dice
            dl, du = self.learn.sum(0), self.unlearn.sum(0)  # empty slots hold zeros
            w_lambda = self.reverse[:min(self.count + 1, self.tau)].mean(0)
        else:
            m = (self.tau - 1) / self.tau
            self.learn.mul_(m).add_((1 - m) * learn)
            self.unlearn.mul_(m).add_((1 - m) * unlearn)
            self.reverse.mul_(m).add_((1 - m) * (1.0 - dice))
            dl, du, w_lambda = self.learn, self.unlearn, self.reverse
        self.count += 1
        difficulty = (du + self.eps) / (dl + self.eps)  # eq. 4
        self.weights = w_lambda * difficulty.pow(self.alpha) * self.num_classes  # eq. 5
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        copy = {k: getattr(self, k).detach().cpu().clone() for k in ("learn", "unlearn", "reverse", "weights",
                                                                       "last_dice")}
        return {"mode": self.mode, "count": self.count, **copy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode or state["learn"].shape != self.learn.shape:
            self.reset()  # a different DRS configuration: start afresh rather than mix incompatible windows
            return
        self.count = int(state["count"])
        self.learn, self.unlearn, self.reverse, self.weights, self.last_dice = (
            state[k].to(self.device).clone() for k in ("learn", "unlearn", "reverse", "weights", "last_dice"))
