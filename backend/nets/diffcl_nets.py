"""Diff-CL's networks (Sec. 4, Fig. 1): the CS network, the DS network and the shared projection head.

* CS (convolution segmentation, ``\\hat F``): a V-Net whose bottleneck features pass through the high-frequency
  Mamba module (HFM, eq. 10).
* DS (diffusion segmentation, ``\\tilde F``): a time-embedded V-Net fed the image concatenated with the noised
  one-hot label ``Y_t`` (eq. 5); it predicts the clean label (x0 prediction, Sec. 3.1).
* Projection head ``F``: maps the last decoder features of either network to the ``d``-dimensional space where
  label propagation by contrastive learning (Sec. 4.3) compares them.
"""
from __future__ import annotations

import torch
from torch import nn

from backend.nets.embeddings import SinusoidalEmbedding
from backend.nets.mamba import HighFrequencyMamba
from backend.nets.vnet import VNet, VNetDecoder, VNetEncoder


class CSNet(nn.Module):
    """V-Net with the HFM block at the bottleneck.  ``forward(x) -> (logits, features)`` where ``features`` is the
    last decoder feature map (``features`` channels, full resolution) for the projection head.

    Placement: the paper applies HFM to "3D features of the CS network" without saying which; we put it on the
    deepest encoder output (1/16 resolution, 16F channels), where the tokens are few (216 for a 96^3 patch), so
    the global scans stay cheap, and where every decoder stage receives its output.  Eq. 10's ``F_o`` is built
    from the high-pass part of the features only, so it is added to the features it came from
    (``x5 + HFM(x5)``): replacing them would throw away their low frequencies, the mean included.
    """

    def __init__(self, in_channels: int, num_classes: int, features: int = 16, norm: str = "batch",
                 dropout: float = 0.5, use_hfm: bool = True, hf_threshold: float = 0.8, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, mlp_ratio: float = 2.0, scan_backend: str = "auto",
                 scan_chunk: int | None = None):
        super().__init__()
        self.encoder = VNetEncoder(in_channels, features, norm)
        self.decoder = VNetDecoder(num_classes, features, norm, dropout=dropout)
        self.hfm = HighFrequencyMamba(16 * features, hf_threshold, d_state, d_conv, expand, mlp_ratio,
                                      scan_backend=scan_backend, chunk_size=scan_chunk) if use_hfm else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        if self.hfm is not None:
            feats[4] = feats[4] + self.hfm(feats[4])
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
