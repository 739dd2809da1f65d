"""Diff-VNet of A&D (Wang & Li, NeurIPS 2023, sec. 3.2-3.3): one shared V-Net encoder, two stems, three decoders.

* **Image stem** (``x -> F`` channels): the input of the difficulty-aware flow ``D(psi)`` and the unlabeled flow
  ``D(theta)``; the encoder then runs without a time embedding (``h^{l;psi}``, ``h^u``).
* **Diffusion stem** (``concat([x, y_t]) -> F`` channels): the denoising flow; the encoder runs with the
  time-step embedding of ``t`` (``h^{l;xi}``), which the diffusion decoder ``D(xi)`` also receives.
* **Decoders**: ``decoder_xi`` (time-embedded, predicts ``y_0``: A&D eq. 2), ``decoder_psi`` (difficulty-aware,
  eq. 6) and ``decoder_theta`` (trained only by pseudo labels, eq. 8, and by the EMA transfer
  :func:`ema_transfer`); inference uses the image stem, the encoder and ``decoder_theta`` only.

Where the paper is silent, the published implementation's choices: F = 32, batch norm, a 128-d sinusoidal
time embedding lifted to 512 by Linear-SiLU-Linear, dropout 0.5 on the deepest encoder feature (every flow) and
before each decoder's output convolution.  Built on :mod:`backend.methods.layers.vnet`, whose conv stages are
conv-norm-ReLU and add the projected time embedding after their first convolution (the published code adds
it after more convolutions and also has 0.1 dropout after every convolution; see :class:`DiffVNet`).

The diffusion stem's convolution is split into an image part (with the bias) and a label part (no bias):
``conv([x, y_t]) = conv_x(x) + conv_y(y_t)`` exactly, with the same parameters as one convolution over the
concatenation.  During DDIM sampling only ``y_t`` and ``t`` change between steps, so the image part is computed
once per volume patch (:meth:`DiffVNet.diffusion_context`).  Nothing deeper can be reused: the stem's norm and
ReLU mix both parts and every encoder stage adds the embedding of ``t``.

On CPU, PyTorch sends a float32 ``conv3d`` with batch 1 and a small ``C * D * H`` (the few-channel stem inputs,
the 8x-downsampled deep stages) to its slow im2col path rather than oneDNN (a heuristic tuned for 2D); every
3x3x3 / strided convolution here is routed to oneDNN instead (:func:`prefer_onednn`): same result, 1.5-5x faster
on those layers.
"""
from __future__ import annotations

import torch
from torch import nn

from backend.methods.layers.embeddings import SinusoidalEmbedding
from backend.methods.layers.vnet import ConvStage, VNetDecoder, VNetEncoder, _norm


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN (``torch.mkldnn_convolution``) for float32 CPU inputs with a kernel
    larger than 1 and zero padding, and computes a CPU 1x1x1 convolution as the matrix product it is
    (:func:`pointwise_conv`); everything else (CUDA, autocast for the larger kernels) goes through ``nn.Conv3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1)
                and self.padding == (0, 0, 0) and self.groups == 1):
            return pointwise_conv(x, self.weight, self.bias)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and any(k > 1 for k in self.kernel_size) and _onednn_ok() and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 convolution as ``weight @ x`` over the flattened voxels.  PyTorch's CPU ``conv3d`` takes a
    ``[O, C, 1, 1, 1]`` weight for a channels-last one (its strides fit both layouts) and copies the whole
    full-resolution input to channels-last before its slow path, forward and backward (profiled: 0.45 s of
    17 s CPU in an A&D training step at 64x64x48, F = 32).  The same values forward; gradients to rounding."""
    b, c = x.shape[:2]
    y = torch.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, -1))  # autocast casts both as conv3d
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None]
    return y.view(b, weight.shape[0], *x.shape[2:])


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def prefer_onednn(module: nn.Module) -> nn.Module:
    """Route every plain ``nn.Conv3d`` of ``module`` through :class:`OneDNNConv3d` (parameters untouched)."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d
    return module


class DiffusionStem(nn.Module):
    """``ReLU(norm(conv3x3x3(concat([x, y_t]))))``, with the convolution split by input (see the module doc)."""

    def __init__(self, in_channels: int, num_classes: int, features: int, norm: str = "batch"):
        super().__init__()
        self.image_conv = nn.Conv3d(in_channels, features, 3, padding=1)
        self.label_conv = nn.Conv3d(num_classes, features, 3, padding=1, bias=False)
        self.norm = _norm(norm, features)
        self.act = nn.ReLU(inplace=True)

    def image_term(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the convolution that depends on the image only (bias included)."""
        return self.image_conv(x)

    def forward(self, y_t: torch.Tensor, image_term: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.label_conv(y_t) + image_term))


class DiffVNet(nn.Module):
    """The A&D network.  Spatial sizes must be divisible by 16.

    Flows (all return logits ``[B, K, D, H, W]``):

    * :meth:`denoise` ``(x, y_t, t)`` -> ``D(xi)``'s prediction of ``y_0`` (used as logits by L_deno, eq. 2, and
      clamped to [-1, 1] as the x0 prediction during DDIM sampling);
    * :meth:`psi` ``(x)`` -> ``D(psi)``; :meth:`theta` ``(x)`` -> ``D(theta)`` (the inference path);
    * :meth:`encode_image` gives the shared image-flow features so ``D(psi)`` and ``D(theta)`` can decode the
      same encoder pass.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, features: int = 32, norm: str = "batch",
                 time_embed_dim: int = 128, emb_dim: int = 512, encoder_dropout: float = 0.5,
                 decoder_dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.time_embed = SinusoidalEmbedding(time_embed_dim, emb_dim)
        self.diffusion_stem = DiffusionStem(in_channels, num_classes, features, norm)
        # stage1 of the encoder is the image stem (no time embedding); its deeper stages are time-embedded when
        # given an embedding (denoising flow) and plain otherwise (image flows).
        self.encoder = VNetEncoder(in_channels, features, norm, emb_dim=emb_dim,
                                   stem=ConvStage(1, in_channels, features, norm))
        self.bottleneck_dropout = nn.Dropout3d(encoder_dropout) if encoder_dropout > 0 else nn.Identity()
        self.decoder_xi = VNetDecoder(num_classes, features, norm, emb_dim=emb_dim, dropout=decoder_dropout)
        self.decoder_psi = VNetDecoder(num_classes, features, norm, dropout=decoder_dropout)
        self.decoder_theta = VNetDecoder(num_classes, features, norm, dropout=decoder_dropout)
        prefer_onednn(self)

    # ---- encoder flows -----------------------------------------------------------------------------------------
    def _drop(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats[:-1] + [self.bottleneck_dropout(feats[-1])]

    def encode_image(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features ``h^{l;psi}`` / ``h^u`` of an image (no time embedding)."""
        return self._drop(self.encoder(x))

    def diffusion_context(self, x: torch.Tensor) -> torch.Tensor:
        """What the denoising flow computes from the image alone; reuse it across the DDIM steps of one batch."""
        return self.diffusion_stem.image_term(x)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t)

    def denoise_from_context(self, context: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``D(xi)(E(concat([x, y_t]), t))`` given ``context = diffusion_context(x)``."""
        emb = self.embed_time(t)
        first = self.diffusion_stem(y_t, context)
        feats = self._drop(self.encoder(None, emb, first=first))
        return self.decoder_xi(feats, emb)

    # ---- the three decoders ------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``D(xi)``: the clean label ``y_0`` predicted from the image and the noisy label ``y_t`` (eq. 1-2)."""
        return self.denoise_from_context(self.diffusion_context(x), y_t, t)

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        """``D(psi)``: the difficulty-aware decoder on the image flow."""
        return self.decoder_psi(self.encode_image(x))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """``D(theta)``: the unlabeled-flow decoder, the only one used for the final prediction.  Without
        gradients, the decoder releases each skip feature as soon as it is added (:func:`decode_releasing`)."""
        if torch.is_grad_enabled():
            return self.decoder_theta(self.encode_image(x))
        return decode_releasing(self.decoder_theta, self.encode_image(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta(x)

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def inference_parameters(self) -> int:
        """Parameters used by the inference path (image stem + encoder without its time projections +
        ``D(theta)``)."""
        n = sum(p.numel() for name, p in self.encoder.named_parameters() if ".emb." not in name)
        return n + sum(p.numel() for p in self.decoder_theta.parameters())


@torch.no_grad()
def decode_releasing(decoder: VNetDecoder, feats: list[torch.Tensor]) -> torch.Tensor:
    """``decoder(feats)`` (no time embedding, no gradients) computing the same values with less memory: each
    skip feature is added in place into the upsampled map and dropped from ``feats`` (the caller must hold no
    other reference), so the full-resolution level holds one map fewer at its peak (an 80x112x112 window at F = 32:
    0.12 GiB)."""
    x = feats.pop()
    for up, stage in ((decoder.up5, decoder.stage6), (decoder.up6, decoder.stage7), (decoder.up7, decoder.stage8),
                      (decoder.up8, decoder.stage9)):
        x = up(x)
        x += feats.pop()
        x = stage(x)
    return decoder.out(decoder.dropout(x))


@torch.no_grad()
def ema_transfer(theta: nn.Module, xi: nn.Module, psi: nn.Module, w_ema: float) -> int:
    """A&D's knowledge transfer ``theta = w_ema * theta + (1 - w_ema) * (xi + psi) / 2`` (sec. 3.3, w_ema = 0.99).

    Applied to every parameter of ``theta`` that has a same-named, same-shaped parameter in both ``xi`` and ``psi``
    (the time-embedding projections of ``D(xi)`` have no counterpart); norm running statistics are buffers and
    stay ``theta``'s own, as in the published code.  Returns the number of tensors updated.  One multi-tensor
    (``torch._foreach_*``) kernel per operation over all tensors, the same arithmetic as a loop of
    ``p.lerp_((a + b) * 0.5, 1 - w_ema)``.
    """
    xi_p = dict(xi.named_parameters())
    psi_p = dict(psi.named_parameters())
    thetas, xis, psis = [], [], []
    for name, p in theta.named_parameters():
        a, b = xi_p.get(name), psi_p.get(name)
        if a is None or b is None or a.shape != p.shape or b.shape != p.shape:
            continue
        thetas.append(p)
        xis.append(a.to(p.dtype))
        psis.append(b.to(p.dtype))
    if thetas:
        means = torch._foreach_add(xis, psis)
        torch._foreach_mul_(means, 0.5)
        torch._foreach_lerp_(thetas, means, 1.0 - w_ema)
    return len(thetas)
