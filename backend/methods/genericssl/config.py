"""A&D (GenericSSL): the config (paper defaults as named fields) and its presets; see :mod:`backend.methods.genericssl` for the method."""
from __future__ import annotations
import dataclasses
from typing import Any, ClassVar
from backend.methods.base import BaseConfig
from backend.methods.genericssl.svda import SVDAParams


@dataclasses.dataclass(frozen=True)
class _OfficialRun:
    """The length of a published training run (xmed-lab/GenericSSL ``train_diffusion.py`` run by ``train.sh`` with
    the README's ``-n 300``): ``for epoch in range(max_epoch + 1)`` -- 301 epochs -- of ``iterations`` batches each
    (the shorter of the zipped labeled / unlabeled loaders: ``len(unlabeled split) // batch`` with ``drop_last``,
    the labeled split for MMWHS), mu ramped up over ``rampup_epochs`` epochs."""

    iterations: int  # per epoch
    rampup_epochs: int = 300
    epochs: int = 300  # -n (max_epoch)

    @property
    def steps(self) -> int:
        return (self.epochs + 1) * self.iterations

    @property
    def rampup_steps(self) -> int:
        return self.rampup_epochs * self.iterations


_LA = _OfficialRun(iterations=76 // 4)  # la_0.05: unlabeled_0.05.txt holds 76 cases, batch 4 (la_0.1: 72 // 4)
_SYNAPSE = _OfficialRun(iterations=16 // 2)  # synapse_0.2: unlabeled_0.2.txt holds 16 cases, batch 2 (config.py)
_MMWHS = _OfficialRun(iterations=16 // 2)  # mmwhs_ct2mr / mr2ct: the labeled split (16 cases) sets the length
_MMS = _OfficialRun(iterations=440 // 4, rampup_epochs=100)  # mnms_A_0.02: 440 unlabeled volumes; -cr 100


def _official(run: _OfficialRun) -> dict[str, Any]:
    """Preset fields of a published run: its length, ramp-up and the validation cadence (every epoch)."""
    return {"max_steps": run.steps, "rampup_steps": run.rampup_steps, "val_every": run.iterations}


def _overlap(patch: tuple[int, int, int], stride: tuple[int, int, int]) -> tuple[float, float, float]:
    """MONAI's per-axis sliding-window overlap for the published strides (test.py: 16 in-plane, 4 along z)."""
    return tuple((p - s) / p for p, s in zip(patch, stride))


@dataclasses.dataclass
class GenericSSLConfig(BaseConfig):
    """A&D hyper-parameters.  Defaults: the paper's (LASeg row of Table 8 for patch/lr/batch), and the published
    code's where the paper is silent.  ``patch_size`` is ``(D, H, W)``: the paper's 112x112x80 (x, y, z) for
    LASeg is ``(80, 112, 112)`` here."""

    # data / optimisation (Table 8, LASeg; sec. 4.1: SGD, Nesterov, momentum 0.9, poly decay)
    patch_size: tuple[int, ...] = (80, 112, 112)
    batch_labeled: int = 4
    batch_unlabeled: int = 4
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5  # published code
    # Diff-VNet
    features: int = 32  # F (Table 8)
    norm: str = "batch"  # published code
    time_embed_dim: int = 128  # sinusoidal size, lifted to emb_dim by Linear-SiLU-Linear (published code)
    emb_dim: int = 512
    encoder_dropout: float = 0.5  # on the deepest encoder feature (published code: has_dropout)
    decoder_dropout: float = 0.5  # before each decoder's output convolution
    # diffusion (published code: T = 1000 linear betas, x0-prediction, DDIM 10 steps, x0 clipped to [-1, 1])
    diffusion_steps: int = 1000
    beta_schedule: str = "linear_beta"
    ddim_steps: int = 10
    clip_x0: bool = True
    # SVDA (sec. 3.2: N_aug = 3; published ranges, defined once in SVDAParams)
    svda: bool = True
    n_aug: int = SVDAParams.n_aug
    aug_prob: float = SVDAParams.p
    rotation_deg: float = SVDAParams.rotation_deg
    scale_range: tuple[float, float] = SVDAParams.scale_range
    blur_sigma: tuple[float, float] = SVDAParams.blur_sigma
    brightness_range: tuple[float, float] = SVDAParams.brightness_range
    contrast_range: tuple[float, float] = SVDAParams.contrast_range
    gamma_range: tuple[float, float] = SVDAParams.gamma_range
    # losses: L_DiceCE = lambda_ce CE + lambda_dice Dice: the published code's CE + Dice by default; 0.5 and 0.5
    # give the paper's (CE + Dice) / 2 of eq. 2.  DRS (eq. 3-6); total (eq. 9)
    lambda_ce: float = 1.0
    lambda_dice: float = 1.0
    dice_include_background: bool = False  # published code: Dice over foreground classes
    drs_tau: int = 50
    drs_alpha: float = 0.2  # 1/5
    drs_mode: str = "ema"  # "ema": the published running average over ~tau iterations; "window": exact sums
    drs_absent_dice: float = 0.5  # Dice of a class absent from prediction and label (published SoftDiceLoss: 1/2)
    mu: float = 10.0
    # Gaussian ramp-up length of mu (eq. 9), in iterations: the published run ramps over all its 300 epochs (M&Ms:
    # 100, train.sh -cr 100); a run-length field, so --steps scales it with max_steps
    rampup_steps: int = _LA.epochs * _LA.iterations
    # RS (eq. 7) and EMA transfer
    gumbel_tau: float = 1.0
    smooth_kernel: int = 3
    smooth_sigma: float = 1.0
    ema_w: float = 0.99
    # review views: "train" computes them as the training targets are made (norms on batch statistics, without
    # updating the running ones, and dropout on), "eval" with the networks in eval mode
    review_mode: str = "train"
    # implementation
    split_backward: bool = True  # back-propagate each flow's loss on its own (same gradients, 1/3 of the graphs)
    cpu_bf16_sampling: bool = True  # DDIM sampling under bfloat16 autocast on CPUs with native bf16 (with amp)
    cpu_amp: bool = False  # opt-in: bf16 autocast for the whole step and inference on CPUs with native bf16
    # the run length (LASeg 5 %: 301 epochs of 19 iterations, see _OfficialRun) and the validation cadence (the
    # published code validates every epoch and keeps the best model; the engine keeps best.pt)
    max_steps: int = _LA.steps
    val_every: int = _LA.iterations

    run_length_fields: ClassVar[tuple[str, ...]] = ("rampup_steps",)


PRESETS: dict[str, dict[str, Any]] = {
    # Table 8 (patch sizes in (D, H, W) = (z, y, x) order) and the published runs' lengths; like the paper, train
    # on every labeled case.  Preprocessing: see the module docstring ("Paper presets").
    "la": {"num_classes": 2, "patch_size": (80, 112, 112), "lr": 1e-2, "batch_labeled": 4, "batch_unlabeled": 4,
           "hold_out_from": None, "sw_overlap": _overlap((80, 112, 112), (4, 16, 16)), **_official(_LA)},
    # batch 2: the published config.py (Table 8 prints 4); CT window [-75, 275] HU as the published data loader
    "synapse": {"num_classes": 14, "patch_size": (64, 128, 128), "lr": 3e-2, "batch_labeled": 2,
                "batch_unlabeled": 2, "hold_out_from": None, "intensity_window": (-75.0, 275.0),
                **_official(_SYNAPSE)},
    "mmwhs": {"num_classes": 5, "patch_size": (128, 128, 128), "lr": 5e-3, "batch_labeled": 2,
              "batch_unlabeled": 2, "hold_out_from": None, **_official(_MMWHS)},
    "mms": {"num_classes": 4, "patch_size": (32, 128, 128), "lr": 1e-2, "batch_labeled": 4, "batch_unlabeled": 4,
            "hold_out_from": None, **_official(_MMS)},
    # a few CPU minutes on a small project (~2 s per step on one core, 200 steps)
    "quick": {"features": 8, "patch_size": (32, 64, 64), "batch_labeled": 1, "batch_unlabeled": 1,
              "time_embed_dim": 32, "emb_dim": 128, "ddim_steps": 5, "drs_tau": 20, "max_steps": 200,
              "rampup_steps": 100, "checkpoint_every": 100, "val_every": 50, "sw_batch_size": 2},
    # unit / learning tests
    "tiny": {"features": 8, "patch_size": (32, 32, 32), "batch_labeled": 1, "batch_unlabeled": 1, "lr": 3e-2,
             "time_embed_dim": 16, "emb_dim": 32, "ddim_steps": 3, "drs_tau": 10, "max_steps": 100,
             "rampup_steps": 40, "encoder_dropout": 0.0, "decoder_dropout": 0.1, "checkpoint_every": 50,
             "val_every": 50, "sw_batch_size": 4},
}
