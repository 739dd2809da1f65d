"""Where a job lives on disk, its id and its spec.

::

    semiseg/jobs/train.lock           one training job per project (see backend.io.filelock)
    semiseg/jobs/train.holder.json    which job holds it (read only to name it in the refusal)
    semiseg/jobs/<id>/spec.json       what to run (written by start_job before the child starts)
    semiseg/jobs/<id>/events.jsonl    what happened (written by the child, see backend.jobs.events)
    semiseg/jobs/<id>/log.txt         the child's stdout and stderr
    semiseg/jobs/<id>/alive.lock      held by the child while it lives
    semiseg/jobs/<id>/launch.json     the child's process id (written by start_job)
    semiseg/jobs/<id>/ready           written by the child once a cancel signal would be caught
    semiseg/jobs/<id>/cancel          cancel asked for (read by a child that was still starting)
    semiseg/jobs/<id>/backend.json    a scheduler's job only (backend.jobs.slurm): backend, cluster, scheduler job id,
                                      resources; absent for the local runner
    semiseg/jobs/<id>/task.json       a scheduler's job only: the task running it now (host, pid, attempt)

Ids sort by creation time: ``<UTC yyyymmdd-hhmmss>-<kind>-<4 hex>``, e.g. ``20261122-031500-train-ab12``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from backend.errors import InputError
from backend.io.atomic import write_json_atomic
from backend.project import Project

KINDS = ("train", "infer")
JOB_ID = re.compile(r"^\d{8}-\d{6}-[a-z]+-[0-9a-f]{4,}$")
DEFAULTS: dict[str, Any] = {"kind": "train", "method": None, "preset": "quick", "steps": None, "device": "auto",
                            "run": None, "resume": False, "nproc": 1, "overrides": None}
# optional: "cases" (inference: only these cases; default every unlabeled one), "resumed_from" (set by resume_job)
OPTIONAL = ("cases", "resumed_from")
# Set by a scheduler's task (backend.jobs.slurm) for the job's child: a stop nobody asked for through cancel_job
# (no ``cancel`` file) is the scheduler's (time limit, preemption) and ends in a non-final ``preempted`` event.
SCHEDULED_ENV = "SEMISEG_JOB_SCHEDULED"


def jobs_dir(project_root: str | Path) -> Path:
    return Project.open(project_root).jobs_dir


class JobPaths:
    """The files of one job."""

    def __init__(self, jobs: Path, job_id: str):
        if not JOB_ID.match(job_id):
            raise InputError(jobs / job_id, f"'{job_id}' is not a job id (like 20261122-031500-train-ab12)")
        self.id = job_id
        self.dir = jobs / job_id
        self.spec = self.dir / "spec.json"
        self.events = self.dir / "events.jsonl"
        self.log = self.dir / "log.txt"
        self.alive_lock = self.dir / "alive.lock"
        self.launch = self.dir / "launch.json"
        self.ready = self.dir / "ready"
        self.cancel = self.dir / "cancel"
        self.backend = self.dir / "backend.json"
        self.task = self.dir / "task.json"

    @classmethod
    def existing(cls, project_root: str | Path, job_id: str) -> "JobPaths":
        paths = cls(jobs_dir(project_root), job_id)
        if not paths.spec.is_file():
            raise InputError(paths.dir, f"no job '{job_id}' in this project")
        return paths

    def read_spec(self) -> dict[str, Any]:
        from backend.io.atomic import read_json  # a corrupt spec.json is one InputError line naming it

        spec = read_json(self.spec, "spec.json")
        if not isinstance(spec, dict):
            raise InputError(self.spec, "corrupt spec.json (not a JSON object)")
        return spec

    def backend_record(self) -> dict[str, Any] | None:
        """What ``backend.json`` says (a scheduler's job), or None for a job of the local runner."""
        try:
            record = json.loads(self.backend.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InputError(self.backend, f"corrupt backend.json ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("backend"), str):
            raise InputError(self.backend, "corrupt backend.json (no backend name)")
        return record

    def stopped_by_scheduler(self) -> bool:
        """In the job's child: whether a stop is the scheduler's (time limit, preemption), not a cancel."""
        return bool(os.environ.get(SCHEDULED_ENV)) and not self.cancel.exists()

    def pid(self) -> int | None:
        """The child's process id: the one it wrote itself, else the one start_job saw."""
        for path, read in ((self.ready, lambda t: int(t.strip())), (self.launch, lambda t: int(json.loads(t)["pid"]))):
            try:
                return read(path.read_text())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None


def new_job(jobs: Path, kind: str) -> JobPaths:
    """Create the folder of a new job with a fresh, time-sortable id."""
    jobs.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        paths = JobPaths(jobs, f"{stamp}-{kind}-{secrets.token_hex(2)}")
        try:
            paths.dir.mkdir()
        except FileExistsError:
            continue
        return paths
    raise RuntimeError(f"could not make a new job folder in {jobs}")


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with defaults filled in and types checked (cheaply: method and preset names are checked by the
    child, so that starting a job never imports torch in the caller's process -- napari's event loop)."""
    unknown = sorted(set(spec) - set(DEFAULTS) - set(OPTIONAL))
    if unknown:
        raise InputError(None, f"unknown job spec fields {unknown} (fields: {', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **spec}
    if out["kind"] not in KINDS:
        raise InputError(None, f"job kind must be one of {KINDS}, not {out['kind']!r}")
    if not isinstance(out["method"], str) or not out["method"]:
        raise InputError(None, "job spec needs a method name")
    for key in ("preset", "run"):
        if out[key] is not None and not isinstance(out[key], str):
            raise InputError(None, f"job spec '{key}' must be a string or None")
    if out["run"] is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", out["run"]):
        raise InputError(None, f"invalid run name {out['run']!r}")
    if out["steps"] is not None and (not isinstance(out["steps"], int) or out["steps"] < 1):
        raise InputError(None, f"job spec 'steps' must be a positive integer, not {out['steps']!r}")
    if not isinstance(out["nproc"], int) or out["nproc"] < 1:
        raise InputError(None, f"job spec 'nproc' must be a positive integer, not {out['nproc']!r}")
    if not isinstance(out["device"], str) or not out["device"]:
        raise InputError(None, "job spec 'device' must be 'auto' or a device name")
    if out["overrides"] is not None and not isinstance(out["overrides"], dict):
        raise InputError(None, "job spec 'overrides' must be a dict or None")
    cases = out.get("cases")
    if cases is not None and (out["kind"] != "infer" or not isinstance(cases, list)
                              or not all(isinstance(c, str) for c in cases)):
        raise InputError(None, "job spec 'cases' is a list of case names, for inference jobs only")
    out["resume"] = bool(out["resume"])
    if out["resume"] and out["run"] is None:
        raise InputError(None, "resume needs the run to continue")
    json.dumps(out)  # must be JSON (raises TypeError naming the value otherwise)
    return out


def write_spec(paths: JobPaths, spec: dict[str, Any]) -> None:
    write_json_atomic(paths.spec, spec)
