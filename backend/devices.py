"""Which torch device a job runs on: ``auto`` picks CUDA, then Apple's MPS, then the CPU."""
from __future__ import annotations

import torch

from backend.errors import InputError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Every device name :func:`pick_device` accepts here, best first, ``"auto"`` excluded.

    With several GPUs, ``cuda`` (the current one) is followed by ``cuda:0``, ``cuda:1``, ...
    """
    names: list[str] = []
    if torch.cuda.is_available():
        names.append("cuda")
        count = torch.cuda.device_count()
        if count > 1:
            names.extend(f"cuda:{i}" for i in range(count))
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name`` (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    A device that is not present here raises :class:`InputError` naming what is available, rather than
    failing later inside the first forward pass.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(None, f"unknown device '{name}' (available: auto, {', '.join(available_devices())})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device '{name}' requested but CUDA is not available "
                                   f"(available: auto, {', '.join(available_devices())})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(None, f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type == "mps":
        if not _mps_available():
            raise InputError(None, f"device '{name}' requested but MPS is not available")
    elif device.type != "cpu":
        raise InputError(None, f"unsupported device '{name}' (available: auto, {', '.join(available_devices())})")
    return device
