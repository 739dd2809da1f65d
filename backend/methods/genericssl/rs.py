"""A&D's Reparameterize & Smooth (RS) pseudo labels (sec. 3.3, eq. 7).

``y = argmax(Smooth(GumbelSoftmax(p^{u;xi})) + Softmax(p^{u;psi}))``: the domain-unbiased map ``p^{u;xi}`` (the DDIM
x0 prediction of the diffusion flow, in [-1, 1]) is too confident to be summed as is, so it is re-parameterised
with the Gumbel-softmax and the noise this adds is removed with a Gaussian blur; the class-unbiased map
``p^{u;psi}`` (logits of ``D(psi)``) enters through a softmax.  Where the paper is silent, the published code's
choices: the Gumbel-softmax temperature 1 on the clamped x0 map, a normalised 3x3x3 Gaussian kernel with
sigma 1, zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d


def gaussian_smooth(x: torch.Tensor, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Channel-wise Gaussian blur with a normalised, sampled ``kernel_size``-wide kernel and zero padding."""
    radius = (kernel_size - 1) // 2
    if radius <= 0:
        return x
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=radius / sigma, approx="sampled", normalize=True)
    return separable_filtering(x, kernel.to(x.device, x.dtype), mode="zeros")


def domain_unbiased_map(x0: torch.Tensor, tau: float = 1.0, kernel_size: int = 3, sigma: float = 1.0
                        ) -> torch.Tensor:
    """``Smooth(GumbelSoftmax(x0))`` of eq. 7 (random: a fresh Gumbel draw per call)."""
    return gaussian_smooth(F.gumbel_softmax(x0.float(), tau=tau, hard=False, dim=1), kernel_size, sigma)


def rs_terms(x0: torch.Tensor, logits_psi: torch.Tensor, tau: float = 1.0, kernel_size: int = 3,
             sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of eq. 7: ``Smooth(GumbelSoftmax(x0))`` (domain-unbiased) and ``Softmax(p^{u;psi})``
    (class-unbiased), each ``[B, K, ...]``."""
    return domain_unbiased_map(x0, tau, kernel_size, sigma), torch.softmax(logits_psi.float(), dim=1)


def rs_scores(x0: torch.Tensor, logits_psi: torch.Tensor, tau: float = 1.0, kernel_size: int = 3,
              sigma: float = 1.0) -> torch.Tensor:
    """The summed class scores of eq. 7, ``[B, K, ...]``; their argmax is the pseudo label."""
    domain, klass = rs_terms(x0, logits_psi, tau, kernel_size, sigma)
    return domain + klass


def rs_pseudo_label(x0: torch.Tensor, logits_psi: torch.Tensor, tau: float = 1.0, kernel_size: int = 3,
                    sigma: float = 1.0) -> torch.Tensor:
    """The RS pseudo label ``[B, 1, ...]`` (int64) of eq. 7."""
    return rs_scores(x0, logits_psi, tau, kernel_size, sigma).argmax(dim=1, keepdim=True)
