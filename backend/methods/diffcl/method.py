"""Diff-CL: the method (one training step, the review views, inference); the paper, its equations and every deviation are in :mod:`backend.methods.diffcl`."""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from backend.methods.base import BaseConfig, Method, argmax_uint8
from backend.methods.schedules import gaussian_warmup
from backend.methods.diffcl.contrast import ClassMemoryBank, label_propagation_loss, sample_voxels
from backend.methods.diffcl.nets import CSNet, DSNet, ProjectionHead
from backend.methods.layers.diffusion import ddim_sample, from_signed, make_schedulers, q_sample, sample_timesteps, to_signed
from backend.methods.diffcl.config import PRESETS, DiffCLConfig


class DiffCL(Method):
    """Diff-CL on 3D patches: CS + DS V-Nets, HFM in CS, contrastive label propagation through a memory bank."""

    name: ClassVar[str] = "diffcl"
    dims: ClassVar[int] = 3
    config_class: ClassVar[type[BaseConfig]] = DiffCLConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    views: ClassVar[tuple[str, ...]] = ("cs", "ds")
    primary_view: ClassVar[str] = "cs"

    def __init__(self, config: DiffCLConfig, device: torch.device | str = "cpu"):
        super().__init__(config, device)
        c = config
        if any(s % 16 for s in c.patch_size):
            raise ValueError(f"Diff-CL's V-Nets need patch sizes divisible by 16, got {tuple(c.patch_size)}")
        self.cs = self.to_device(CSNet(
            c.in_channels, c.num_classes, c.features, c.norm, c.dropout, c.use_hfm, c.hf_threshold, c.hfm_d_state,
            c.hfm_d_conv, c.hfm_expand, c.hfm_mlp_ratio, c.scan_backend, c.scan_chunk or None, c.hfm_levels))
        self.ds = self.to_device(DSNet(c.in_channels, c.num_classes, c.features, c.norm, c.dropout,
                                       c.time_embed_dim))
        self.head = self.to_device(ProjectionHead(c.features, c.proj_dim))
        self.ddpm, self.ddim = make_schedulers(c.diffusion_steps, c.noise_schedule)
        self.bank = ClassMemoryBank(c.num_classes, c.bank_size, c.proj_dim, self.device)
        self.dice = DiceLoss(include_background=True, to_onehot_y=True, softmax=True, batch=True)

        def sgd(params) -> torch.optim.SGD:
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.nesterov)

        # L_cl (eq. 22) is part of CS's loss, so the projection head trains with CS.
        self.opt_cs = sgd(list(self.cs.parameters()) + list(self.head.parameters()))
        self.opt_ds = sgd(self.ds.parameters())

    # ---- contract ----------------------------------------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt_cs, self.opt_ds]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"cs": self.cs, "ds": self.ds, "head": self.head}

    def lr_at(self, step: int) -> float:
        """Constant ``lr`` (Sec. 5.1: "the learning rate is maintained at 0.01"), or poly decay if configured."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        if self.config.lr_schedule == "poly":
            return super().lr_at(step)
        raise ValueError(f"unknown lr_schedule '{self.config.lr_schedule}'")

    def extra_state(self) -> dict[str, Any]:
        return {"memory_bank": self.bank.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "memory_bank" in state:
            self.bank.load(state["memory_bank"])

    def warmup(self, step: int) -> float:
        """lambda(t) of Sec. 5.1 (Gaussian warm-up, scale 2.0)."""
        c = self.config
        return gaussian_warmup(step, c.warmup_fraction * c.max_steps, c.warmup_scale)

    # ---- training ---------------------------------------------------------------------------------------------
    def _dice_ce(self, logits: torch.Tensor, target: torch.Tensor, ce_weight: float) -> torch.Tensor:
        """``D(P, Y) + w E(P, Y)`` on logits ``[B, K, ...]`` and integer targets ``[B, ...]`` (eq. 6-9, 18-21)."""
        logits = logits.float()
        return self.dice(logits, target[:, None]) + ce_weight * F.cross_entropy(logits, target)

    def _augment(self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random flip and rotation of Sec. 5.1: the same transform for a labeled image and its label ``[B, ...]``,
        one of its own for each unlabeled image (off with ``config.augment`` False)."""
        if not self.config.augment:
            return x_l, y_l, x_u
        x_l, y_l = random_rot_flip(x_l, y_l)
        (x_u,) = random_rot_flip(x_u)
        return x_l, y_l, x_u

    def _noised_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Y_t`` of eq. 5 from integer labels ``[B, ...]``, with a uniform random ``t`` per sample."""
        y0 = to_signed(F.one_hot(labels, self.config.num_classes).movedim(-1, 1).float())
        t = sample_timesteps(self.ddpm, labels.shape[0], labels.device)
        return q_sample(self.ddpm, y0, t), t

    @torch.no_grad()
    def _update_bank(self, ds_feats: torch.Tensor, ds_labels: torch.Tensor, labels: torch.Tensor) -> None:
        """Push projected DS features of labeled voxels that DS predicts correctly, per class (Sec. 4.3)."""
        correct = ds_labels == labels
        for cls in range(self.config.num_classes):
            picked = sample_voxels(ds_feats, self.config.bank_update, correct & (labels == cls))
            if picked.shape[0]:
                self.bank.push(cls, self.head(picked.float()))

    def _contrastive(self, cs_feats_u: torch.Tensor) -> torch.Tensor:
        """``L_cl`` (eq. 11-15): p bank anchors per class against q random unlabeled CS features."""
        c = self.config
        b = self.head(sample_voxels(cs_feats_u, c.cl_candidates).float())
        anchors = [self.bank.sample(cls, c.cl_anchors) for cls in range(c.num_classes)]
        return label_propagation_loss(anchors, b, c.cl_topk, c.cl_tau, c.cl_reduction)

    def _losses(self, logits_c: torch.Tensor, logits_d: torch.Tensor, y_l: torch.Tensor, y_hat: torch.Tensor,
                y_tilde: torch.Tensor, loss_cl: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
        """Every loss term of Sec. 4 from both networks' logits on ``[labeled; unlabeled]``, the labels ``y_l`` of
        the first ``len(y_l)`` samples, the pseudo labels ``y_hat`` (CS) and ``y_tilde`` (DS) of every sample,
        ``L_cl`` and the warm-up ``lam``: ``{"sup_cs", "sup_ds", "cps_cs", "cps_ds", "cs", "ds"}``."""
        c = self.config
        n_l = y_l.shape[0]
        sup_c = self._dice_ce(logits_c[:n_l], y_l, c.beta2 * lam)                 # eq. 19
        sup_d = self._dice_ce(logits_d[:n_l], y_l, c.beta1 * lam)                 # eq. 18
        cps_c = cps_d = logits_c.new_zeros((), dtype=torch.float32)  # no graph: keeps the CS and DS graphs apart
        if logits_c.shape[0] > n_l:
            cps_d = self._dice_ce(logits_d[n_l:], y_hat[n_l:], c.lambda1)         # eq. 6: CS labels teach DS
            cps_c = self._dice_ce(logits_c[n_l:], y_tilde[n_l:], c.lambda2)       # eq. 7: DS labels teach CS
        return {"sup_cs": sup_c, "sup_ds": sup_d, "cps_cs": cps_c, "cps_ds": cps_d,
                "ds": sup_d + c.mu1 * cps_d,                                       # eq. 16
                "cs": sup_c + c.mu2 * (cps_c + c.eta * loss_cl)}                   # eq. 17, 22

    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        c = self.config
        self.train()
        x_l = labeled["image"]
        y_l = labeled["label"][:, 0].long()
        x_u = unlabeled["image"] if unlabeled is not None and "image" in unlabeled else x_l[:0]
        x_l, y_l, x_u = self._augment(x_l, y_l, x_u)
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        x = torch.cat([x_l, x_u])
        lam = self.warmup(step)
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)

        with self.autocast():
            logits_c, feats_c = self.cs(x)                                       # step 4
            y_hat = logits_c.detach().max(1).indices                             # step 5 (argmax)
            y_t, t = self._noised_labels(torch.cat([y_l, y_hat[n_l:]]))          # step 6, eq. 5: Y_0^l = y^l
            logits_d, feats_d = self.ds(x, y_t, t)                               # step 7
            y_tilde = logits_d.detach().max(1).indices                           # argmax, 10x faster on CPU
            loss_cl = logits_c.new_zeros((), dtype=torch.float32)
            if c.use_cl:
                self._update_bank(feats_d[:n_l], y_tilde[:n_l], y_l)
                if n_u:
                    loss_cl = self._contrastive(feats_c[n_l:])                    # eq. 15
            losses = self._losses(logits_c, logits_d, y_l, y_hat, y_tilde, loss_cl, lam)

        # The two graphs are disjoint (DS sees CS only through argmax labels, the bank is detached).
        self.backward_and_step(losses["cs"], self.opt_cs)
        self.backward_and_step(losses["ds"], self.opt_ds)

        with torch.no_grad():
            logs = {
                "loss_cs": float(losses["cs"]), "loss_ds": float(losses["ds"]),
                "loss_sup_cs": float(losses["sup_cs"]), "loss_sup_ds": float(losses["sup_ds"]),
                "loss_cps_cs": float(losses["cps_cs"]), "loss_cps_ds": float(losses["cps_ds"]),
                "loss_cl": float(loss_cl), "eta_loss_cl": c.eta * float(loss_cl),
                "lambda": lam, "beta1": c.beta1 * lam, "beta2": c.beta2 * lam,
                "dice_cs": _hard_dice(y_hat[:n_l], y_l, c.num_classes),
                "dice_ds": _hard_dice(y_tilde[:n_l], y_l, c.num_classes),
                "bank_fill": float(self.bank.count.float().mean() / self.bank.size),
            }
            if n_u:
                logs["agreement_u"] = _hard_dice(y_tilde[n_l:], y_hat[n_l:], c.num_classes)
        return logs

    # ---- inference --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        modes = {k: m.training for k, m in self.modules().items()}
        self.eval()
        try:
            yield
        finally:
            for key, module in self.modules().items():
                module.train(modes[key])

    def _cs_probs(self, patch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.cs(patch)[0].float(), dim=1)

    def _ds_probs(self, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """DS's label for ``patch`` by DDIM (eq. 2-3): from pure noise ``Y_T`` conditioned on the image, each step
        predicts the clean label (x0, as softmax mapped to [-1, 1]) and moves to the next, smaller t.

        Starting from noise rather than from a noised CS label keeps the ``ds`` view independent of CS, so the
        agreement between the two views measures two opinions."""
        shape = (patch.shape[0], self.config.num_classes, *patch.shape[2:])
        y_T = torch.randn(shape, generator=generator, device=patch.device, dtype=torch.float32)

        def predict_x0(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return to_signed(torch.softmax(self.ds(patch, y_t, t)[0].float(), dim=1))

        return from_signed(ddim_sample(self.ddim, predict_x0, y_T, self.config.ddim_steps)).clamp(0.0, 1.0)

    @torch.inference_mode()
    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"cs": CS labels, "ds": DS labels by DDIM}`` for a ``[C, Z, Y, X]`` volume (sliding window).  The
        DDIM noise comes from a generator seeded with ``config.seed``: the same weights give the same labels."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        with self._evaluating():
            maps = self.infer_volume(volume, lambda p: {"cs": self._cs_probs(p), "ds": self._ds_probs(p, generator)})
        return {view: argmax_uint8(maps[view]) for view in self.views}

    @torch.inference_mode()
    def primary_probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """The CS network's softmax (its arg-max is the ``cs`` view)."""
        with self._evaluating():
            return self.infer_volume(volume, lambda batch: {"p": self._cs_probs(batch)})["p"]

    @torch.inference_mode()
    def predict(self, volume: torch.Tensor) -> np.ndarray:
        """The CS network's segmentation (the paper's inference network)."""
        with self._evaluating():
            maps = self.infer_volume(volume, lambda p: {"cs": self._cs_probs(p)})
        return argmax_uint8(maps["cs"])


def random_rot_flip(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One random in-plane symmetry per sample, the same for every tensor given (``[B, ..., H, W]`` each, same B):
    a rotation by k x 90 degrees in the (H, W) plane, then, with probability 1/2, a flip of W.  Together the 8
    symmetries of the square, each with probability 1/8; k is 0 or 2 when H != W, so shapes never change."""
    b = tensors[0].shape[0]
    square = tensors[0].shape[-1] == tensors[0].shape[-2]
    ks = torch.randint(0, 4, (b,)) if square else 2 * torch.randint(0, 2, (b,))
    flips = torch.randint(0, 2, (b,))
    out = []
    for t in tensors:
        samples = []
        for i in range(b):
            r = torch.rot90(t[i], int(ks[i]), dims=(-2, -1))
            samples.append(r.flip(-1) if flips[i] else r)
        out.append(torch.stack(samples) if samples else t)
    return tuple(out)


def _hard_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over foreground classes present in either map (1.0 when none is), for logging."""
    scores = []
    for cls in range(1, num_classes):
        p, g = pred == cls, target == cls
        denom = int(p.sum() + g.sum())
        if denom:
            scores.append(2.0 * float((p & g).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0
