"""Diff-CL (Guo et al.): cross pseudo supervision between a diffusion (DS) and a convolution (CS) segmentation
network, a high-frequency Mamba module in CS, and label propagation by contrastive learning.  3D, V-Net backbones.

One training step is Algorithm 1:

1. CS forward on labeled + unlabeled images: softmax ``\\hat P``, pseudo labels ``\\hat Y = argmax \\hat P``.
2. ``Y_0^l = y^l`` and ``Y_0^u = \\hat Y^u`` as one-hot maps, noised to step ``t`` (eq. 5).
3. DS forward on ``(x, Y_t, t)``: softmax ``\\tilde P`` (its x0 prediction), pseudo labels ``\\tilde Y``.
4. Losses: supervised ``L_s^d`` (eq. 18) and ``L_s^c`` (eq. 19), cross pseudo supervision ``L_p^d`` (eq. 6) and
   ``L_p^c`` (eq. 7), label propagation ``L_cl`` (eq. 15); totals ``L^d = L_s^d + mu1 L_p^d`` (eq. 16) and
   ``L^c = L_s^c + mu2 (L_p^c + eta L_cl)`` (eq. 17, 22); one SGD step for each network.

Review views per volume: ``cs`` (CS softmax, sliding window) and ``ds`` (DS labels sampled by DDIM, Sec. 3.1,
conditioned on the image, started from pure noise).  ``predict`` returns ``cs``: Algorithm 1's output is "trained CS
for inference", and the paper reports CS results.

There is no official code of Diff-CL (none published or found); the settings below follow the paper, and where
it is silent the SSL4MIS / SegMamba code its baselines and modules come from.  Every remaining deviation from the
paper, with its reason (see also :class:`DiffCLConfig`):

* Training batches are augmented here, in the method, by one random in-plane rotation by k x 90 degrees and an
  optional flip per sample (Sec. 5.1 "random cropping, flipping, and rotation"; the crop is the engine's
  sampler).  Image and label get the same transform; unlabeled images their own.  The transform is drawn
  uniformly from the 8 symmetries of the (y, x) plane (SSL4MIS's ``RandomRotFlip`` always flips, i.e. draws only
  the 4 reflections; the paper does not say which); a non-square plane is rotated by 0 or 180 degrees only.
* During training DS's pseudo labels are its single x0 prediction from ``Y_t`` (Algorithm 1, step 7), with ``t``
  uniform in [0, T) per sample; DDIM's iterations are used only for the ``ds`` review view.  The paper gives
  no diffusion schedule: T = 1000 linear betas, DDIM with ``ddim_steps`` (chosen).
* Table 2 ramps only the supervised CE weights (beta = 0.1 lambda(t)); mu, lambda and eta are constant from the
  first step, as written.  lambda(t)'s t_max is the run's end, as the paper's t_max = its last epoch; the paper
  counts epochs, this code steps (``max_steps`` of the paper presets is the base class's 30000: the paper gives
  300 epochs without an epoch size).
* ``L_cl`` is eq. 15's sum over classes, anchors and positives divided by the number of terms
  (``cl_reduction="mean"``; ``"sum"`` is eq. 15 literally). The paper gives neither p, q, k, tau, d nor code, and
  the sum's scale is ~C p k log(1 + k) at initialisation: 34650 with the chosen p = k = 64 (mean 4.2), so Table 2's
  eta = 0.7 for LA would weigh it 24000 against Dice + CE terms of ~1. Measured on the tiny preset (a labeled and an
  unlabeled synthetic 32^3 ball, 30 steps from the same seed): eta 0.7 with the sum drove CS's supervised loss from
  0.53 up to 1.09 (labeled Dice 0.00: CS collapsed onto L_cl), with the mean down to 0.07 (Dice 0.95); eta 0.007
  with the sum: 0.45 (Dice 0.00). With the mean, eta x L_cl is ~3 (LA) to ~0.001 (Pancreas 12/50) at initialisation,
  a weight in the range the other terms live in, which is how we read "the paper's eta". More numbers in
  :func:`backend.nets.diffcl_contrast.label_propagation_loss`.
* HFM runs on the CS encoder's levels 1/2 to 1/16 (``hfm_levels``), SegMamba's stages, and its output is added
  to the features (see :class:`backend.nets.diffcl_nets.CSNet` for why not the bottleneck alone).
* Network details the paper leaves open are chosen (see :class:`DiffCLConfig` and :mod:`backend.nets.diffcl_nets`):
  the 2 + 2 split of the batch of 4, dropout 0.5 before V-Net's output conv, DS's sinusoidal timestep embedding,
  the projection head (Linear-ReLU-Linear on the last decoder features), HF read as a radius in normalised
  frequency, SA's sigmoid gate.  The CPU presets ``tiny`` and ``quick`` run HFM on levels 1/4-1/16 only (level 1
  doubles a CPU step); the paper presets on 1/2-1/16.
* The memory bank holds projected (``F``), L2-normalised DS features of correctly predicted labeled voxels,
  ``bank_update`` random voxels per class and step, FIFO; it is not synchronised across data-parallel ranks
  (each rank fills its own from its own patches; rank 0's is checkpointed).
* Sliding-window inference uses MONAI's Gaussian-weighted blending; SSL4MIS's ``test_all_case`` averages the
  windows uniformly.  The strides are the paper's, per axis: LA 18 x 18 x 4 (x, y, z) of 112 x 112 x 80,
  Pancreas 16 of 96, BraTS 64 of 96 (``sw_overlap`` per (z, y, x) axis).
* Preprocessing (preset fields): LA none beyond the per-volume z-score (the dataset is already at 0.625 mm
  isotropic); Pancreas the CT window [-120, 240] HU (Sec. 5.1) and 1 mm isotropic resampling (the paper follows
  Luo et al. 2021, whose Pancreas data are resampled to 1 x 1 x 1 mm); BraTS 1 mm isotropic (Sec. 5.1).  The
  crops around the heart / pancreas (with a 25-voxel margin) need the label and are not reproduced: inference
  runs on the whole volume.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from backend.methods.base import BaseConfig, Method, argmax_uint8
from backend.methods.rampups import gaussian_warmup
from backend.nets.diffcl_contrast import ClassMemoryBank, label_propagation_loss, sample_voxels
from backend.nets.diffcl_nets import CSNet, DSNet, ProjectionHead
from backend.nets.diffusion import ddim_sample, from_signed, make_schedulers, q_sample, sample_timesteps, to_signed


@dataclasses.dataclass
class DiffCLConfig(BaseConfig):
    """Diff-CL's settings.  Defaults are the paper's (Sec. 5.1 and Table 2, NIH Pancreas 6/56 row); fields the
    paper does not give are marked *chosen* with the reason.

    Augmentation (Sec. 5.1): ``augment`` random in-plane rot90 + flip of every training sample (see the module
    docstring).

    Optimisation (Sec. 5.1): SGD, ``lr`` 0.01 kept constant (``lr_schedule="constant"``; ``"poly"`` uses the base
    class's decay), momentum 0.9, weight decay 3e-5, batch 4 = ``batch_labeled`` 2 + ``batch_unlabeled`` 2
    (*chosen*: the paper gives only the total; half labeled is the SSL4MIS convention its baselines use).
    ``patch_size`` is (D, H, W) = (z, y, x): the paper's 112x112x80 (x, y, z) is (80, 112, 112) here.

    Loss weights (Table 2): ``mu1``, ``mu2`` (eq. 16, 17), ``lambda1``, ``lambda2`` (CE in eq. 6, 7), ``eta``
    (eq. 22).  Table 2 gives beta_i = ``beta_i`` x lambda(t) (CE in eq. 18, 19) with the Gaussian warm-up
    lambda(t) = ``warmup_scale`` exp(-5 (1 - t / t_max)^2); the paper counts t in epochs with t_max the last of
    its 300, here t is the step and t_max = ``warmup_fraction`` x ``max_steps``.
    Dice (eq. 8, 20) is MONAI's soft Dice over all classes, background included, on the whole batch; CE (eq. 9,
    21) is torch's.

    Networks: V-Net with ``features`` base channels, ``norm``, ``dropout`` before the output conv (SSL4MIS's V-Net
    as used by the paper's baselines).  DS: ``time_embed_dim`` sinusoidal timestep embedding (*chosen*).
    Diffusion (*chosen*, the paper gives none): ``diffusion_steps`` T of a ``noise_schedule`` DDPM schedule, labels
    diffused as one-hot maps scaled to [-1, 1], DDIM sampling with ``ddim_steps`` steps (eta 0) for the ``ds`` view.
    Keep T near 1000 with ``linear_beta``: MONAI's betas (1e-4 to 2e-2) do not rescale with T, and with T = 100
    the label is never destroyed (abar_T = 0.37), so DS learns to copy its noised input and the cross pseudo
    supervision of CS degenerates into self-training (seen as slower, seed-dependent learning in tests).

    HFM (eq. 10): ``hf_threshold`` is Table 2's HF; ``use_hfm`` off gives the ablation of Table 6;
    ``hfm_levels`` the V-Net encoder levels it runs on (1 = 1/2 resolution ... 4 = 1/16; SegMamba's stages);
    ``hfm_d_state``, ``hfm_d_conv``, ``hfm_expand`` are Mamba's defaults; ``hfm_mlp_ratio`` the MLP width
    (*chosen*); ``scan_backend`` ``"auto"`` | ``"torch"`` | ``"cuda"``; ``scan_chunk`` 0 = ceil(sqrt(L)).

    Run length: lambda(t) is the only schedule and is given as a fraction of ``max_steps``, so
    :meth:`BaseConfig.with_steps` (``--steps``) shortens it with the run; no field is counted in steps
    (``run_length_fields`` is empty).

    Contrastive label propagation (Sec. 4.3; sizes *chosen*, the paper names p, q, k, tau, d without values):
    ``proj_dim`` d, ``cl_anchors`` p per class, ``cl_candidates`` q, ``cl_topk`` k, ``cl_tau`` tau;
    ``bank_size`` vectors kept per class, ``bank_update`` correctly predicted labeled voxels added per class per
    step; ``cl_reduction`` ``"mean"`` | ``"sum"`` (eq. 15 literally; the module docstring says why the mean);
    ``use_cl`` off gives the ablation of Table 6.
    """

    patch_size: tuple[int, ...] = (96, 96, 96)
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 3e-5
    lr_schedule: str = "constant"
    augment: bool = True
    # networks
    features: int = 16
    norm: str = "batch"
    dropout: float = 0.5
    time_embed_dim: int = 64
    # diffusion
    diffusion_steps: int = 1000
    noise_schedule: str = "linear_beta"
    ddim_steps: int = 10
    # losses (Table 2)
    mu1: float = 1.0
    mu2: float = 1.0
    beta1: float = 0.1
    beta2: float = 0.1
    lambda1: float = 1.0
    lambda2: float = 1.0
    eta: float = 0.007
    warmup_scale: float = 2.0
    warmup_fraction: float = 1.0
    # high-frequency Mamba module
    use_hfm: bool = True
    hfm_levels: tuple[int, ...] = (1, 2, 3, 4)
    hf_threshold: float = 0.8
    hfm_d_state: int = 16
    hfm_d_conv: int = 4
    hfm_expand: int = 2
    hfm_mlp_ratio: float = 2.0
    scan_backend: str = "auto"
    scan_chunk: int = 0
    # contrastive label propagation
    use_cl: bool = True
    proj_dim: int = 64
    cl_anchors: int = 64
    cl_candidates: int = 1024
    cl_topk: int = 64
    cl_tau: float = 0.1
    bank_size: int = 2048
    bank_update: int = 256
    cl_reduction: str = "mean"

    # lambda(t) is given as warmup_fraction x max_steps: with_steps keeps it in place without a step-counted field
    run_length_fields: ClassVar[tuple[str, ...]] = ()


def _paper(eta: float, hf: float, beta: float, **extra: Any) -> dict[str, Any]:
    return {"eta": eta, "hf_threshold": hf, "beta1": beta, "beta2": beta, "hold_out_from": None, **extra}


def _strides(patch: tuple[int, int, int], strides: tuple[int, int, int]) -> dict[str, Any]:
    """The paper's sliding-window strides (z, y, x) as MONAI's per-axis overlaps: MONAI steps
    ``int(patch x (1 - overlap))`` voxels, so the overlap leaves half a voxel of margin against rounding."""
    return {"patch_size": patch, "sw_overlap": tuple(1.0 - (s + 0.5) / p for p, s in zip(patch, strides))}


_LA = _strides((80, 112, 112), (4, 18, 18))            # Sec. 5.1: 112 x 112 x 80 patches, strides 18 x 18 x 4
_PANCREAS = {**_strides((96, 96, 96), (16, 16, 16)),   # strides 16; CT window of Sec. 5.1, 1 mm as Luo et al.
             "intensity_window": (-120.0, 240.0), "target_spacing": (1.0, 1.0, 1.0)}
_BRATS = {**_strides((96, 96, 96), (64, 64, 64)), "target_spacing": (1.0, 1.0, 1.0)}  # strides 64; 1 mm (Sec. 5.1)

_TINY = {  # unit tests: seconds on two CPU cores; lr 3x the paper's so that ~150 steps fit a real patch
    "lr": 0.03, "features": 8, "patch_size": (32, 32, 32), "batch_labeled": 1, "batch_unlabeled": 1, "dropout": 0.0,
    "time_embed_dim": 16, "ddim_steps": 2, "hfm_d_state": 4, "hfm_expand": 1,
    "proj_dim": 8, "cl_anchors": 8, "cl_candidates": 64, "cl_topk": 8, "bank_size": 64, "bank_update": 16,
    "max_steps": 200, "checkpoint_every": 50, "val_every": 50, "sw_batch_size": 1, "sw_overlap": 0.25,
    "hfm_levels": (2, 3, 4),  # still below the bottleneck; level 1 (16^3 tokens) would double a CPU step
}

_QUICK = {  # a real run on a CPU in minutes
    "features": 8, "patch_size": (48, 48, 48), "batch_labeled": 1, "batch_unlabeled": 1, "dropout": 0.0,
    "time_embed_dim": 32, "ddim_steps": 4, "hfm_d_state": 8, "proj_dim": 32, "cl_anchors": 32,
    "cl_candidates": 512, "cl_topk": 32, "bank_size": 512, "bank_update": 64, "max_steps": 400,
    "checkpoint_every": 100, "val_every": 100, "sw_batch_size": 2, "sw_overlap": 0.25,
    "hfm_levels": (2, 3, 4),  # level 1 (24^3 tokens) doubles a CPU step: 8.9-12.6 s against 4.9 s (one thread)
}


class DiffCL(Method):
    """Diff-CL on 3D patches: CS + DS V-Nets, HFM in CS, contrastive label propagation through a memory bank."""

    name: ClassVar[str] = "diffcl"
    dims: ClassVar[int] = 3
    config_class: ClassVar[type[BaseConfig]] = DiffCLConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # Table 2, the row with the fewest labels per dataset; the *_more presets are the second rows
        "la": {**_LA, **_paper(eta=0.7, hf=0.6, beta=0.01)},                 # LA 4/76
        "la_more": {**_LA, **_paper(eta=0.5, hf=0.7, beta=0.01)},            # LA 8/72
        "pancreas": {**_PANCREAS, **_paper(eta=0.007, hf=0.8, beta=0.1)},    # Pancreas 6/56
        "pancreas_more": {**_PANCREAS, **_paper(eta=0.0003, hf=0.5, beta=0.1)},  # Pancreas 12/50
        "brats": {**_BRATS, **_paper(eta=0.007, hf=0.5, beta=0.1)},          # BraTS 25/225
        "brats_more": {**_BRATS, **_paper(eta=0.003, hf=0.5, beta=0.1)},     # BraTS 50/200
        "quick": _QUICK,
        "tiny": _TINY,
    }
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

    @torch.no_grad()
    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"cs": CS labels, "ds": DS labels by DDIM}`` for a ``[C, Z, Y, X]`` volume (sliding window).  The
        DDIM noise comes from a generator seeded with ``config.seed``: the same weights give the same labels."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        with self._evaluating():
            maps = self.infer_volume(volume, lambda p: {"cs": self._cs_probs(p), "ds": self._ds_probs(p, generator)})
        return {view: argmax_uint8(maps[view]) for view in self.views}

    @torch.no_grad()
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


METHOD = DiffCL
