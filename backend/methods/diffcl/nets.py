"""Diff-CL's networks (Sec. 4, Fig. 1): the CS network, the DS network and the shared projection head.

* CS (convolution segmentation, ``\\hat F``): a V-Net whose encoder features (1/2 to 1/16 resolution) pass
  through the high-frequency Mamba module (HFM, eq. 10).
* DS (diffusion segmentation, ``\\tilde F``): a time-embedded V-Net fed the image concatenated with the noised
  one-hot label ``Y_t`` (eq. 5); it predicts the clean label (x0 prediction, Sec. 3.1).
* Projection head ``F``: maps the last decoder features of either network to the ``d``-dimensional space where
  label propagation by contrastive learning (Sec. 4.3) compares them.
"""
from __future__ import annotations

import torch
from torch import nn

from backend.methods.layers.embeddings import SinusoidalEmbedding
from backend.methods.diffcl.mamba import HighFrequencyMamba
from backend.methods.layers.vnet import VNet, VNetDecoder, VNetEncoder


class CSNet(nn.Module):
    """V-Net with an HFM block on encoder levels ``hfm_levels``.  ``forward(x) -> (logits, features)`` where
    ``features`` is the last decoder feature map (``features`` channels, full resolution) for the projection head.

    Placement: the paper applies HFM to "3D features of the CS network" and takes SA and SM from SegMamba (Xing et
    al. 2024) without naming the levels; SegMamba runs its GSC + ToM blocks on every encoder stage after its
    stride-2 stem, so the default here is every V-Net encoder level below full resolution: 1/2, 1/4, 1/8 and
    1/16 (levels 1-4, ``2^level F`` channels).  The bottleneck alone is not enough: at 1/16 a 96^3 patch is a
    6^3 grid and the 32^3 test patch a 2^3 grid, whose spectrum is only DC and Nyquist, so a high-pass there
    removes the mean and nothing else is "high frequency"; the boundaries and details that HFM is meant to
    capture live on the finer levels.  Full resolution (level 0) is left out, as in SegMamba (and its 96^3 tokens
    would cost the scan ~8x level 1).  Each level's output is added to the features it came from
    (``x_i + HFM_i(x_i)``): eq. 10's ``F_o`` is built from the high-pass part only, so replacing the features
    would throw away their low frequencies, the mean included.  The decoder receives the enhanced features
    through its skip connections.  Cost: level 1 of a 96^3 patch is 110592 tokens; mamba-ssm's CUDA kernel scans
    them in place, while the plain-PyTorch scan keeps ``[b, 2 expand F, L, d_state]`` tensors (1.8 GB each at
    batch 4, F = 16: an estimate of tens of GB for the three directions with autograd, not measured here).
    """

    def __init__(self, in_channels: int, num_classes: int, features: int = 16, norm: str = "batch",
                 dropout: float = 0.5, use_hfm: bool = True, hf_threshold: float = 0.8, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, mlp_ratio: float = 2.0, scan_backend: str = "auto",
                 scan_chunk: int | None = None, hfm_levels: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        if any(level not in range(5) for level in hfm_levels):
            raise ValueError(f"hfm_levels are V-Net encoder levels 0-4, got {tuple(hfm_levels)}")
        self.encoder = VNetEncoder(in_channels, features, norm)
        self.decoder = VNetDecoder(num_classes, features, norm, dropout=dropout)
        self.hfm = nn.ModuleDict({
            str(level): HighFrequencyMamba(features * 2 ** level, hf_threshold, d_state, d_conv, expand, mlp_ratio,
                                           scan_backend=scan_backend, chunk_size=scan_chunk)
            for level in sorted(set(hfm_levels))}) if use_hfm else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        if self.hfm is not None:
            for level, block in self.hfm.items():
                feats[int(level)] = feats[int(level)] + block(feats[int(level)])
        return self.decoder(feats, return_features=True)


class DSNet(nn.Module):
    """Time-conditioned V-Net: ``forward(image, y_t, t) -> (logits of the clean label, features)``.

    The input is ``cat(image, Y_t)`` (``in_channels + num_classes`` channels, eq. 5 and Fig. 1); ``t`` enters
    through a sinusoidal embedding + MLP added in every V-Net stage.
    """

    def __init__(self, in_channels: int, num_classes: int, features: int = 16, norm: str = "batch",
                 dropout: float = 0.5, time_embed_dim: int = 64):
        super().__init__()
        self.time_embed = SinusoidalEmbedding(time_embed_dim)
        self.vnet = VNet(in_channels + num_classes, num_classes, features, norm, emb_dim=self.time_embed.out_dim,
                         dropout=dropout)

    def forward(self, image: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.time_embed(t)
        return self.vnet(torch.cat([image, y_t.to(image.dtype)], dim=1), emb, return_features=True)


class ProjectionHead(nn.Module):
    """``F`` of Fig. 1: Linear-ReLU-Linear on feature vectors ``[N, in_dim] -> [N, out_dim]``.

    Applied to the sampled voxels only (the same as a 1x1x1 conv head on the whole map, without computing the
    voxels that are never compared).  One head shared by DS (labeled features for the memory bank) and CS
    (unlabeled features), as Table 1 names a single ``F``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
