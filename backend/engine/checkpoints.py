"""A run's files and its checkpoints.

``checkpoint.pt`` / ``best.pt``: ``{"format", "method_name", "method": Method.state_dict(), "step", "config",
"rng", "sampler"}``, plain containers and tensors only, so they load with ``torch.load(..., weights_only=True)``;
written to a temp file and renamed, so a crash never leaves half a checkpoint.  ``run.json``, ``config.json`` and
``metrics.jsonl`` sit beside them (see :mod:`backend.engine.training`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.methods.base import Method
from backend.project.runs import BEST, CHECKPOINT

CHECKPOINT_FORMAT = 1


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents on the CPU (``weights_only=True``: nothing but tensors and plain data)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


# ---- RNG state (weights_only-safe) ----------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)



@dataclasses.dataclass
class RunFiles:
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.folder / BEST

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop lines past ``step`` (written after the checkpoint a run resumes from)."""
        if not self.metrics.is_file():
            return
        keep = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics)


def save_checkpoint(files: RunFiles, method: Method, method_name: str, step: int, sampler_state: dict,
                     path: Path | None = None) -> Path:
    state = {
        "format": CHECKPOINT_FORMAT,
        "method_name": method_name,
        "method": method.state_dict(),
        "step": int(step),
        "config": json.loads(method.config.to_json()),
        "rng": rng_state(method.device),
        "sampler": dict(sampler_state),
    }
    path = files.checkpoint if path is None else path
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
