"""Element-wise dropout that is cheap on CPU (DiffRect's nets have dropout in almost every conv stage).

``torch.nn.Dropout`` draws one Bernoulli variate per element, which on CPU costs as much as a 3x3 convolution of
a 16-channel map.  :class:`FastDropout` draws 64 random bits per four elements instead (one ``randint`` over
int64, viewed as int16) and drops an element when its 16 bits fall below ``round(p * 65536)``: the same
dropout with ``p`` rounded to a multiple of 1/65536 (a 0.1 becomes 0.0999908), the kept elements scaled by
``1 / (1 - p)`` of that rounded p, so the layer stays unbiased.  On other devices it is ``F.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 65536


class FastDropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)`` (element-wise, training mode only)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1) (got {p})")
        self.p = float(p)
        self.threshold = int(round(self.p * _LEVELS))
        self.scale = 1.0 / (1.0 - self.threshold / _LEVELS)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:n]
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            b, c, h, w = x.shape
            bits = bits.view(b, h, w, c).permute(0, 3, 1, 2)  # iid bits: any layout; this one matches x's
        else:
            bits = bits.view(x.shape)
        keep = bits >= (-(_LEVELS // 2) + self.threshold)
        return torch.where(keep, x * self.scale, torch.zeros((), dtype=x.dtype, device=x.device))


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``module`` by a :class:`FastDropout` of the same p (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module


ENCODER_LEVELS = ("conv_0", "down_1", "down_2", "down_3", "down_4")  # MONAI BasicUNet's encoder, top to bottom


def ssl4mis_dropout(unet: nn.Module, rates: tuple[float, ...] | float) -> nn.Module:
    """Dropout of a MONAI ``BasicUNet`` as the SSL4MIS U-Net has it (the segmentation net of DiffRect's published
    code): in the encoder only, one dropout per level between its two convolutions, with ``rates[k]`` at level
    k (SSL4MIS: 0.05, 0.1, 0.2, 0.3, 0.5), none in the decoder.  MONAI puts a dropout after both convolutions of
    every level; each is replaced here (in place) by a :class:`FastDropout` of the level's rate on the first
    convolution and an identity elsewhere.  MONAI's order (norm, dropout, LeakyReLU) equals SSL4MIS's (norm,
    LeakyReLU, dropout): LeakyReLU is positively homogeneous and maps 0 to 0."""
    rates = (float(rates),) * len(ENCODER_LEVELS) if isinstance(rates, (int, float)) else tuple(rates)
    if len(rates) != len(ENCODER_LEVELS):
        raise ValueError(f"need {len(ENCODER_LEVELS)} encoder dropout rates (got {len(rates)})")
    for name, child in unet.named_children():
        two_conv = getattr(child, "convs", child)  # Down / UpCat hold their TwoConv as .convs
        for conv_name in ("conv_0", "conv_1"):
            adn = getattr(getattr(two_conv, conv_name, None), "adn", None)
            if adn is None or "D" not in adn._modules:
                continue
            rate = rates[ENCODER_LEVELS.index(name)] if name in ENCODER_LEVELS and conv_name == "conv_0" else 0.0
            adn._modules["D"] = FastDropout(rate) if rate > 0 else nn.Identity()
    return unet
