"""SLURM jobs through submitit (``semiseg train --backend slurm --partition P --gpus N --time MIN``).

:class:`SubmititBackend` submits :class:`SubmititRun` with ``submitit.AutoExecutor``: one node, one task, ``--gpus``
GPUs, ``--time`` minutes, ``--requeue``, and ``USR2`` :data:`SIGNAL_DELAY_S` seconds before the time limit.  The task
is a thin supervisor: it starts the job's child exactly as the local runner does (``python -m backend.jobs run ROOT
JOB``, :func:`backend.jobs.process.spawn`; ``nproc > 1`` launches torchrun inside it, one rank per GPU), so the child
writes ``events.jsonl`` in the project on the shared filesystem and the CLI, the server and napari read that one file
whichever backend ran the job.  The job folder keeps ``backend.json`` (cluster, scheduler job id, resources), so
status, cancel and resume work from any process that sees the folder:

* status: the events decide, the scheduler only says whether a job without a final event is still queued, running
  or requeued (submitit's ``sacct`` watcher, :func:`scheduler_alive`);
* cancel: the ``cancel`` file, then ``scancel`` (submitit's ``job.cancel()``); the child checkpoints and ends in
  ``cancelled``.  With submitit's local executor (``cluster="local"``, what the tests run) it is SIGTERM to the job's
  controller, which hands it on;
* time limit or preemption: submitit's ``USR2`` handler calls :meth:`SubmititRun.checkpoint`, which stops the child
  (it saves a checkpoint and writes a ``preempted`` event, which is not final) and returns the resubmission; the
  requeued task resumes the run from that checkpoint in the same job (:meth:`SubmititRun.continue_spec`).  A SIGTERM
  without a ``cancel`` file (SLURM's preemption notice) stops nothing by itself.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from backend.errors import InputError, JobBusyError
from backend.io.atomic import write_json_atomic
from backend.jobs.backends import JobBackend
from backend.jobs.events import TERMINAL, EventWriter, error_event, now_iso, read_lines
from backend.jobs.process import NICE_ENV, pid_alive, send_cancel, spawn
from backend.jobs.store import SCHEDULED_ENV, JobPaths, new_job, normalize_spec, write_spec
from backend.project import Project

CLUSTERS = ("slurm", "local")
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: time to checkpoint
STOP_GRACE_S = 90.0  # after USR2, how long the child may take to checkpoint before it is killed
REQUEUE_WAIT_S = 300.0  # a child stopped by the scheduler without a USR2 to the task: wait this long for one
SUBMIT_GRACE_S = 60.0  # backend.json without a scheduler job id yet (being submitted) counts as alive this long
MAX_REQUEUES = 3
# sacct states of a job that is not over (submitit's own list and the rarer ones)
ALIVE_STATES = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING",
                "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "STOPPED", "SIGNALING", "STAGE_OUT"}
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds ``backend``
_SUBMITTED: dict[str, Any] = {}  # job id -> local controller (Popen) started by this process, reaped by alive()
_WATCHER: Any = None


class SubmititBackend(JobBackend):
    """Jobs as submitit jobs: on SLURM (``cluster="slurm"``) or with submitit's local executor (``"local"``).

    ``partition``: SLURM partition (default: the cluster's); ``gpus``: GPUs on the node (default ``nproc``, 0 with
    ``device="cpu"``); ``time_min``: time limit in minutes (the job is requeued at most ``max_requeues`` times
    after reaching it); ``folder``: submitit's folder (scripts, pickles, the task's log; default
    ``semiseg/jobs/<id>/submitit``), on the filesystem the nodes share.
    """

    name = "slurm"

    def __init__(self, cluster: str = "slurm", partition: str | None = None, gpus: int | None = None,
                 time_min: int = 60, folder: str | Path | None = None, max_requeues: int = MAX_REQUEUES):
        if cluster not in CLUSTERS:
            raise InputError(None, f"submitit cluster must be one of {CLUSTERS}, not {cluster!r}")
        if not isinstance(time_min, int) or time_min < 1:
            raise InputError(None, f"--time must be a whole number of minutes >= 1, not {time_min!r}")
        if gpus is not None and (not isinstance(gpus, int) or gpus < 0):
            raise InputError(None, f"--gpus must be a number >= 0, not {gpus!r}")
        self.cluster, self.partition, self.gpus, self.time_min = cluster, partition, gpus, time_min
        self.folder = None if folder is None else str(Path(folder).expanduser().resolve())
        self.max_requeues = max_requeues

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "SubmititBackend":
        return cls(cluster=record.get("cluster", "slurm"), **record.get("resources", {}))

    def resources(self) -> dict[str, Any]:
        return {"partition": self.partition, "gpus": self.gpus, "time_min": self.time_min, "folder": self.folder,
                "max_requeues": self.max_requeues}

    # ---- submit ----
    def submit(self, project_root: str | Path, spec: dict[str, Any]) -> str:
        project = Project.open(project_root)
        spec = normalize_spec(spec)
        gpus = self.gpus_for(spec)
        if self.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise InputError(None, "--backend slurm needs SLURM's sbatch and srun on PATH (not found here): run it "
                                   "on the cluster's login node")
        jobs = project.jobs_dir
        if spec["kind"] == "train":
            _refuse_if_busy(project.root, jobs)
        paths = new_job(jobs, spec["kind"])
        paths.log.touch()
        paths.events.touch()
        folder = Path(self.folder) if self.folder else paths.dir / "submitit"
        record = {"backend": self.name, "cluster": self.cluster, "folder": str(folder), "scheduler_job": None,
                  "submitted": time.time(), "gpus": gpus, "resources": self.resources()}
        write_json_atomic(paths.backend, record)  # before spec.json: a listed job always knows its backend
        write_spec(paths, {"id": paths.id, **spec, "project": str(project.root), "created": now_iso()})
        try:
            executor = self.executor(folder, paths.id, gpus)
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal; it is in exc
                job = executor.submit(SubmititRun(str(project.root), paths.id))
        except Exception as exc:  # noqa: BLE001 - sbatch's refusal (bad partition, ...) is the user's to read
            writer = EventWriter(paths.events)
            writer.emit(error_event(exc))
            writer.close()
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else type(exc).__name__
            raise InputError(folder, f"{self.cluster} did not take job {paths.id}: {reason}") from None
        if getattr(job, "_process", None) is not None:  # the local controller: ours to reap
            _SUBMITTED[paths.id] = job._process
        write_json_atomic(paths.backend, {**record, "scheduler_job": str(job.job_id)})
        return paths.id

    def gpus_for(self, spec: dict[str, Any]) -> int:
        """GPUs to ask for: ``gpus``, else one per process (none for a CPU job); at least ``nproc`` of them."""
        nproc = int(spec.get("nproc") or 1)
        gpus = self.gpus if self.gpus is not None else (0 if spec.get("device") == "cpu" else nproc)
        if gpus and nproc > gpus:
            raise InputError(None, f"--nproc {nproc} needs {nproc} GPUs (asked for {gpus}): one process per GPU")
        return gpus

    def executor(self, folder: Path, job_id: str, gpus: int) -> Any:
        """The submitit executor with this job's parameters (builds the sbatch script, does not submit)."""
        import submitit

        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster,
                                             slurm_max_num_timeout=self.max_requeues)
        except RuntimeError as exc:  # SlurmExecutor: 'Could not detect "srun"'
            raise InputError(None, f"submitit: {exc}") from None
        if self.cluster == "slurm":
            executor.update_parameters(
                name=f"semiseg-{job_id}", timeout_min=self.time_min, nodes=1, tasks_per_node=1,
                gpus_per_node=gpus or None, slurm_partition=self.partition, slurm_signal_delay_s=SIGNAL_DELAY_S,
                slurm_setup=[f"export PYTHONPATH={_PACKAGE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
                slurm_additional_parameters={"requeue": True})
        else:  # one task on this machine, gpus_per_node GPUs visible (none: CUDA_VISIBLE_DEVICES="")
            executor.update_parameters(name=f"semiseg-{job_id}", timeout_min=self.time_min, nodes=1,
                                       tasks_per_node=1, gpus_per_node=gpus)
        return executor

    # ---- hooks of cancel_job and job_status ----
    def stop(self, paths: JobPaths, status: dict[str, Any]) -> None:
        record = paths.backend_record() or {}
        job = record.get("scheduler_job")
        if job is None:  # still being submitted: the child reads ``cancel`` when it starts
            return
        if self.cluster == "local":  # the controller forwards SIGTERM to the task, the task to the child
            send_cancel(int(job))
            return
        from submitit.slurm.slurm import SlurmJob

        pending = _scheduler_state(job) == "PENDING"
        try:
            SlurmJob(folder=record["folder"], job_id=job).cancel(check=True)  # scancel JOB
        except Exception as exc:  # noqa: BLE001
            raise InputError(paths.dir, f"scancel {job} failed: {exc}") from None
        if pending and status["state"] == "queued":  # it never ran: nobody else writes its final event
            writer = EventWriter(paths.events)
            writer.emit({"type": "cancelled", "message": "cancelled while queued", "run": status.get("run")})
            writer.close()

    def alive(self, paths: JobPaths, record: dict[str, Any]) -> bool:
        job = record.get("scheduler_job")
        if job is None:
            return time.time() - float(record.get("submitted") or 0) < SUBMIT_GRACE_S
        if self.cluster == "local":  # the controller lives until the job is over, requeues included
            mine = _SUBMITTED.get(paths.id)
            if mine is not None:
                return mine.poll() is None  # reaps it
            return pid_alive(int(job))
        return _scheduler_state(job) in ALIVE_STATES


def scheduler_alive(paths: JobPaths, record: dict[str, Any]) -> bool:
    """Whether a scheduler's job is queued, running or requeued (see :func:`backend.jobs.status.process_alive`)."""
    from backend.jobs.backends import backend_from_record

    return backend_from_record(record).alive(paths, record)


def _scheduler_state(job: str) -> str:
    """SLURM's state of ``job`` (``sacct`` through submitit's watcher: one call for every job asked about, at most
    every 30 s), e.g. ``PENDING``, ``RUNNING``, ``CANCELLED``; ``UNKNOWN`` when sacct does not know it (yet)."""
    global _WATCHER
    from submitit.slurm.slurm import SlurmInfoWatcher

    if _WATCHER is None:
        _WATCHER = SlurmInfoWatcher(delay_s=30)
    return _WATCHER.get_state(str(job)).split()[0].upper()  # "CANCELLED by 1000" -> CANCELLED


def _refuse_if_busy(root: Path, jobs: Path) -> None:
    """One training job per project: refused while the lock is held here or another training job is queued."""
    from backend.io.filelock import FileLock
    from backend.jobs.api import TRAIN_LOCK, busy_message
    from backend.jobs.status import list_jobs

    lock = FileLock(jobs / TRAIN_LOCK)
    if not lock.try_acquire():
        raise JobBusyError(busy_message(jobs))
    lock.release()
    for row in list_jobs(root):
        if row["kind"] == "train" and row["state"] in ("queued", "running"):
            raise JobBusyError(f"training job {row['id']} is {row['state']} ({row.get('backend')}) on {root}; one "
                               f"training job per project at a time: wait for it or cancel it "
                               f"(semiseg cancel {root} {row['id']})")


class SubmititRun:
    """What the submitit task runs: the job's child, supervised.  ``__call__`` runs it to its end;
    ``checkpoint`` (submitit's USR2 handler: time limit or preemption) stops it at a checkpoint and returns the
    submission that continues it."""

    def __init__(self, project_root: str, job_id: str, attempt: int = 1):
        self.project_root, self.job_id, self.attempt = str(project_root), job_id, attempt
        self._proc: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}

    def paths(self) -> JobPaths:
        return JobPaths(Path(self.project_root) / "semiseg" / "jobs", self.job_id)

    def __call__(self) -> int:
        paths = self.paths()
        write_json_atomic(paths.task, {"host": socket.gethostname(), "pid": os.getpid(), "attempt": self.attempt,
                                       "time": now_iso()})
        if paths.cancel.exists():  # cancelled while queued or requeued: it ends here
            if _last_type(paths) not in TERMINAL:
                writer = EventWriter(paths.events)
                writer.emit({"type": "cancelled", "message": "cancelled before it started"})
                writer.close()
            return 0
        self.continue_spec(paths)
        os.environ[SCHEDULED_ENV] = "1"  # the child: a stop without ``cancel`` is the scheduler's ("preempted")
        os.environ[NICE_ENV] = "0"  # the node is the job's own: no lower priority
        signal.signal(signal.SIGTERM, self._on_sigterm)
        usr = _usr_signal()
        handler = signal.signal(usr, signal.SIG_IGN)  # inherited as ignored: SLURM signals every process of the
        try:  # step, and only this task requeues
            self._proc = spawn(Path(self.project_root), self.job_id, paths.log, {})
        finally:
            signal.signal(usr, handler)
        print(f"semiseg job {self.job_id}: attempt {self.attempt}, child {self._proc.pid}", flush=True)
        # poll, not Popen.wait(): the signal handlers (checkpoint, SIGTERM) run in this thread, and wait() would
        # hold the Popen's lock they would need; they test the child by its pid instead
        while self._proc.poll() is None:
            time.sleep(0.5)
        code = self._proc.returncode
        if _last_type(paths) == "preempted":  # SLURM's SIGTERM stopped it; its USR2 (requeue) is on the way
            time.sleep(REQUEUE_WAIT_S)
            raise RuntimeError(f"job {self.job_id} was stopped by the scheduler and not requeued; continue it with "
                               f"semiseg resume {self.project_root} {self.job_id}")
        if code != 0:
            raise RuntimeError(f"job {self.job_id} ended with exit code {code}; its log: {paths.log}")
        return code

    def checkpoint(self) -> Any:
        """Time limit or preemption: stop the child (it checkpoints, ``preempted``) and resubmit this job, or
        nothing (None) when it was cancelled or has ended."""
        from submitit.helpers import DelayedSubmission

        paths = self.paths()
        pid = None if self._proc is None else self._proc.pid
        if pid is not None and pid_alive(pid):  # (a zombie counts as gone: __call__ reaps it)
            send_cancel(pid)
            deadline = time.monotonic() + STOP_GRACE_S
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):  # no checkpoint in time: the requeued run resumes from the last periodic one
                _kill_group(pid)
        if paths.cancel.exists() or _last_type(paths) in TERMINAL:
            return None
        print(f"semiseg job {self.job_id}: stopped by the scheduler after attempt {self.attempt}; requeued",
              flush=True)
        return DelayedSubmission(SubmititRun(self.project_root, self.job_id, self.attempt + 1))

    def continue_spec(self, paths: JobPaths) -> None:
        """A training job that ran before (an earlier attempt, or SLURM requeued it after a node failure) resumes
        its run from the checkpoint it left: ``resume`` and ``run`` in ``spec.json``, as ``resume_job`` sets."""
        spec = paths.read_spec()
        events, _ = read_lines(paths.events)
        if spec.get("kind") != "train" or not any(e.get("type") == "start" for e in events):
            return
        run = spec.get("run") or next((e["run"] for e in reversed(events) if e.get("run")), None)
        if run is None:
            return
        checkpoint = Project.open(self.project_root).model_dir(spec["method"], run) / "checkpoint.pt"
        if checkpoint.is_file() and not (spec.get("resume") and spec.get("run") == run):
            write_spec(paths, {**spec, "run": run, "resume": True})

    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        proc = self._proc
        if self.paths().cancel.exists() and proc is not None and pid_alive(proc.pid):
            send_cancel(proc.pid)  # a cancel (scancel, or the local controller's SIGTERM): hand it on
        else:
            print(f"semiseg job {self.job_id}: SIGTERM without a cancel (preemption notice): waiting for the "
                  f"scheduler's USR2", file=sys.stderr, flush=True)


def _usr_signal() -> int:
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


def _last_type(paths: JobPaths) -> str | None:
    events, _ = read_lines(paths.events)
    final = next((e["type"] for e in events if e.get("type") in TERMINAL), None)
    return final or (events[-1].get("type") if events else None)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: torchrun and its ranks go with it
    except (ProcessLookupError, PermissionError, OSError):
        pass


__all__ = ["SubmititBackend", "SubmititRun", "scheduler_alive"]
