"""Diffusion of label maps: the forward process (q_sample) and DDIM sampling, on MONAI's schedulers.

All three methods predict the clean sample x0 (``prediction_type="sample"``); the noise schedule and step
counts are method config values.  Label maps are diffused as one-hot (or latent) tensors scaled to [-1, 1]
with :func:`to_signed` / :func:`from_signed`, the convention of label-diffusion segmentation models.
"""
from __future__ import annotations

from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler


def make_schedulers(num_steps: int, schedule: str = "linear_beta", **schedule_args
                    ) -> tuple[DDPMScheduler, DDIMScheduler]:
    """A DDPM scheduler (training: q_sample) and a DDIM scheduler (sampling) over the same betas.
    ``schedule``: ``"linear_beta"`` (Ho et al.) or ``"cosine"`` (Nichol & Dhariwal)."""
    ddpm = DDPMScheduler(num_steps, schedule=schedule, prediction_type="sample", clip_sample=False, **schedule_args)
    ddim = DDIMScheduler(num_steps, schedule=schedule, prediction_type="sample", clip_sample=False, **schedule_args)
    return ddpm, ddim


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def from_signed(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) / 2.0


def q_sample(ddpm: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4; DiffRect eq. 1/7, A&D eq. 1, Diff-CL eq. 5)."""
    noise = torch.randn_like(x0) if noise is None else noise
    return ddpm.add_noise(x0, noise, t.to(x0.device))


def sample_timesteps(ddpm: DDPMScheduler, batch: int, device: torch.device) -> torch.Tensor:
    """Uniform t in [0, T) per batch element."""
    return torch.randint(0, ddpm.num_train_timesteps, (batch,), device=device, dtype=torch.long)


@torch.no_grad()
def ddim_sample(ddim: DDIMScheduler, predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x_T: torch.Tensor, num_inference_steps: int, eta: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM reverse process (eta = 0) from ``x_T`` with ``num_inference_steps`` steps.

    ``predict_x0(x_t, t)`` is the network's clean-sample prediction; each step applies
    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps_hat (Song et al. 2021, eq. 12).
    Returns the final x0 prediction.
    """
    ddim.set_timesteps(num_inference_steps, device=x_T.device)
    x = x_T
    x0 = x_T
    for t in ddim.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0 = predict_x0(x, t_batch)
        x, _ = ddim.step(x0, int(t), x, eta=eta)
    return x0
