"""Inference copies of DiffRect's networks with every BatchNorm folded into the convolution before it.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * gamma / sqrt(var + eps)`` and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same
function, one pass over the feature map fewer per layer (about 15% of a CPU U-Net forward).  Handles the two
layouts in DiffRect's nets: a ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential``, and
MONAI's ``Convolution`` block (``conv`` then ``adn`` whose first layer is the norm).
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fusable(conv: nn.Module, norm: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats
            and norm.running_mean is not None and conv.out_channels == norm.num_features)


def _fuse_in_place(module: nn.Module) -> int:
    count = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if _fusable(conv, norm):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
                count += 1
            # MONAI Convolution: Sequential(conv, adn=Sequential(N, D, A)) with the norm first in adn
            elif type(conv) is nn.Conv2d and isinstance(norm, nn.Sequential) and len(norm._modules):
                first_in_adn = next(iter(norm._modules))
                if _fusable(conv, norm._modules[first_in_adn]):
                    module._modules[first] = fuse_conv_bn_eval(conv, norm._modules[first_in_adn])
                    norm._modules[first_in_adn] = nn.Identity()
                    count += 1
    for child in module.children():
        count += _fuse_in_place(child)
    return count


def fused_for_inference(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``module`` with conv + BatchNorm pairs folded; ``module`` is left as it is."""
    fused = copy.deepcopy(module).eval()
    _fuse_in_place(fused)
    return fused
