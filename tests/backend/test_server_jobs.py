"""Jobs through ``semiseg serve`` (a subprocess on 127.0.0.1, the real brain-tissue sample): a tiny CPU training
streamed as server-sent events to its end, a second one cancelled (its process gone, its events end in
``cancelled``) and resumed, inference as its own job and its pseudo labels fetched, and the server SIGKILLed and
restarted mid-job: the job list, the finished runs and the running job's event stream are all still there."""
from __future__ import annotations

import hashlib
import time

import httpx
import numpy as np
import pytest

from backend.errors import JobBusyError
from backend.io.volume import read_volume
from backend.jobs import read_events
from backend.jobs.process import pid_alive
from backend.project import Project
from backend.project.sample import copy_sample
from helpers.jobs import train_spec
from helpers.semiseg_server import serving

pytestmark = pytest.mark.slow

LONG = 5000  # steps of a job that is cancelled long before its end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs-server")
    copy_sample(folder / "project", "brain_tissue")
    with serving(folder / "project", folder / "server") as running:
        yield running


def until(stream, kind: str) -> list[dict]:
    """Events of ``stream`` up to and including the first of type ``kind``."""
    seen = []
    for event, _ in stream:
        seen.append(event)
        if event["type"] == kind:
            return seen
        assert event["type"] not in ("done", "cancelled", "error", "end"), f"job ended early: {event}"
    raise AssertionError(f"stream ended without a {kind} event: {seen[-3:]}")


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_train_stream_cancel_resume_infer(server):
    boss = server.client("boss")
    root = server.root
    job = boss.start_job(train_spec(4))
    seen = list(boss.stream_events(job))
    types = [event["type"] for event, _ in seen]
    assert types[0] == "start" and types[-1] == "done", server.log_text()
    assert [e["step"] for e, _ in seen if e["type"] == "progress"][-1] == 4
    offsets = [offset for _, offset in seen]
    events_file = root / "semiseg" / "jobs" / job / "events.jsonl"
    assert offsets == sorted(set(offsets)) and offsets[-1] == events_file.stat().st_size
    assert [e for e, _ in seen] == read_events(root, job)[0]  # exactly the file's events, none lost or doubled
    # a client that reconnects with Last-Event-ID gets exactly what follows
    resumed = [data for _, data, _ in boss.http.sse(f"/jobs/{job}/stream", offsets[1])]
    assert resumed == [e for e, _ in seen[2:]]
    status = boss.job_status(job)
    run = status["run"]
    assert status["state"] == "done" and any(r["run"] == run and r["has_checkpoint"] for r in boss.run_table())
    weights = boss.download_weights("supervised", run)
    assert weights.read_bytes() == Project(root).model_dir("supervised", run).joinpath("best.pt").read_bytes()

    long = boss.start_job(train_spec(LONG))
    with pytest.raises(JobBusyError, match="already running"):  # one training per project, as locally
        boss.start_job(train_spec(1))
    stream = boss.stream_events(long)
    until(stream, "progress")
    pid = boss.job_status(long)["pid"]
    boss.cancel_job(long)
    rest = [event for event, _ in stream]
    assert rest[-1]["type"] == "cancelled" and all(e["type"] != "done" for e in rest)
    assert wait_gone(pid), f"job {long} (pid {pid}) still running after its cancelled event"
    assert boss.job_status(long)["state"] == "cancelled"

    again = boss.resume_job(long)
    status = boss.job_status(again)
    assert status["resumed_from"] == long and status["run"] == boss.job_status(long)["run"]
    stream = boss.stream_events(again)
    start = until(stream, "start")[-1]
    assert start["resumed"] is True and start["step"] >= rest[-1]["step"] >= 1  # from the last checkpoint
    boss.cancel_job(again)
    assert [event for event, _ in stream][-1]["type"] == "cancelled"

    infer = boss.start_job({"kind": "infer", "method": "supervised", "run": run, "device": "cpu"})
    assert [e for e, _ in boss.stream_events(infer)][-1]["type"] == "done", server.log_text()
    project = Project(root)
    for case in project.unlabeled_cases():
        views = boss.read_views(case, runs={"supervised": run})
        local = read_volume(project.pseudo_dir("supervised", run) / case / "prediction.nii.gz").array
        assert list(views) == ["supervised:prediction"] and np.array_equal(views["supervised:prediction"], local)
    rows = boss.review_rows(runs={"supervised": run}, score="tta")
    assert all(r["scores"]["supervised"]["tta"] is not None for r in rows if not r["labeled"])
    path = f"/api/v1/cases/{project.unlabeled_cases()[0]}/views/supervised/{run}/prediction"
    answer = httpx.get(server.url + path, headers=server.headers("ann"))
    assert answer.headers["etag"] == f'"sha256:{hashlib.sha256(answer.content).hexdigest()}"'
    assert httpx.get(server.url + path, headers={**server.headers("ann"),
                                                 "If-None-Match": answer.headers["etag"]}).status_code == 304


def test_server_killed_mid_job_and_restarted(server):
    boss = server.client("boss")
    if not any(j["state"] == "done" for j in boss.list_jobs()):  # run alone: make a finished run first
        assert boss.wait_job(boss.start_job(train_spec(2)), timeout=240)["state"] == "done"
    job = boss.start_job(train_spec(LONG))
    stream = boss.stream_events(job)
    until(stream, "progress")
    before = {j["id"]: j["state"] for j in boss.list_jobs()}
    runs_before = {(r["method"], r["run"]) for r in boss.run_table() if r["has_checkpoint"]}
    pid = boss.job_status(job)["pid"]

    server.kill()
    assert pid_alive(pid)  # the job is not the server's: it goes on training
    server.start()
    after = {j["id"]: j["state"] for j in boss.list_jobs()}
    assert after == before and after[job] == "running" and "done" in after.values()
    assert runs_before <= {(r["method"], r["run"]) for r in boss.run_table() if r["has_checkpoint"]}
    event, offset = next(stream)  # the stream opened before the kill reconnects from its last event id
    assert event["type"] in ("progress", "checkpoint", "validation")
    boss.cancel_job(job)
    rest = [event for event, _ in stream]
    assert rest[-1]["type"] == "cancelled"
    everything = read_events(server.root, job)[0]
    assert everything[-1]["type"] == "cancelled" and len(everything) == len({e["time"] for e in everything})
    assert wait_gone(pid)
