"""Small real training jobs for the job tests (local runner, SLURM through submitit, faults): a spec, waiting for
an event, and the job's logs for an assertion message."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from backend.jobs import read_events

# The tiny preset with 16^3 patches and no window overlap: a step and the final validation stay cheap on 2 cores.
SMALL = {"patch_size": [16, 16, 16], "batch_labeled": 2, "sw_overlap": 0.0, "sw_batch_size": 64,
         "val_every": 1000, "checkpoint_every": 2}
TIMEOUT = 240.0


def train_spec(steps: int, overrides: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A job spec training ``supervised`` (tiny, :data:`SMALL` plus ``overrides``) for ``steps`` on the CPU."""
    spec = {"kind": "train", "method": "supervised", "preset": "tiny", "steps": steps, "device": "cpu",
            "overrides": {**SMALL, **(overrides or {})}}
    spec.update(extra)
    return spec


def job_log(root: Path, job_id: str) -> str:
    """The tail of the job's log.txt and of submitit's task logs (a SLURM job's), for assertion messages."""
    folder = Path(root) / "semiseg" / "jobs" / job_id
    logs = [folder / "log.txt", *sorted((folder / "submitit").glob("*_log.*"))]
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())


def wait_for_event(root: Path, job_id: str, kind: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Every event up to and including the first of type ``kind``; fails if the job ends first."""
    seen: list[dict[str, Any]] = []
    offset, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        events, offset = read_events(root, job_id, offset)
        for event in events:
            seen.append(event)
            if event["type"] == kind:
                return seen
            assert event["type"] not in ("done", "cancelled", "error"), f"job ended early: {event}"
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event within {timeout} s; log:\n{job_log(root, job_id)}")
