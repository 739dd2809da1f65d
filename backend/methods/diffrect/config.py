"""DiffRect: the config (paper defaults as named fields) and its presets; see :mod:`backend.methods.diffrect` for the method."""
from __future__ import annotations
import dataclasses
from typing import ClassVar
from backend.methods.base import BaseConfig
from backend.methods.layers.unet2d import UNET2D_FEATURES


CONF_RULES = ("official", "fixmatch")


@dataclasses.dataclass
class DiffRectConfig(BaseConfig):
    """DiffRect's defaults: the paper's ACDC setting, and the published code where the paper is silent."""

    patch_size: tuple[int, ...] = (256, 256)
    batch_labeled: int = 3
    batch_unlabeled: int = 3
    max_steps: int = 30000
    sw_batch_size: int = 4  # 16 slices per inference batch
    # segmentation U-Net (backend.methods.layers.unet2d)
    seg_features: tuple[int, ...] = UNET2D_FEATURES
    seg_dropout: tuple[float, ...] | float = (0.05, 0.1, 0.2, 0.3, 0.5)  # per encoder level, none in the decoder
    # semi-supervised segmentation losses (FixMatch, eq. 13's L_Semi^Seg)
    conf_thresh: float = 0.8
    conf_rule: str = "official"  # official | fixmatch (see confident_labels)
    consistency: float = 0.1
    consistency_rampup: float = 30000.0  # published: sigmoid_rampup(step // 150, 200), i.e. over 30k steps
    # weak perturbation
    weak_flip_p: float = 0.5
    weak_rotate_p: float = 0.5
    weak_max_angle: float = 359.0
    # strong perturbation
    strong_enhance_p: float = 0.5
    strong_enhance_max: float = 0.1
    strong_blur_p: float = 0.5
    strong_blur_sigma_max: float = 1.0
    # LCC: B_sem and the image encoder (4 stages + latent), calibration guidance
    bsem_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    bsem_dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    emb_dim: int = 128  # sinusoidal embedding width (tau and t)
    emb_hidden: int = 512  # width of the embedding MLP's output
    guidance: str = "dice"  # dice | jaccard | both | fixed | random | none (Tables 4-5)
    guidance_scale: float = 999.0  # tau in [0, 1] is embedded as a timestep tau * 999 (published)
    tau_ema_decay: float = 0.99  # running mean of tau_l, the guidance of rectification at review time
    # LFR: latent DDPM and denoiser
    diffusion_steps: int = 10
    schedule: str = "cosine"
    sample_steps: int = 2
    sample_eta: float = 0.0  # 0: deterministic DDIM (published); 1: stochastic DDPM-like steps (eq. 12)
    latent_clamp: float | None = 1.0  # x0 predictions clamped to [-1, 1] while sampling (published); None: off
    denoiser_channels: tuple[int, ...] = (384, 512)
    # loss weights (eq. 13)
    lambda_lat_u: float = 1.0  # lambda_1, times the consistency weight (published)
    lambda_lat_l: float = 1.0  # lambda_2
    lambda_rect: float = 1.0
    lambda_decoder: float = 1.0  # the decoder's CE + Dice (W2G: ground truth; S2W: weak labels, x consistency)
    rect_start: int = 1000
    predict_view: str = "weak"  # weak | strong | rectified: the segmentation net (weak) is the paper's output

    # schedules counted in steps that belong to the run length: rescaled by ``with_steps`` (``train --steps``)
    run_length_fields: ClassVar[tuple[str, ...]] = ("consistency_rampup", "rect_start")
