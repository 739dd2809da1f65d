"""Sinusoidal embeddings of scalars (diffusion timesteps, DiffRect's calibration guidance tau)."""
from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """``value -> MLP(sinusoidal(value * scale))``: the transformer/DDPM embedding (MONAI's
    ``get_timestep_embedding``) followed by Linear-SiLU-Linear.  ``scale`` lifts values in [0, 1] (a Dice
    score) to the range where the sinusoids separate them (DiffRect embeds tau this way, eq. 5-6)."""

    def __init__(self, dim: int, out_dim: int | None = None, scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.scale = scale
        out_dim = out_dim or 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = values.reshape(-1).float() * self.scale
        return self.mlp(get_timestep_embedding(values, self.dim).to(self.mlp[0].weight.dtype))
