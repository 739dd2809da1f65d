"""The rectification model of DiffRect (LCC + LFR, Fig. 1 a-b) as one module: what the segmentation net is not.

Holds the semantic colouring (eq. 4), the tau embedding (eq. 5), the image encoder, B_sem, the latent denoiser
and the decoder, plus ``tau_ema``: a running mean of the labeled calibration guidance tau_l, the guidance the
rectification is run with when no ground truth is at hand (review of whole volumes).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from backend.methods.diffrect.lcc import ImageEncoder, SemanticColoring, SemanticContextEmbedding
from backend.methods.diffrect.lfr import LabelDecoder, LatentDenoiser
from backend.methods.layers.diffusion import ddim_reverse
from backend.methods.layers.embeddings import SinusoidalEmbedding


class Rectifier(nn.Module):
    """LCC (colouring, tau embedding, B_sem, image encoder) and LFR (denoiser, decoder) of DiffRect."""

    def __init__(self, num_classes: int, in_channels: int = 1,
                 bsem_channels: Sequence[int] = (16, 32, 64, 128, 256),
                 bsem_dropout: Sequence[float] | float = (0.05, 0.1, 0.2, 0.3, 0.5),
                 denoiser_channels: Sequence[int] = (384, 512), emb_dim: int = 128, emb_hidden: int = 512,
                 guidance_scale: float = 999.0, use_guidance: bool = True):
        super().__init__()
        self.coloring = SemanticColoring(num_classes)
        self.use_guidance = use_guidance
        self.tau_embed = SinusoidalEmbedding(emb_dim, emb_hidden, scale=guidance_scale)
        self.image_encoder = ImageEncoder(in_channels, bsem_channels, bsem_dropout)
        self.bsem = SemanticContextEmbedding(in_channels, bsem_channels, emb_hidden, bsem_dropout)
        self.denoiser = LatentDenoiser(bsem_channels[-1], denoiser_channels, emb_dim, emb_hidden)
        self.decoder = LabelDecoder(num_classes, bsem_channels, emb_hidden)
        self.register_buffer("tau_ema", torch.tensor(-1.0))  # < 0: not seen any labeled batch yet

    def embed_tau(self, tau: torch.Tensor) -> torch.Tensor | None:
        """The sinusoidal embedding of the calibration guidance (eq. 5); None when guidance is switched off."""
        return self.tau_embed(tau) if self.use_guidance else None

    def encode(self, labels: torch.Tensor, image: torch.Tensor, image_feats: Sequence[torch.Tensor],
               emb: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``z, skips = B_sem(f(labels) || tau)`` (eq. 4-5) for hard labels ``[B, H, W]``."""
        return self.bsem(self.coloring(labels).to(image.dtype), image, image_feats, emb)

    @torch.no_grad()
    def update_tau_ema(self, tau_l: torch.Tensor, decay: float) -> None:
        value = tau_l.float().mean()
        ema = torch.where(self.tau_ema < 0, value, decay * self.tau_ema + (1 - decay) * value)
        self.tau_ema.copy_(ema)

    def inference_tau(self, batch: int, device: torch.device) -> torch.Tensor:
        """tau for rectification without ground truth: the running mean of tau_l (0.5 before any training)."""
        tau = torch.where(self.tau_ema < 0, torch.full_like(self.tau_ema, 0.5), self.tau_ema)
        return tau.to(device).expand(batch)

    def rectify(self, z_cond: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor | None,
                alphas_cumprod: torch.Tensor, timesteps: Sequence[int], eta: float = 0.0,
                generator: torch.Generator | None = None, clamp: float | None = 1.0) -> torch.Tensor:
        """Eq. 12: start from ``r^T ~ N(0, I)``, denoise progressively conditioned on ``z_cond`` (the weak pseudo
        label's latent), and decode the rectified feature to logits of the rectified pseudo label y_r.  Every x0
        prediction is clamped to ``[-clamp, clamp]`` (the published sampler's ``clip_denoised``; None: not)."""
        noise = torch.randn(z_cond.shape, device=z_cond.device, generator=generator)

        def predict_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0 = self.denoiser(x, t, z_cond)
            return x0 if clamp is None else x0.clamp(-clamp, clamp)

        feature = ddim_reverse(alphas_cumprod, predict_x0, noise, timesteps, eta, generator)
        return self.decoder(feature.to(z_cond.dtype), skips, emb)
