"""Which torch device a job runs on (``auto`` picks CUDA, then Apple's MPS, then the CPU), and how many CPU threads.

CPU threads (:func:`cpu_threads`): on the CPU, training and inference use one intra-op thread fewer than the
cores this process may run on (one on a 2-core machine), unless ``$SEMISEG_THREADS`` or ``$OMP_NUM_THREADS``
says otherwise.  PyTorch's OpenMP threads spin-wait for each other at every operator; when another process
(napari's software rendering, a second job, another user) holds one of the cores, a step with as many threads
as cores waits on the descheduled thread at each of its ~1000 small ops.  Measured on the shared 2-core CPU
(supervised ``quick``, same batches, alternating): 2 threads 18-22 s/step, 1 thread 1.5-2.3 s/step, 2 threads
with ``OMP_WAIT_POLICY=PASSIVE`` 2.9-3.6 s/step; on an idle machine 2 threads took 0.32 s/step
(bench/results/speed-cpu-2core.md).  That spin-wait collapse, not the data pipeline or validation, is why the
real pipeline ran 5-20x slower per step than the bench: the bench's compute-only loop and
:func:`backend.engine.training.train` take the same time per step under the same load (17.0 vs 17.0 s/step).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from backend.errors import InputError

THREADS_ENV = "SEMISEG_THREADS"  # intra-op torch threads on the CPU (default: see cpu_threads)


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


# ---- CPU threads -------------------------------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_threads() -> int:
    """Intra-op torch threads for CPU training and inference: ``$SEMISEG_THREADS`` when set, else the current
    count when ``$OMP_NUM_THREADS`` is set (the user's choice, and what ``backend.engine.distributed`` gives each
    rank), else one fewer than :func:`usable_cores` (at least 1), so a core stays free for the viewer and the
    OS (see the module docstring for the measured reason)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise InputError(None, f"${THREADS_ENV} must be a whole number of threads (got '{value}')") from None
        if threads < 1:
            raise InputError(None, f"${THREADS_ENV} must be at least 1 (got {threads})")
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    return max(1, usable_cores() - 1)


@contextlib.contextmanager
def cpu_thread_policy(device: torch.device) -> Iterator[int]:
    """Within the block, torch uses :func:`cpu_threads` intra-op threads when ``device`` is the CPU (restored
    after); yields the thread count in effect."""
    if device.type != "cpu":
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    threads = cpu_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
