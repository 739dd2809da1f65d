"""The supervised baseline: one network trained on the labeled cases alone with Dice + cross-entropy.

Every semi-supervised paper reports this row ("V-Net, labeled only" / "U-Net, labeled only"): it is the bar the
semi-supervised methods must clear, and a quick, dependable pseudo-labeller for a new project.

* ``supervised``: the 3D V-Net of ``backend.methods.layers.vnet`` (UA-MT / SSL4MIS's LA baseline), sliding-window inference.
* ``supervised2d``: the 2D U-Net of ``backend.methods.layers.unet2d`` (SSL4MIS's ACDC baseline), slice-wise inference.

Loss: MONAI ``DiceCELoss`` (softmax, one-hot targets): ``L = 0.5 (L_CE + L_Dice)``, the supervised loss of the
UA-MT / SSL4MIS baselines (``lambda_ce = lambda_dice = 0.5``).  The ``tiny`` and ``quick`` presets weight both
terms 1.0, which for SGD is a doubled step size: they must converge within a few hundred steps.  The unlabeled
half of each batch is ignored; presets that mirror a paper keep its batch shape (e.g. 2 labeled + 2 unlabeled) so
step timings compare with the SSL methods.
One review view, ``prediction``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from backend.methods.base import BaseConfig, Method, argmax_uint8


@dataclasses.dataclass
class SupervisedConfig(BaseConfig):
    """V-Net defaults of the 3D SSL papers on the Left Atrium set (UA-MT, Diff-CL, A&D): 16 base features,
    batch norm, dropout 0.5 before the output conv, SGD lr 0.01 momentum 0.9 weight decay 1e-4, poly decay."""

    patch_size: tuple[int, ...] = (80, 112, 112)  # (D, H, W) = LA's 112x112x80 in [z, y, x] order
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    max_steps: int = 6000
    features: int = 16
    norm: str = "batch"
    dropout: float = 0.5
    lambda_dice: float = 0.5
    lambda_ce: float = 0.5


@dataclasses.dataclass
class Supervised2DConfig(BaseConfig):
    """2D U-Net defaults of SSL4MIS on ACDC: 256x256 slices, 24 slices a batch (12 labeled), 30k steps."""

    patch_size: tuple[int, ...] = (256, 256)
    batch_labeled: int = 12
    batch_unlabeled: int = 12
    max_steps: int = 30000
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    dropout: float = 0.1
    lambda_dice: float = 0.5
    lambda_ce: float = 0.5
    sw_batch_size: int = 8


class Supervised(Method):
    """3D V-Net trained on labeled patches only."""

    name = "supervised"
    dims = 3
    config_class = SupervisedConfig
    views = ("prediction",)
    primary_view = "prediction"
    presets = {
        # tests: 200 small steps on 2 CPU cores (no dropout, unit loss weights: it must fit its volume quickly)
        "tiny": dict(features=4, patch_size=(32, 32, 32), batch_labeled=2, batch_unlabeled=0, max_steps=200,
                     checkpoint_every=50, val_every=100, dropout=0.0, sw_batch_size=8, sw_overlap=0.25,
                     lambda_ce=1.0, lambda_dice=1.0),
        # a CPU demo in a few minutes
        "quick": dict(features=8, patch_size=(48, 48, 48), batch_labeled=2, batch_unlabeled=0, max_steps=400,
                      checkpoint_every=100, val_every=200, sw_batch_size=4, sw_overlap=0.25,
                      lambda_ce=1.0, lambda_dice=1.0),
        # the SSL papers' LA setting: V-Net F=16, 112x112x80, batch 4 (2 labeled), lr 0.01, 6000 steps
        "la": dict(features=16, patch_size=(80, 112, 112), batch_labeled=2, batch_unlabeled=2, lr=0.01,
                   max_steps=6000, checkpoint_every=500, val_every=500, hold_out_from=None),
    }

    def __init__(self, config: SupervisedConfig, device: torch.device | str = "cpu"):
        super().__init__(config, device)
        from monai.losses import DiceCELoss

        self.net = self.to_device(self.build_network())
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=config.lambda_dice,
                                  lambda_ce=config.lambda_ce)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, nesterov=config.nesterov)

    def build_network(self) -> torch.nn.Module:
        from backend.methods.layers.vnet import VNet

        c = self.config
        return VNet(c.in_channels, c.num_classes, features=c.features, norm=c.norm, dropout=c.dropout)

    # ---- contract ------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.net(labeled["image"])
        loss = self.loss_fn(logits.float(), labeled["label"])
        self.backward_and_step(loss, self.optimizer)
        return {"loss": float(loss.detach())}

    def _probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prob": torch.softmax(self.net(x).float(), dim=1)}

    @torch.no_grad()
    def predict(self, volume: torch.Tensor) -> np.ndarray:
        self.net.eval()
        return argmax_uint8(self.infer_volume(volume, self._probabilities)["prob"])

    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        return {"prediction": self.predict(volume)}

    @torch.no_grad()
    def primary_probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """The network's softmax over the whole volume (its arg-max is ``prediction``)."""
        self.net.eval()
        return self.infer_volume(volume, lambda batch: {"p": torch.softmax(self.net(batch).float(), dim=1)})["p"]


class Supervised2D(Supervised):
    """2D U-Net trained on labeled axial slices only; inference slice by slice."""

    name = "supervised2d"
    dims = 2
    config_class = Supervised2DConfig
    presets = {
        "tiny": dict(features=(4, 8, 16, 32, 64, 4), patch_size=(64, 64), batch_labeled=4, batch_unlabeled=0,
                     max_steps=200, checkpoint_every=50, val_every=100, dropout=0.0, lambda_ce=1.0, lambda_dice=1.0),
        "quick": dict(features=(8, 16, 32, 64, 128, 8), patch_size=(128, 128), batch_labeled=8, batch_unlabeled=0,
                      max_steps=1000, checkpoint_every=200, val_every=250, lambda_ce=1.0, lambda_dice=1.0),
        # SSL4MIS's ACDC setting: 256x256, batch 24 (12 labeled), lr 0.01, 30000 steps
        "acdc": dict(patch_size=(256, 256), batch_labeled=12, batch_unlabeled=12, lr=0.01, max_steps=30000,
                     checkpoint_every=1000, val_every=1000, hold_out_from=None),
    }

    def build_network(self) -> torch.nn.Module:
        from backend.methods.layers.unet2d import unet2d

        c = self.config
        return unet2d(c.in_channels, c.num_classes, features=tuple(c.features), dropout=c.dropout)


METHODS = [Supervised, Supervised2D]
