"""DiffRect's Latent Feature Rectification module (LFR, paper section 2.3): denoiser, decoder, reverse process.

* :class:`LatentDenoiser`: the denoising U-Net epsilon of eq. 8-12 on B_sem latents (down and up by 4x, two 3x3
  convs per stage, time-embedded, conditioned on the coarser label's latent by concatenation).  It predicts the
  clean latent (x0), the published implementation's choice, so eq. 9 / 11 compare its output with z directly.
* :class:`LabelDecoder`: ``y_r = Upsample(r)`` (eq. 12): the rectified latent back to class logits at the input
  resolution, with the skips of the conditioning label's B_sem stages (a U-Net decoder; the paper names only
  "Upsample", the published code uses this decoder).
* the progressive reverse diffusion of eq. 12 is :func:`backend.methods.layers.diffusion.ddim_reverse` (DDIM steps).
* :func:`latent_loss`: eq. 9 / 11.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backend.methods.diffrect.lcc import ConvBlock
from backend.methods.layers.embeddings import SinusoidalEmbedding


class LatentDenoiser(nn.Module):
    """``epsilon(z_t, t, z_cond) -> z_0`` on ``[B, L, h, w]`` latents (h, w divisible by 4).

    The noisy latent and the condition are concatenated and fused by a 1x1 conv (conditioning by concatenation,
    section 3.1), then two down stages (2x max-pool, ConvBlock to ``channels[0]`` then ``channels[1]``: 4x
    down in all), two up stages (2x transposed conv, skip concatenation, ConvBlock) and a 1x1 output conv.  Every
    ConvBlock adds a projection of the sinusoidal embedding of t.  The published denoiser has the same stages
    (256 -> 384 -> 512 channels for a 256-channel latent); the fusing and output 1x1 convs are this
    implementation's (the published one adds the condition to the first skip and ends on BN + LeakyReLU)."""

    def __init__(self, latent_channels: int = 256, channels: Sequence[int] = (384, 512), emb_dim: int = 128,
                 emb_hidden: int = 512):
        super().__init__()
        c0 = latent_channels
        c1, c2 = channels
        self.time_embed = SinusoidalEmbedding(emb_dim, emb_hidden)
        self.fuse = nn.Conv2d(2 * c0, c0, 1)
        self.down1 = ConvBlock(c0, c1, emb_hidden)
        self.down2 = ConvBlock(c1, c2, emb_hidden)
        self.up2 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = ConvBlock(2 * c1, c1, emb_hidden)
        self.up1 = nn.ConvTranspose2d(c1, c0, 2, stride=2)
        self.dec0 = ConvBlock(2 * c0, c0, emb_hidden)
        self.out = nn.Conv2d(c0, c0, 1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        h0 = self.fuse(torch.cat([z_t.to(cond.dtype), cond], dim=1))
        h1 = self.down1(F.max_pool2d(h0, 2), emb)
        h2 = self.down2(F.max_pool2d(h1, 2), emb)
        u1 = self.dec1(torch.cat([h1, self.up2(h2)], dim=1), emb)
        u0 = self.dec0(torch.cat([h0, self.up1(u1)], dim=1), emb)
        return self.out(u0)


class LabelDecoder(nn.Module):
    """``Upsample`` of eq. 12: latent ``[B, L, H/16, W/16]`` to logits ``[B, num_classes, H, W]``.

    Four up stages (2x transposed conv to the skip's channels, concatenation with the skip, ConvBlock with the
    tau embedding added) mirroring B_sem, then a 3x3 output conv."""

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256), emb_dim: int = 512):
        super().__init__()
        channels = list(channels)
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for k in range(len(channels) - 2, -1, -1):  # 3, 2, 1, 0
            self.ups.append(nn.ConvTranspose2d(channels[k + 1], channels[k], 2, stride=2))
            self.blocks.append(ConvBlock(2 * channels[k], channels[k], emb_dim))
        self.out = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def forward(self, latent: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor | None) -> torch.Tensor:
        x = latent
        for up, block, skip in zip(self.ups, self.blocks, reversed(list(skips))):
            x = block(torch.cat([skip, up(x.to(skip.dtype))], dim=1), emb)
        return self.out(x)


def latent_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 9 / 11: ``E ||z - r||^2`` (mean squared error, as the published code; the mean rather than the sum
    keeps the weights lambda_1, lambda_2 independent of the latent's size)."""
    return F.mse_loss(pred.float(), target.float())


