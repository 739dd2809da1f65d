"""The SLURM job backend (backend.jobs.slurm) through submitit.

* Real jobs with submitit's local executor (``cluster="local"``: the same pickled SubmititRun, a controller process
  and a task, requeue by exit code 144) training the supervised baseline on a copy of the real brain_tissue sample:
  cancel, resume, and a time-limit signal that requeues the job and resumes it from its checkpoint.
* The SLURM submission itself with SlurmExecutor and a fake ``sbatch`` (records the script, prints a job id),
  ``sacct`` and ``scancel`` on PATH: the resources land in the sbatch script, status asks sacct, cancel runs scancel.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers.fake_slurm import install_fake_slurm
from helpers.jobs import TIMEOUT, job_log, train_spec, wait_for_event

from backend.cli import main as cli_main
from backend.jobs import job_status, list_jobs, read_events, wait_job
from backend.jobs import slurm as slurm_module
from backend.jobs.backends import LocalBackend, backend_of, get_backend
from backend.jobs.process import pid_alive
from backend.jobs.slurm import SubmititBackend, SubmititRun
from backend.jobs.store import JobPaths

REPO = Path(__file__).resolve().parents[2]


def _checkpoint_step(project, run: str) -> int:
    import torch

    return torch.load(project.model_dir("supervised", run) / "checkpoint.pt", map_location="cpu",
                      weights_only=True)["step"]


# ---- submitit's local executor: real jobs ----------------------------------------------------------------------
@pytest.mark.slow
def test_submitit_job_cancels_at_a_checkpoint_and_resumes_to_done(brain_project):
    root, backend = brain_project.root, SubmititBackend(cluster="local", time_min=30)
    first = backend.submit(root, train_spec(40, {"checkpoint_every": 1000}))
    record = json.loads((root / "semiseg" / "jobs" / first / "backend.json").read_text())
    assert record["backend"] == "slurm" and record["cluster"] == "local" and record["gpus"] == 0
    controller = int(record["scheduler_job"])  # submitit's local job id: its controller's pid
    assert pid_alive(controller)
    status = backend.status(root, first)  # any process: the job folder says which backend runs it
    assert status["state"] in ("queued", "running") and status["backend"] == "slurm"
    assert isinstance(backend_of(root, first), SubmititBackend)

    seen = wait_for_event(root, first, "progress")
    run = seen[0]["run"]
    task = json.loads((root / "semiseg" / "jobs" / first / "task.json").read_text())
    child = job_status(root, first)["pid"]  # the job's child, started by the task as the local runner does
    assert task["attempt"] == 1 and task["pid"] not in (child, controller) and pid_alive(child)
    backend.cancel(root, first)
    status = wait_job(root, first, timeout=TIMEOUT)
    assert status["state"] == "cancelled", job_log(root, first)
    assert not pid_alive(child) and not pid_alive(controller)
    stopped_at = _checkpoint_step(brain_project, run)  # the cancel saved a checkpoint (periodic ones are off)
    assert 1 <= stopped_at < 40 and status["step"] == stopped_at
    assert read_events(root, first)[0][-1]["type"] == "cancelled"

    second = backend.resume(root, first)  # on the same backend, with the same resources
    paths = JobPaths.existing(root, second)
    assert paths.backend_record()["cluster"] == "local" and paths.read_spec()["resume"] is True
    status = wait_job(root, second, timeout=TIMEOUT)
    assert status["state"] == "done" and status["run"] == run, job_log(root, second)
    assert status["step"] == status["total"] == 40 and status["resumed_from"] == first
    events = read_events(root, second)[0]
    assert events[0]["type"] == "start" and events[0]["resumed"] is True and events[0]["step"] == stopped_at
    assert events[-1]["type"] == "done" and _checkpoint_step(brain_project, run) == 40
    # submitit's own record of the task agrees: it returned the child's exit code 0
    from submitit.local.local import LocalJob

    folder = Path(paths.backend_record()["folder"])
    assert LocalJob(folder, paths.backend_record()["scheduler_job"]).result() == 0
    assert [(r["id"], r["state"], r["backend"]) for r in list_jobs(root)] == [
        (second, "done", "slurm"), (first, "cancelled", "slurm")]


@pytest.mark.slow
def test_time_limit_signal_requeues_the_job_and_it_resumes_from_its_checkpoint(brain_project):
    """The local controller sends USR2 to the task at the time limit (SLURM: ``--signal=USR2@120``); here the test
    sends it to the task once training has checkpointed.  submitit calls SubmititRun.checkpoint, which stops the
    child (checkpoint, ``preempted``), dumps the resubmission and exits 144: the controller requeues the task."""
    root, backend = brain_project.root, SubmititBackend(cluster="local", time_min=30)
    job = backend.submit(root, train_spec(40, {"checkpoint_every": 2}))
    controller = int(JobPaths.existing(root, job).backend_record()["scheduler_job"])
    run = wait_for_event(root, job, "checkpoint")[0]["run"]
    task = json.loads((root / "semiseg" / "jobs" / job / "task.json").read_text())
    os.kill(task["pid"], signal.SIGUSR2)
    states = set()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        status = job_status(root, job)
        states.add(status["state"])
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert status["state"] == "done" and states <= {"queued", "running", "done"}, job_log(root, job)
    events = read_events(root, job)[0]
    kinds = [e["type"] for e in events]
    assert kinds.count("preempted") == 1 and kinds.count("start") == 2 and kinds[-1] == "done"
    assert not {"cancelled", "error"} & set(kinds)
    preempted = events[kinds.index("preempted")]
    restart = events[kinds.index("start", kinds.index("preempted"))]
    assert restart["resumed"] is True and restart["run"] == run and restart["step"] == preempted["step"] >= 2
    assert status["step"] == 40 and _checkpoint_step(brain_project, run) == 40
    task = json.loads((root / "semiseg" / "jobs" / job / "task.json").read_text())
    assert task["attempt"] == 2  # the same scheduler job, requeued in place
    assert JobPaths.existing(root, job).backend_record()["scheduler_job"] == str(controller)
    assert JobPaths.existing(root, job).read_spec()["resume"] is True


def test_checkpoint_resubmits_only_a_job_that_is_not_over(brain_project, tmp_path):
    """SubmititRun.checkpoint called directly (no child running): the resubmission continues the same job."""
    root = brain_project.root
    backend = SubmititBackend(cluster="local", time_min=5, folder=tmp_path / "sub")
    paths = JobPaths(root / "semiseg" / "jobs", "20261206-120000-train-abcd")
    paths.dir.mkdir(parents=True)
    (paths.dir / "spec.json").write_text(json.dumps({"id": paths.id, **train_spec(8), "run": None}))
    paths.events.write_text(json.dumps({"type": "start", "run": "r1", "step": 0}) + "\n"
                            + json.dumps({"type": "checkpoint", "step": 2, "run": "r1"}) + "\n")
    again = SubmititRun(str(root), paths.id, attempt=2).checkpoint()
    assert isinstance(again.function, SubmititRun) and again.function.attempt == 3
    assert (again.function.project_root, again.function.job_id) == (str(root), paths.id)
    # the requeued task resumes the run, from its checkpoint, as resume_job would
    brain_project.model_dir("supervised", "r1").mkdir(parents=True)
    (brain_project.model_dir("supervised", "r1") / "checkpoint.pt").write_bytes(b"x")
    again.function.continue_spec(paths)
    spec = paths.read_spec()
    assert spec["resume"] is True and spec["run"] == "r1"
    with open(paths.events, "a") as handle:
        handle.write(json.dumps({"type": "done", "run": "r1", "step": 8}) + "\n")
    assert SubmititRun(str(root), paths.id).checkpoint() is None  # over: not requeued
    assert backend.resources()["folder"] == str((tmp_path / "sub").resolve())


# ---- SLURM: the submission, with a fake sbatch -----------------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    record = install_fake_slurm(tmp_path, monkeypatch)
    monkeypatch.setattr(slurm_module, "_WATCHER", None)
    return record


def test_slurm_resources_land_in_the_sbatch_script(brain_project, fake_slurm, tmp_path, capsys):
    root, folder = brain_project.root, tmp_path / "submitit"
    assert cli_main(["train", str(root), "--method", "supervised", "--preset", "tiny", "--backend", "slurm",
                     "--partition", "gpu-a100", "--gpus", "4", "--time", "90", "--slurm-folder", str(folder)]) == 0
    out = capsys.readouterr()
    job = out.out.strip()
    assert "SLURM job 4242" in out.err and "4 GPUs" in out.err
    script = (fake_slurm / "script.sh").read_text()
    lines = script.splitlines()
    for flag in ("--partition=gpu-a100", "--gpus-per-node=4", "--time=90", "--nodes=1", "--ntasks-per-node=1",
                 "--requeue", "--signal=USR2@120", f"--job-name=semiseg-{job}",
                 f"--output={folder.resolve()}/%j_0_log.out"):
        assert f"#SBATCH {flag}" in lines, (flag, script)
    assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}" in lines
    command = lines[-1] if lines[-1] else lines[-2]
    assert command.startswith("srun --unbuffered --output ")
    assert command.endswith(f"{sys.executable} -u -m submitit.core._submit {folder.resolve()}")
    assert (folder / "4242_submission.sh").read_text() == script
    # the pickled function is the job's supervisor, for this project and job; --nproc followed --gpus
    from submitit.core.utils import DelayedSubmission

    delayed = DelayedSubmission.load(folder / "4242_submitted.pkl")
    assert isinstance(delayed.function, SubmititRun) and delayed._timeout_min == 90
    assert (delayed.function.project_root, delayed.function.job_id, delayed.function.attempt) == (str(root), job, 1)
    paths = JobPaths.existing(root, job)
    assert paths.read_spec()["nproc"] == 4 and paths.backend_record()["scheduler_job"] == "4242"

    # status asks sacct: pending -> queued; a second training job is refused while it is queued
    status = job_status(root, job)
    assert status["state"] == "queued" and status["backend"] == "slurm"
    assert "-j 4242" in (fake_slurm / "sacct.calls").read_text()
    assert cli_main(["train", str(root), "--method", "supervised", "--backend", "slurm"]) == 3
    assert job in capsys.readouterr().err
    # cancel runs scancel; a job that never ran ends cancelled at once
    assert cli_main(["cancel", str(root), job]) == 0
    assert (fake_slurm / "scancel.calls").read_text().split() == ["4242"]
    assert job_status(root, job)["state"] == "cancelled"


def test_slurm_refusals_are_one_line(brain_project, fake_slurm, tmp_path, capsys, monkeypatch):
    root = str(brain_project.root)
    assert cli_main(["train", root, "--method", "supervised", "--backend", "slurm", "--partition", "nope",
                     "--slurm-folder", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid partition specified: nope" in err[0]
    failed = list_jobs(root)[0]
    assert failed["state"] == "error" and "nope" in failed["error"]["message"]

    assert cli_main(["train", root, "--method", "supervised", "--backend", "slurm", "--gpus", "2",
                     "--nproc", "4"]) == 2
    assert "--nproc 4 needs 4 GPUs" in capsys.readouterr().err
    assert cli_main(["train", root, "--method", "supervised", "--partition", "gpu"]) == 2
    assert "use --backend slurm" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli_main(["train", root, "--method", "supervised", "--backend", "slurm"]) == 2
    assert "sbatch and srun on PATH" in capsys.readouterr().err
    assert isinstance(get_backend("local"), LocalBackend) and len(list_jobs(root)) == 1
