"""V-Net as used across 3D semi-supervised segmentation (UA-MT, SSL4MIS, Diff-CL, A&D), optionally time-embedded.

Encoder: five stages of 1/2/3/3/3 (3x3x3 conv + norm + ReLU) with 2x2x2 strided-conv downsampling between them,
``F, 2F, 4F, 8F, 16F`` channels.  Decoder: transposed-conv upsampling, skip connections by addition, stages of
3/3/2/1 convs, dropout, 1x1x1 output conv.  With ``emb_dim`` set, every stage adds a linear projection of a
timestep embedding to its features (the DDPM way of conditioning a conv net on ``t``), which makes the
Diff-VNet of A&D and the DS network of Diff-CL.
"""
from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(16, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization '{kind}'")


class ConvStage(nn.Module):
    """``n`` x (3x3x3 conv, norm, ReLU); with ``emb_dim``, a projected time embedding is added after the first."""

    def __init__(self, n: int, in_ch: int, out_ch: int, norm: str = "batch", emb_dim: int | None = None):
        super().__init__()
        self.convs = nn.ModuleList()
        for i in range(n):
            self.convs.append(nn.Sequential(
                nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), _norm(norm, out_ch), nn.ReLU(inplace=True)
            ))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch)) if emb_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == 0 and self.emb is not None and emb is not None:
                x = x + self.emb(emb)[:, :, None, None, None].to(x.dtype)
        return x


def _down(in_ch: int, out_ch: int, norm: str) -> nn.Module:
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 2, stride=2), _norm(norm, out_ch), nn.ReLU(inplace=True))


def _up(in_ch: int, out_ch: int, norm: str) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2), _norm(norm, out_ch), nn.ReLU(inplace=True))


class VNetEncoder(nn.Module):
    """Returns the five stage outputs ``[x1 (F), x2 (2F), x3 (4F), x4 (8F), x5 (16F)]``."""

    def __init__(self, in_channels: int, features: int = 16, norm: str = "batch", emb_dim: int | None = None,
                 stem: nn.Module | None = None):
        super().__init__()
        f = features
        self.stage1 = stem if stem is not None else ConvStage(1, in_channels, f, norm, emb_dim)
        self.down1 = _down(f, 2 * f, norm)
        self.stage2 = ConvStage(2, 2 * f, 2 * f, norm, emb_dim)
        self.down2 = _down(2 * f, 4 * f, norm)
        self.stage3 = ConvStage(3, 4 * f, 4 * f, norm, emb_dim)
        self.down3 = _down(4 * f, 8 * f, norm)
        self.stage4 = ConvStage(3, 8 * f, 8 * f, norm, emb_dim)
        self.down4 = _down(8 * f, 16 * f, norm)
        self.stage5 = ConvStage(3, 16 * f, 16 * f, norm, emb_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, first: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        """``first`` replaces stage 1's output (for networks with several stems sharing the deeper stages)."""
        x1 = first if first is not None else self.stage1(x, emb)
        x2 = self.stage2(self.down1(x1), emb)
        x3 = self.stage3(self.down2(x2), emb)
        x4 = self.stage4(self.down3(x3), emb)
        x5 = self.stage5(self.down4(x4), emb)
        return [x1, x2, x3, x4, x5]


class VNetDecoder(nn.Module):
    """Decodes the encoder's five features to ``out_channels`` logits; ``return_features`` also gives the last
    feature map (``F`` channels, full resolution) for projection heads."""

    def __init__(self, out_channels: int, features: int = 16, norm: str = "batch", emb_dim: int | None = None,
                 dropout: float = 0.5):
        super().__init__()
        f = features
        self.up5 = _up(16 * f, 8 * f, norm)
        self.stage6 = ConvStage(3, 8 * f, 8 * f, norm, emb_dim)
        self.up6 = _up(8 * f, 4 * f, norm)
        self.stage7 = ConvStage(3, 4 * f, 4 * f, norm, emb_dim)
        self.up7 = _up(4 * f, 2 * f, norm)
        self.stage8 = ConvStage(2, 2 * f, 2 * f, norm, emb_dim)
        self.up8 = _up(2 * f, f, norm)
        self.stage9 = ConvStage(1, f, f, norm, emb_dim)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Conv3d(f, out_channels, 1)

    def forward(self, feats: list[torch.Tensor], emb: torch.Tensor | None = None, return_features: bool = False):
        x1, x2, x3, x4, x5 = feats
        x = self.stage6(self.up5(x5) + x4, emb)
        x = self.stage7(self.up6(x) + x3, emb)
        x = self.stage8(self.up7(x) + x2, emb)
        x = self.stage9(self.up8(x) + x1, emb)
        logits = self.out(self.dropout(x))
        return (logits, x) if return_features else logits


class VNet(nn.Module):
    """Encoder + decoder.  ``forward(x, emb=None)`` returns logits ``[B, out_channels, D, H, W]``; the input's
    spatial size must be divisible by 16."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, features: int = 16, norm: str = "batch",
                 emb_dim: int | None = None, dropout: float = 0.5):
        super().__init__()
        self.encoder = VNetEncoder(in_channels, features, norm, emb_dim)
        self.decoder = VNetDecoder(out_channels, features, norm, emb_dim, dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, return_features: bool = False):
        return self.decoder(self.encoder(x, emb), emb, return_features)
