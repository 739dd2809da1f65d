"""The method contract every segmentation method implements, and what they share.

A method owns its networks, optimizers and losses.  The engine (``backend.engine.training``) feeds it batches and
sets the learning rate; ``backend.engine.inference`` asks it for pseudo labels of whole volumes.

Batches (tensors already on the method's device, intensities already normalised by ``backend.engine.data``):

* ``labeled = {"image": float32 [B, C, *patch], "label": int64 [B, 1, *patch]}``
* ``unlabeled = {"image": float32 [B, C, *patch]}``

``patch`` is ``(H, W)`` for 2D methods (``dims = 2``: slices taken along z) and ``(D, H, W)`` for 3D ones.
Volumes handed to :meth:`Method.pseudo_labels` / :meth:`Method.predict` are float32 ``[C, Z, Y, X]`` tensors
(normalised); results are uint8 ``[Z, Y, X]`` numpy arrays.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
from typing import Any, Callable, ClassVar

import numpy as np
import torch


@dataclasses.dataclass
class BaseConfig:
    """Fields every method has.  Subclasses add their paper's hyper-parameters with the paper's defaults."""

    num_classes: int = 2
    in_channels: int = 1
    patch_size: tuple[int, ...] = (96, 96, 96)
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    max_steps: int = 30000
    poly_power: float = 0.9  # lr = base_lr * (1 - step / max_steps) ** poly_power (SSL4MIS / nnU-Net)
    checkpoint_every: int = 500
    val_every: int = 200
    sw_overlap: float | tuple[float, ...] = 0.5  # sliding-window overlap at inference (3D); per axis (D, H, W) as MONAI
    sw_batch_size: int = 4
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 with a grad scaler)
    channels_last: bool = True  # memory format on CUDA
    seed: int = 0
    # Validation split (chosen; the papers train on every labeled case and score on a separate test split): from
    # this many labeled cases on, one (picked by the seed) is held out for validation; below it, or with None,
    # every labeled case is trained on and validation runs on them.  In a review loop a just-accepted correction
    # then always joins training, and with 2-4 labeled cases nothing is taken away from the supervision.  The
    # paper presets set None, as the papers do.
    hold_out_from: int | None = 5
    # Preprocessing of the paper preset (None: the volume as stored).  ``target_spacing`` (x, y, z) mm resamples
    # every case to that grid before training and inference (pseudo labels are resampled back to the case's own
    # grid); ``intensity_window`` (lo, hi) clips intensities before normalisation (e.g. the CT window of a paper).
    target_spacing: tuple[float, float, float] | None = None
    intensity_window: tuple[float, float] | None = None

    # Config fields counted in training steps that belong to the run length (ramp-ups, the step a loss switches
    # on, ...): :meth:`with_steps` rescales them so that a shortened run is a shortened paper run.  Methods
    # extend this tuple with their own schedule fields.
    run_length_fields: ClassVar[tuple[str, ...]] = ()

    def with_steps(self, steps: int) -> "BaseConfig":
        """A copy that trains for ``steps`` steps, every field of :attr:`run_length_fields` scaled by
        ``steps / max_steps`` (rounded, at least 1 where it was positive), so each schedule keeps its place
        relative to the run's end."""
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1 (got {steps})")
        ratio = steps / self.max_steps
        changes: dict[str, Any] = {"max_steps": steps}
        for name in self.run_length_fields:
            value = getattr(self, name)
            scaled = value * ratio
            changes[name] = max(1, int(round(scaled))) if value > 0 else value
            if isinstance(value, float):
                changes[name] = float(scaled)
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


class Method(abc.ABC):
    """Base class of all methods.  Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    dims: ClassVar[int]  # 2: slice-wise on volumes; 3: patch-wise with sliding-window inference
    config_class: ClassVar[type[BaseConfig]] = BaseConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # preset name -> overrides of the config defaults
    views: ClassVar[tuple[str, ...]] = ()  # names of the pseudo-label views pseudo_labels() returns
    primary_view: ClassVar[str] = ""  # the view that predict() returns and that export / "start from" default to

    def __init__(self, config: BaseConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self._scaler: torch.amp.GradScaler | None = None
        # Set by the engine under torch.distributed: averages the gradients of the given parameters across
        # ranks between backward and the optimizer step (see backend.engine.training).
        self.grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None

    # ---- configuration -------------------------------------------------------------------------------------
    @classmethod
    def make_config(cls, preset: str | None = None, **overrides: Any) -> BaseConfig:
        """The config of ``preset`` (the paper's defaults when None), with ``overrides`` on top."""
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise KeyError(f"method '{cls.name}' has no preset '{preset}' (presets: {', '.join(cls.presets)})")
            values.update(cls.presets[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.config_class(**values)

    # ---- the contract ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer; the engine sets their learning rate each step (see :meth:`lr_at`)."""

    @abc.abstractmethod
    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        """One optimisation step (zero_grad, forward, backward, optimizer step).  Returns scalars to log:
        losses, calibration Dice, loss weights."""

    @abc.abstractmethod
    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """Every review view of one normalised ``[C, Z, Y, X]`` volume: ``{view: uint8 [Z, Y, X]}``."""

    @abc.abstractmethod
    def predict(self, volume: torch.Tensor) -> np.ndarray:
        """The method's final segmentation of one normalised volume (uint8 ``[Z, Y, X]``)."""

    def primary_probabilities(self, volume: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities ``[K, Z, Y, X]`` whose arg-max is the primary view of ``volume`` (the review's
        entropy and test-time-augmentation scores, :mod:`backend.engine.scores`); None when the method has none."""
        return None

    @abc.abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every network by name (state dicts, train/eval mode, DDP wrapping)."""

    def extra_state(self) -> dict[str, Any]:
        """Non-network state to checkpoint (memory banks, EMA buffers, ...). Tensors and plain data only."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: poly decay by default (override for the method's own schedule)."""
        c = self.config
        return c.lr * (1.0 - min(step, c.max_steps - 1) / c.max_steps) ** c.poly_power

    # ---- shared mechanics ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": [o.state_dict() for o in self.optimizers()],
            "extra": self.extra_state(),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in self.modules().items():
            module.load_state_dict(state["modules"][key])
        for optimizer, saved in zip(self.optimizers(), state.get("optimizers", [])):
            optimizer.load_state_dict(saved)
        self.load_extra_state(state.get("extra", {}))
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])

    def train(self, mode: bool = True) -> "Method":
        for module in self.modules().values():
            module.train(mode)
        return self

    def eval(self) -> "Method":
        return self.train(False)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None when autocast is off (CPU, or ``config.amp`` False)."""
        if not self.config.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` then ``optimizer.step()``, through a grad scaler when autocasting to fp16."""
        scaled = self.amp_dtype == torch.float16
        if scaled and self._scaler is None:
            self._scaler = torch.amp.GradScaler(self.device.type)
        (self._scaler.scale(loss) if scaled else loss).backward()
        if self.grad_sync is not None:
            self.grad_sync([p for group in optimizer.param_groups for p in group["params"]])
        if scaled:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()

    def to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a network to the method's device (channels-last on CUDA when configured)."""
        module = module.to(self.device)
        if self.device.type == "cuda" and self.config.channels_last:
            fmt = torch.channels_last if self.dims == 2 else torch.channels_last_3d
            module = module.to(memory_format=fmt)
        return module

    # ---- whole-volume inference helpers (one way to do each, shared by all methods) ------------------------
    @torch.no_grad()
    def infer_volume(self, volume: torch.Tensor,
                     predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Run ``predictor`` over a whole ``[C, Z, Y, X]`` volume and return ``{name: [K, Z, Y, X]}`` maps.

        ``predictor`` maps a batch ``[B, C, *patch]`` to a dict of ``[B, K, *patch]`` tensors (probabilities or
        logits).  3D methods: MONAI sliding-window inference over ``config.patch_size`` with
        ``config.sw_overlap``, :meth:`window_batch` windows at a time and Gaussian blending.  2D methods:
        every z slice, in batches, padded to a multiple of 16.
        """
        x = volume.to(self.device, torch.float32)
        with self.autocast():
            if self.dims == 3:
                from monai.inferers import sliding_window_inference

                out = sliding_window_inference(
                    x[None], roi_size=tuple(self.config.patch_size), sw_batch_size=self.window_batch(),
                    predictor=predictor, overlap=self.config.sw_overlap, mode="gaussian",
                )
                return {k: v[0].float() for k, v in out.items()}
            return self._infer_slices(x, predictor)

    def window_batch(self) -> int:
        """Sliding windows per network call (2D methods: 4x as many slices): ``config.sw_batch_size`` (methods
        measure and override per device)."""
        return self.config.sw_batch_size

    def _infer_slices(self, x: torch.Tensor,
                      predictor: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from monai.transforms import DivisiblePad

        c, z, y, w = x.shape
        slices = x.permute(1, 0, 2, 3)  # [Z, C, Y, X]
        pad = DivisiblePad(k=16, mode="constant")
        padded = torch.stack([torch.as_tensor(pad(s)) for s in slices]) if (y % 16 or w % 16) else slices
        outputs: dict[str, list[torch.Tensor]] = {}
        batch = max(1, self.window_batch() * 4)
        for start in range(0, z, batch):
            for key, value in predictor(padded[start:start + batch]).items():
                outputs.setdefault(key, []).append(value.float())
        y0 = (padded.shape[-2] - y) // 2
        x0 = (padded.shape[-1] - w) // 2
        return {k: torch.cat(v)[..., y0:y0 + y, x0:x0 + w].permute(1, 0, 2, 3) for k, v in outputs.items()}


def argmax_uint8(maps: torch.Tensor) -> np.ndarray:
    """``[K, Z, Y, X]`` class scores to a uint8 label volume."""
    return maps.argmax(0).to(torch.uint8).cpu().numpy()

