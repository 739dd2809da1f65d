"""Background jobs end to end: real child processes training the supervised baseline on the real brain_tissue
sample project (tiny preset, made smaller still with overrides, a handful of steps).

Each child imports torch and loads the three sample volumes, so each job costs a few seconds even here.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from backend.cli import main as cli_main
from backend.errors import JobBusyError
from backend.jobs import (cancel_job, job_status, list_jobs, read_events, resume_job, start_job,
                          wait_job)
from backend.jobs.process import JOB_NICENESS

from helpers.jobs import TIMEOUT, job_log, train_spec, wait_for_event

pytestmark = pytest.mark.slow


def all_events(root, job_id: str) -> list[dict]:
    return read_events(root, job_id)[0]


def test_killed_training_is_dead_then_resumes_to_the_end(brain_project, capsys):
    root = brain_project.root
    first = start_job(root, train_spec(10))
    assert job_status(root, first)["state"] in ("queued", "running")

    # one training job per project: refused at once, naming the job that runs
    with pytest.raises(JobBusyError, match=first):
        start_job(root, train_spec(4))

    seen = wait_for_event(root, first, "checkpoint")
    run = seen[0]["run"]
    assert seen[0]["type"] == "start" and run
    # background work: the child runs at a lower CPU priority than its starter (napari keeps the cores it needs)
    pid = job_status(root, first)["pid"]
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + JOB_NICENESS)
    os.kill(pid, signal.SIGKILL)  # no chance to write anything
    status = wait_job(root, first, timeout=30)
    assert status["state"] == "dead", status
    assert status["run"] == run and status["error"]["kind"] == "dead" and status["exit_code"] == -signal.SIGKILL
    checkpoint = brain_project.model_dir("supervised", run) / "checkpoint.pt"
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    assert 2 <= killed_at < 10

    # the kernel released the dead child's lock: resuming starts at once
    second = resume_job(root, first)
    assert second != first
    # ... and now the resumed job holds the lock: the CLI refuses another one with a single line, exit 3
    assert cli_main(["resume", str(root), first]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semiseg: ") and second in err[0]

    # inference jobs do not take the training lock: pseudo labels from the killed job's checkpoint, meanwhile
    infer = start_job(root, {"kind": "infer", "method": "supervised", "run": run, "device": "cpu"})
    assert "-infer-" in infer

    status = wait_job(root, second, timeout=TIMEOUT)
    assert status["state"] == "done", job_log(root, second)
    assert status["run"] == run and status["step"] == status["total"] == 10 and status["exit_code"] == 0
    events = all_events(root, second)
    start = events[0]
    assert start["type"] == "start" and start["resumed"] is True and start["step"] == killed_at
    assert events[-1]["type"] == "done" and all("time" in e for e in events)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == 10 and state["method_name"] == "supervised"

    status = wait_job(root, infer, timeout=TIMEOUT)
    assert status["state"] == "done" and status["run"] == run, job_log(root, infer)
    assert status["step"] == status["total"] == len(brain_project.unlabeled_cases())
    assert (brain_project.pseudo_dir("supervised", run) / "scores.json").is_file()

    rows = list_jobs(root)
    assert [(r["id"], r["state"]) for r in rows] == [(infer, "done"), (second, "done"), (first, "dead")]
    assert rows[1]["resumed_from"] == first


def test_cancel_checkpoints_cleanly_then_the_next_job_starts_and_fails_with_its_error(brain_project):
    root = brain_project.root
    job = start_job(root, train_spec(1000, {"checkpoint_every": 500}))
    wait_for_event(root, job, "progress")
    cancel_job(root, job)
    status = wait_job(root, job, timeout=TIMEOUT)
    assert status["state"] == "cancelled", job_log(root, job)
    assert status["exit_code"] == 0 and status["cancel_requested"] and status["error"] is None
    events = all_events(root, job)
    final = events[-1]
    assert final["type"] == "cancelled" and 1 <= final["step"] < 1000
    assert [e["type"] for e in events].count("cancelled") == 1
    # the engine saved a checkpoint at the step it stopped: plain tensors and containers only
    checkpoint = brain_project.model_dir("supervised", status["run"]) / "checkpoint.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == final["step"]
    assert all(torch.isfinite(t).all() for t in state["method"]["modules"]["net"].values() if t.is_floating_point())
    assert "received signal SIGTERM" in job_log(root, job)

    # the lock went with the cancelled job: a new training job starts; this one asks for a preset that does
    # not exist, and reports the failure as an error event with the message and the traceback's tail
    bad = start_job(root, train_spec(5, preset="no-such-preset"))
    status = wait_job(root, bad, timeout=TIMEOUT)
    assert status["state"] == "error" and status["exit_code"] == 1
    error = status["error"]
    assert error["kind"] == "exception" and error["exception"] == "KeyError"
    assert "no-such-preset" in error["message"] and "tiny" in error["message"]
    assert error["traceback"].splitlines()[-1].startswith("KeyError") and "make_config" in error["traceback"]
    assert all_events(root, bad)[-1] == {**error, "type": "error", "time": status["ended"]}


def test_cancel_before_the_child_is_ready_still_ends_cancelled(brain_project):
    root = brain_project.root
    job = start_job(root, train_spec(5))
    cancel_job(root, job)  # most likely before the child installed its signal handler: it reads the cancel file
    status = wait_job(root, job, timeout=TIMEOUT)
    assert status["state"] == "cancelled" and status["exit_code"] == 0, job_log(root, job)
    # and the lock is free again
    second = start_job(root, train_spec(5))
    cancel_job(root, second)
    assert wait_job(root, second, timeout=TIMEOUT)["state"] == "cancelled"


def test_a_corrupt_image_fails_the_job_with_the_file_named(brain_project):
    root = brain_project.root
    image = brain_project.image_path("itk_kmeans_t1")
    image.write_bytes(b"\x1f\x8b" + b"not a gzip stream at all" * 10)
    job = start_job(root, train_spec(5))
    status = wait_job(root, job, timeout=TIMEOUT)
    assert status["state"] == "error" and status["exit_code"] == 1, job_log(root, job)
    error = status["error"]
    assert error["kind"] == "exception" and "itk_kmeans_t1" in error["message"]
    tail = error["traceback"].splitlines()
    assert len(tail) <= 30 and tail[-1].split(":")[0].endswith(error["exception"]) and "itk_kmeans_t1" in tail[-1]
    assert "Traceback" in job_log(root, job)  # the whole traceback is in the job's log
