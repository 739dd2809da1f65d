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
