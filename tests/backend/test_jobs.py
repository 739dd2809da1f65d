"""Background jobs without the engine: event files, error classification, spec checks, locks, the CLI's listing.

The end-to-end tests with real training children are in ``tests/test_jobs_real.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from backend.cli import main as cli_main
from backend.errors import InputError
from backend.jobs import classify_error, job_status, list_jobs, read_events
from backend.jobs.events import TRACEBACK_LINES, EventWriter, error_event, read_lines
from backend.io.filelock import FileLock, is_locked
from backend.jobs.store import JobPaths, new_job, normalize_spec, write_spec


# ---- out of memory is told apart from other failures ------------------------------------------------------------
def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


@pytest.mark.parametrize("exc", [
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("CUDA out of memory."),
    RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 68719476736 bytes."),
])
def test_out_of_memory_errors_are_kind_oom(exc):
    assert classify_error(_raised(exc)) == "oom"
    assert error_event(_raised(exc))["kind"] == "oom"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a real allocator failure")
def test_a_real_cuda_allocation_failure_is_oom():
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(2 ** 50, dtype=torch.uint8, device="cuda")  # 1 PiB: refused at once, nothing is exhausted
    assert classify_error(info.value) == "oom"


def test_oom_inside_another_error_is_still_oom():
    def inner():
        raise torch.OutOfMemoryError("CUDA out of memory.")

    try:
        try:
            inner()
        except RuntimeError as exc:
            raise RuntimeError("DataLoader worker failed") from exc
    except RuntimeError as outer:
        assert classify_error(outer) == "oom"


@pytest.mark.parametrize("exc", [ValueError("bad value"), RuntimeError("shape mismatch"), KeyError("nope"),
                                 InputError("/x.nii.gz", "unreadable")])
def test_other_errors_are_kind_exception(exc):
    assert classify_error(_raised(exc)) == "exception"


def test_error_event_has_message_and_a_traceback_tail():
    def deep(n):  # alternating frames (Python folds identical consecutive ones)
        if n == 0:
            raise KeyError("method 'supervised' has no preset 'huge'")
        deeper(n - 1)

    def deeper(n):
        deep(n)

    try:
        deep(40)
    except KeyError as exc:
        event = error_event(exc)
    assert event["type"] == "error" and event["kind"] == "exception" and event["exception"] == "KeyError"
    assert event["message"] == "method 'supervised' has no preset 'huge'"  # not wrapped in KeyError's quotes
    lines = event["traceback"].splitlines()
    assert len(lines) == TRACEBACK_LINES
    assert lines[-1].startswith("KeyError:") and "in deep" in event["traceback"]


# ---- the event stream ------------------------------------------------------------------------------------------
def test_read_events_never_returns_a_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit({"type": "start", "total": 3})
    writer.emit({"type": "progress", "step": 1, "total": 3, "losses": {"dice": 0.5}})
    with open(path, "ab") as handle:  # a line still being written
        handle.write(b'{"type": "progress", "st')
    events, offset = read_lines(path)
    assert [e["type"] for e in events] == ["start", "progress"]
    assert all("time" in e for e in events)
    assert offset == len(path.read_bytes()) - len(b'{"type": "progress", "st')
    assert read_lines(path, offset) == ([], offset)  # still partial: nothing, offset unchanged
    with open(path, "ab") as handle:
        handle.write(b'ep": 2}\n')
    events, offset2 = read_lines(path, offset)
    assert events == [{"type": "progress", "step": 2}] and offset2 == path.stat().st_size
    writer.emit({"type": "done", "step": 3})
    events, _ = read_lines(path, offset2)
    assert [e["type"] for e in events] == ["done"] and writer.final["type"] == "done"
    writer.close()


def test_read_events_in_slices(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    for step in range(1, 101):
        writer.emit({"type": "progress", "step": step, "total": 100, "losses": {"loss": 1.0 / step}})
    writer.close()
    steps, offset, calls = [], 0, 0
    while True:
        events, offset = read_lines(path, offset, max_bytes=500)
        if not events:
            break
        calls += 1
        steps += [e["step"] for e in events]
    assert steps == list(range(1, 101)) and calls > 10 and offset == path.stat().st_size
    # a line longer than the slice still comes back whole
    events, _ = read_lines(path, 0, max_bytes=10)
    assert [e["step"] for e in events] == [1]


def test_status_of_a_long_run_skims_its_stream(brain_project):
    from backend.jobs.status import SKIM_BYTES

    paths = new_job(brain_project.jobs_dir, "train")
    write_spec(paths, {"id": paths.id, "kind": "train", "method": "supervised"})
    writer = EventWriter(paths.events)
    writer.emit({"type": "start", "run": "long", "total": 60000, "device": "cpu"})
    step = 0
    while paths.events.stat().st_size < 3 * SKIM_BYTES:
        step += 1
        writer.emit({"type": "progress", "step": step, "total": 60000, "losses": {"loss": 0.5, "dice": 0.25}})
    status = job_status(brain_project.root, paths.id)
    assert (status["step"], status["total"], status["run"]) == (step, 60000, "long")
    assert status["started"] is not None and status["state"] == "dead"
    writer.emit({"type": "progress", "step": step + 1, "total": 60000})
    writer.emit({"type": "done", "step": step + 1})
    writer.close()
    status = job_status(brain_project.root, paths.id)  # read on from where the skim stopped
    assert status["state"] == "done" and status["step"] == step + 1


def test_event_writer_converts_tensor_scalars(tmp_path):
    writer = EventWriter(tmp_path / "e.jsonl")
    writer.emit({"type": "progress", "losses": {"dice": torch.tensor(0.25)}, "step": torch.tensor(3)})
    writer.close()
    (event,), _ = read_lines(tmp_path / "e.jsonl")
    assert event["losses"] == {"dice": 0.25} and event["step"] == 3


# ---- specs, ids, states from files -----------------------------------------------------------------------------
def test_spec_is_checked_without_importing_the_engine():
    spec = normalize_spec({"kind": "train", "method": "supervised", "preset": "tiny", "steps": 5})
    assert spec["device"] == "auto" and spec["nproc"] == 1 and spec["resume"] is False and spec["run"] is None
    for bad, words in [({"kind": "eval", "method": "x"}, "kind"), ({"method": "x", "steps": 0}, "steps"),
                       ({"method": "x", "nproc": 0}, "nproc"), ({"method": "x", "resume": True}, "resume"),
                       ({"method": "x", "run": "../up"}, "run"), ({"method": "x", "stpes": 3}, "stpes"),
                       ({"kind": "train"}, "method")]:
        with pytest.raises(InputError, match=words):
            normalize_spec(bad)


def test_importing_jobs_does_not_import_torch():
    code = "import sys, backend.jobs, backend.cli.jobs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_job_ids_sort_by_time_and_list_newest_first(brain_project):
    jobs = brain_project.jobs_dir
    first = new_job(jobs, "train")
    write_spec(first, {"id": first.id, "kind": "train", "method": "supervised", "created": "2026-01-01T00:00:00"})
    time.sleep(1.1)
    second = new_job(jobs, "infer")
    write_spec(second, {"id": second.id, "kind": "infer", "method": "supervised", "created": "2026-01-01T00:00:01"})
    assert first.id < second.id and "-train-" in first.id and "-infer-" in second.id
    rows = list_jobs(brain_project.root)
    assert [r["id"] for r in rows] == [second.id, first.id]
    # no child ever ran: no final event and nothing alive -> dead, with a message pointing at the log
    assert rows[0]["state"] == "dead" and "log.txt" in rows[0]["error"]["message"]


def test_state_comes_from_the_final_event(brain_project):
    paths = new_job(brain_project.jobs_dir, "train")
    write_spec(paths, {"id": paths.id, "kind": "train", "method": "supervised", "run": None})
    writer = EventWriter(paths.events)
    writer.emit({"type": "start", "run": "r1", "total": 10, "device": "cpu"})
    writer.emit({"type": "progress", "step": 4, "total": 10})
    writer.emit({"type": "error", "kind": "oom", "exception": "OutOfMemoryError", "message": "CUDA out of memory",
                 "traceback": "..."})
    writer.close()
    status = job_status(brain_project.root, paths.id)
    assert status["state"] == "error" and status["run"] == "r1" and (status["step"], status["total"]) == (4, 10)
    assert status["error"]["kind"] == "oom" and status["ended"] is not None
    events, offset = read_events(brain_project.root, paths.id)
    assert len(events) == 3 and offset == paths.events.stat().st_size


def test_unknown_job_is_an_input_error(brain_project):
    with pytest.raises(InputError, match="no job"):
        job_status(brain_project.root, "20260101-000000-train-abcd")
    with pytest.raises(InputError, match="not a job id"):
        job_status(brain_project.root, "../../etc")


# ---- the lock dies with its process ----------------------------------------------------------------------------
def test_lock_held_by_a_killed_process_is_released(tmp_path):
    path = tmp_path / "train.lock"
    code = ("import sys, time; from backend.io.filelock import FileLock; "
            f"l = FileLock({str(path)!r}); assert l.try_acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert is_locked(path)
        assert not FileLock(path).try_acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not is_locked(path)
    lock = FileLock(path)
    assert lock.try_acquire()
    lock.release()


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_jobs_lists_states(brain_project, capsys):
    assert cli_main(["jobs", str(brain_project.root)]) == 0
    assert "no jobs" in capsys.readouterr().out
    paths = new_job(brain_project.jobs_dir, "train")
    write_spec(paths, {"id": paths.id, "kind": "train", "method": "supervised", "created": "2026-01-01T00:00:00"})
    writer = EventWriter(paths.events)
    writer.emit({"type": "progress", "step": 7, "total": 9, "run": "r2"})
    writer.emit({"type": "cancelled", "step": 7})
    writer.close()
    assert cli_main(["jobs", str(brain_project.root)]) == 0
    out = capsys.readouterr().out
    assert paths.id in out and "cancelled" in out and "7/9" in out and "r2" in out
    assert cli_main(["jobs", str(brain_project.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == paths.id and rows[0]["state"] == "cancelled"
    assert cli_main(["wait", str(brain_project.root), paths.id, "--quiet"]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert cli_main(["cancel", str(brain_project.root), paths.id]) == 0
    assert "nothing to cancel" in capsys.readouterr().out
    assert cli_main(["cancel", str(brain_project.root), "20260101-000000-train-abcd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("semiseg: ") and "no job" in err and len(err.splitlines()) == 1


def test_several_processes_go_through_the_engines_distributed_entry():
    from backend.jobs.runner import _engine
    from backend.engine.training import train
    from backend.engine.distributed import train_distributed

    assert _engine("train", 1) is train
    entry = _engine("train", 2)
    assert entry.func is train_distributed and entry.keywords == {"nproc": 2}


def test_resume_needs_a_run_and_its_checkpoint(brain_project, capsys):
    from backend.jobs import resume_job

    root = brain_project.root
    never_started = new_job(brain_project.jobs_dir, "train")
    write_spec(never_started, {"id": never_started.id, "kind": "train", "method": "supervised", "run": None})
    with pytest.raises(InputError, match="never named its run"):
        resume_job(root, never_started.id)
    killed = new_job(brain_project.jobs_dir, "train")
    write_spec(killed, {"id": killed.id, "kind": "train", "method": "supervised", "run": None})
    writer = EventWriter(killed.events)
    writer.emit({"type": "start", "run": "r9", "total": 10})
    writer.close()
    with pytest.raises(InputError, match="no checkpoint"):
        resume_job(root, killed.id)
    # the CLI: one line, exit 2; and `wait` on the dead job says so with exit 1
    assert cli_main(["resume", str(root), killed.id]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli_main(["wait", str(root), killed.id, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"semiseg: job {killed.id} dead:") and "log.txt" in err
