"""The 2D U-Net of SSL4MIS-style semi-supervised segmentation (DiffRect's segmentation network, the 2D baseline).

Built from MONAI's ``BasicUNet``: five levels of 16/32/64/128/256 features, two (3x3 conv, BatchNorm,
LeakyReLU, dropout) per level, max-pool down, transposed-conv up with concatenated skips (about 1.8 M
parameters for one input channel, the size DiffRect reports).
"""
from __future__ import annotations

from monai.networks.nets import BasicUNet
from torch import nn

UNET2D_FEATURES = (16, 32, 64, 128, 256, 16)


def unet2d(in_channels: int = 1, num_classes: int = 2, features: tuple[int, ...] = UNET2D_FEATURES,
           dropout: float = 0.1) -> nn.Module:
    """``forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]``; H and W divisible by 16."""
    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, features=features,
                     act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}), norm=("batch", {"affine": True}),
                     dropout=dropout, upsample="deconv")
