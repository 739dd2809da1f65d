"""Diffusion of label maps: the forward process (q_sample) and DDIM sampling, on MONAI's schedulers.

All three methods predict the clean sample x0 (``prediction_type="sample"``); the noise schedule and step
counts are method config values.  MONAI's schedulers give the betas and q_sample; the DDIM reverse process is
written out (:func:`ddim_reverse`) so that it visits exactly the timesteps asked for.  Label maps are diffused as one-hot (or latent) tensors scaled to [-1, 1]
with :func:`to_signed` / :func:`from_signed`, the convention of label-diffusion segmentation models.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def ddim_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """The ``num_steps`` timesteps visited by the reverse process, evenly spaced from ``T - 1`` down to 0
    (``[9, 0]`` for T = 10 and 2 steps: DiffRect's published respacing; ``[999, 888, ..., 0]`` for T = 1000 and
    10 steps), so sampling from pure noise starts at the fully-noised timestep whatever the step count."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"sampling steps must be in [1, {num_train_steps}] (got {num_steps})")
    steps = torch.linspace(num_train_steps - 1, 0, num_steps).round().long().tolist()
    return sorted(set(steps), reverse=True)


def ddim_reverse(alphas_cumprod: torch.Tensor, predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x_T: torch.Tensor, timesteps: Sequence[int], eta: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The progressive reverse diffusion of eq. 12 with an x0-predicting network, over ``timesteps``
    (descending).  Each step ``t -> s`` (s the next timestep, or "clean" after the last):

        x0 = predict_x0(x_t, t),   eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
        sigma = eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma n,   n ~ N(0, I)

    (Song et al. 2021, eq. 12; ``eta = 1`` is the stochastic DDPM step, ``eta = 0`` the deterministic DDIM step).
    Returns the last x0 prediction.

    Written out rather than with MONAI's ``DDIMScheduler.step``, which assumes a stride of ``T // num_steps``
    between timesteps and starts at ``T - T // num_steps`` rather than ``T - 1``: for T = 10 and timesteps [9, 0]
    it steps from 9 to 4 and then asks the network at t = 0 about a sample still at noise level 4, and with
    T = 1000 and 2 steps it starts pure noise at t = 500."""
    abar = alphas_cumprod.to(device=x_T.device, dtype=torch.float32)
    x = x_T.float()
    x0 = x
    steps = list(timesteps)
    for i, t in enumerate(steps):
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0 = predict_x0(x, t_batch).float()
        if i == len(steps) - 1:
            break
        a_t = abar[int(t)]
        a_s = abar[int(steps[i + 1])]
        eps = (x - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()
        sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).sqrt() if eta > 0 else torch.zeros_like(a_t)
        x = a_s.sqrt() * x0 + (1.0 - a_s - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
    return x0


@torch.no_grad()
def ddim_sample(ddim: DDIMScheduler, predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x_T: torch.Tensor, num_inference_steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Reverse diffusion from ``x_T`` in ``num_inference_steps`` DDIM steps over ``ddim``'s noise schedule
    (:func:`ddim_timesteps`, :func:`ddim_reverse`); returns the final x0 prediction."""
    timesteps = ddim_timesteps(ddim.num_train_timesteps, num_inference_steps)
    return ddim_reverse(ddim.alphas_cumprod, predict_x0, x_T, timesteps, eta, generator)
