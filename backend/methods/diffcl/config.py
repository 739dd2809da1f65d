"""Diff-CL: the config (paper defaults as named fields) and its presets; see :mod:`backend.methods.diffcl` for the method."""
from __future__ import annotations
import dataclasses
from typing import Any, ClassVar
from backend.methods.base import BaseConfig


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

PRESETS: dict[str, dict[str, Any]] = {
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
