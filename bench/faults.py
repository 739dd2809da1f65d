"""Fault campaign (issue 14): does any crash, race, full disk or bad input lose or corrupt a label?

Experiments, each repeated ``--tries`` times (kills at a named step 50+ times each by default):

* ``kill at <step>``: a real process (forked from this one, numpy/nibabel already imported) accepts a corrected
  label of the real lesions sample case ``radiomics_lung2`` and is SIGKILLed at one named step of the accept
  transaction (``SEMISEG_FAULT_AT``); then the project is opened (recovery) and checked.
* ``random kill, 256^3``: the same with a 256^3 label (the real MNI152 GM/WM reference label padded to 256^3),
  SIGKILLed from outside after a random delay within the accept's measured duration.
* ``concurrent accepts``: two processes accept the same case at once, with the version they opened
  (one must win, the other be refused with a conflict) or without one (both are serialized).
* ``full disk``: accepts on a small tmpfs filled to a sweep of free sizes (skipped where no tmpfs can be mounted).
* ``killed training job``: a tiny ``supervised`` job is SIGKILLed after a checkpoint, resumed, and must finish
  with a checkpoint that ``torch.load(weights_only=True)`` reads.
* ``malformed input``: each row of the table in ``tests/fault_cases.py`` through the real CLI entry point.

Columns: tries / clean (the operation completed, or a killed one was rolled back or completed by recovery, and
the project verifies) / clean error (refused with one line, exit 2, nothing changed) / lost or corrupted.

    python bench/faults.py                  # 50 kills per step, the full campaign
    python bench/faults.py --tries 5        # a quick pass
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from backend.errors import InputError, LabelConflictError  # noqa: E402
from backend.project import ANY, Project  # noqa: E402
from backend.project.journal import ACCEPT_STEPS, COMMIT_STEP
from backend.io.volume import Volume, read_volume  # noqa: E402
from helpers.fault_cases import (CASE, MALFORMED, SAMPLE, check_intact, fill_disk, folder_hash,  # noqa: E402
                         lesion_project, reference_label)

Row = dict[str, Any]


def _row(name: str) -> Row:
    return {"experiment": name, "tries": 0, "clean": 0, "clean error": 0, "lost or corrupted": 0, "notes": {}}


def _note(row: Row, what: str) -> None:
    row["notes"][what] = row["notes"].get(what, 0) + 1


def _fork(work: Callable[[], int]) -> int:
    """Run ``work`` in a forked child; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = work()
        except LabelConflictError:
            code = 3
        except InputError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _classify_kill(row: Row, state: str, expected: str | None) -> None:
    row["tries"] += 1
    if state in ("old", "new"):
        row["clean"] += 1
        _note(row, {"old": "rolled back", "new": "completed"}[state])
        if expected and state != expected:
            _note(row, f"expected {expected}")
    else:
        row["lost or corrupted"] += 1
        _note(row, state[:80])


# ---- SIGKILL at each step ----------------------------------------------------------------------------------------
def kill_at_steps(work: Path, tries: int) -> list[Row]:
    project = lesion_project(work / "steps")
    old = reference_label(0)
    project.accept(CASE, old, source="first")
    rows = []
    for step in ACCEPT_STEPS:
        row = _row(f"kill at {step}")
        expected = "new" if ACCEPT_STEPS.index(step) >= ACCEPT_STEPS.index(COMMIT_STEP) else "old"
        for i in range(tries):
            records = len(project.history(CASE))
            new = reference_label(1 + (len(project.history(CASE)) * 7 + i) % 5000)
            if np.array_equal(new, old):
                new = reference_label(5001)

            def accept(new=new, step=step) -> int:
                os.environ["SEMISEG_FAULT_AT"] = step
                Project(project.root).accept(CASE, new, source="bench")
                return 0

            code = _fork(accept)
            if code != -signal.SIGKILL:
                row["tries"] += 1
                row["lost or corrupted"] += 1
                _note(row, f"not killed (exit {code})")
                continue
            state = check_intact(project.root, CASE, old, new, records)
            _classify_kill(row, state, expected)
            if state == "new":
                old = new
        rows.append(row)
    return rows


# ---- random kills of a 256^3 accept ------------------------------------------------------------------------------
def _padded(volume: Volume, size: int = 256) -> Volume:
    array = np.zeros((size, size, size), volume.array.dtype)
    z, y, x = volume.shape
    array[:z, :y, :x] = volume.array
    return Volume(array, volume.spacing, volume.origin, volume.direction)


def random_kills(work: Path, tries: int, seed: int = 0) -> Row:
    root = SAMPLE / "brain_tissue"
    image = _padded(read_volume(root / "imagesTr" / "mni152_t1_0000.nii.gz"))
    label = _padded(read_volume(root / "labelsTr" / "mni152_t1.nii.gz")).array.astype(np.uint8)
    project = Project.create(work / "big", labels={0: "background", 1: "GM", 2: "WM"}, name="big")
    project.add_case("mni256", image)
    project.accept("mni256", label, source="first")
    durations = []  # how long a forked child's accept takes (a previous label to compare with, as in the tries)
    for k in range(3):
        label = label.copy()
        label[10 + k, 10:20, 10:20] = 1
        t0 = time.perf_counter()
        _fork(lambda label=label: (Project(project.root).accept("mni256", label, source="calibration"), 0)[1])
        durations.append(time.perf_counter() - t0)
    duration = float(np.median(durations))
    old = label
    rng = random.Random(seed)
    row = _row("random kill during a 256^3 accept")
    for i in range(tries):
        new = old.copy()
        new[100 + i % 50, 100:140, 100:140] = (i % 2) + 1
        records = len(project.history("mni256"))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                Project(project.root).accept("mni256", new, source="bench")
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 1.2 * duration))  # mostly mid-accept, some after it ended
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        finished = not os.WIFSIGNALED(status)
        state = check_intact(project.root, "mni256", old, new, records)
        _classify_kill(row, state, "new" if finished else None)
        if finished:
            _note(row, "finished before the kill")
        if state == "new":
            old = new
    row["notes"][f"accept {duration * 1000:.0f} ms"] = 1
    return row


# ---- concurrent accepts ------------------------------------------------------------------------------------------
def concurrent(work: Path, tries: int, versioned: bool) -> Row:
    project = lesion_project(work / ("race-v" if versioned else "race"))
    project.accept(CASE, reference_label(0), source="first")
    row = _row("two concurrent accepts, " + ("same opened version" if versioned else "no version"))
    for i in range(tries):
        records = len(project.history(CASE))
        labels = [reference_label(10 + 2 * i), reference_label(11 + 2 * i)]
        read_fd, write_fd = os.pipe()
        pids = []
        for label in labels:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    os.close(write_fd)
                    opened = Project(project.root)
                    version = opened.label_version(CASE) if versioned else ANY
                    os.read(read_fd, 1)  # the start gun: both read their version first
                    opened.accept(CASE, label, source="racer", expected_version=version)
                    code = 0
                except LabelConflictError:
                    code = 3
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(read_fd)
        time.sleep(0.3)
        os.write(write_fd, b"gg")
        os.close(write_fd)
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.WEXITSTATUS(status))
        reopened = Project.open(project.root)
        history = reopened.history(CASE)
        problems = reopened.verify()
        current = reopened.read_label(CASE).array
        row["tries"] += 1
        if versioned:
            ok = sorted(codes) == [0, 3] and len(history) == records + 1 and not problems \
                and np.array_equal(current, labels[codes.index(0)])
        else:
            ok = codes == [0, 0] and len(history) == records + 2 and not problems \
                and any(np.array_equal(current, label) for label in labels)
        if ok:
            row["clean"] += 1
            if versioned:
                row["clean error"] += 0  # the refused racer is counted in the notes
                _note(row, "one refused with a conflict")
        else:
            row["lost or corrupted"] += 1
            _note(row, f"exit codes {codes}, history {len(history) - records}, {problems}"[:80])
    return row


# ---- a full disk -------------------------------------------------------------------------------------------------
def full_disk(work: Path, tries: int) -> Row:
    row = _row("accept on a full disk (tmpfs)")
    mount = work / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        row["notes"]["skipped: needs root on Linux for a tmpfs mount"] = 1
        return row
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        row["notes"][f"skipped: {done.stderr.strip()[:60]}"] = 1
        return row
    try:
        project = lesion_project(mount / "p")
        project.accept(CASE, reference_label(0), source="first")
        rng = np.random.default_rng(0)
        shape = reference_label().shape
        for i in range(tries):
            leave = int(i * (1 << 20) / max(1, tries - 1))  # 0 .. 1 MB free
            noisy = (rng.random(shape) < 0.5).astype(np.uint8)  # incompressible-ish: ~230 kB per copy
            before = folder_hash(project.root)
            old = project.read_label(CASE).array
            records = len(project.history(CASE))
            filler = fill_disk(mount, leave)
            error = None
            try:
                Project.open(project.root).accept(CASE, noisy, source="bench")
            except InputError as exc:
                error = str(exc)
            filler.unlink()
            row["tries"] += 1
            state = check_intact(project.root, CASE, old, noisy, records)
            if error is None and state == "new":
                row["clean"] += 1
            elif error and "No space left" in error and "\n" not in error and state == "old" \
                    and folder_hash(project.root) == before:
                row["clean error"] += 1
            else:
                row["lost or corrupted"] += 1
                _note(row, f"{state} / {error}"[:80])
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    return row


# ---- killed training jobs ----------------------------------------------------------------------------------------
def killed_training(work: Path, tries: int) -> Row:
    import torch

    from backend.jobs import job_status, resume_job, start_job, wait_job
    from backend.project.sample import copy_sample
    from test_jobs_real import TIMEOUT, train_spec, wait_for_event

    row = _row("training job SIGKILLed after a checkpoint, resumed")
    for i in range(tries):
        project = copy_sample(work / f"train{i}", "brain_tissue")
        root = project.root
        row["tries"] += 1
        try:
            job = start_job(root, train_spec(8))
            seen = wait_for_event(root, job, "checkpoint")
            run = seen[0]["run"]
            os.kill(job_status(root, job)["pid"], signal.SIGKILL)
            dead = wait_job(root, job, timeout=60)["state"]
            resumed = resume_job(root, job)
            status = wait_job(root, resumed, timeout=TIMEOUT)
            state = torch.load(project.model_dir("supervised", run) / "checkpoint.pt", map_location="cpu",
                               weights_only=True)
            if dead == "dead" and status["state"] == "done" and state["step"] == 8:
                row["clean"] += 1
            else:
                row["lost or corrupted"] += 1
                _note(row, f"{dead} -> {status['state']}, step {state['step']}")
        except Exception as exc:  # noqa: BLE001 - a failed try is reported, not raised
            row["lost or corrupted"] += 1
            _note(row, f"{type(exc).__name__}: {exc}"[:80])
        shutil.rmtree(root, ignore_errors=True)
    return row


# ---- malformed inputs --------------------------------------------------------------------------------------------
def malformed(work: Path) -> Row:
    import re

    from backend.cli import main as cli_main

    row = _row(f"malformed input ({len(MALFORMED)} kinds)")
    for i, case in enumerate(MALFORMED):
        tmp = work / f"bad{i}"
        tmp.mkdir()
        argv, project = case.build(tmp)
        before = folder_hash(project) if project else None
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli_main(argv)
            except BaseException as exc:  # noqa: BLE001 - a traceback is a finding
                code = f"{type(exc).__name__}"
        lines = err.getvalue().strip().splitlines()
        unchanged = folder_hash(project) == before if project else not (tmp / "project").exists()
        row["tries"] += 1
        if code == case.code and len(lines) == 1 and re.search(case.message, lines[0]) and unchanged:
            row["clean error"] += 1
        else:
            row["lost or corrupted"] += 1
            _note(row, f"{case.name}: exit {code}, {lines[:1]}"[:100])
    return row


# ---- report ------------------------------------------------------------------------------------------------------
def report(rows: list[Row], args: argparse.Namespace, seconds: float) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Fault campaign: no label lost ({now})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
             f"python {platform.python_version()}; took {seconds / 60:.1f} min",
             f"- `python bench/faults.py --tries {args.tries} --random-tries {args.random_tries} --race-tries "
             f"{args.race_tries} --disk-tries {args.disk_tries} --train-tries {args.train_tries}`",
             "- data: the real lesions sample project (case radiomics_lung2, 61x162x183, its reference label with "
             "distinct edits per try); the 256^3 case is the real MNI152 scan and GM/WM label padded to 256^3",
             "- clean: completed, or killed and then rolled back / completed by the recovery on open, and "
             "`Project.verify()` finds nothing; clean error: refused with one line, exit 2, nothing changed", "",
             "| experiment | tries | clean | clean error | lost or corrupted | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        notes = ", ".join(f"{k}: {v}" if v > 1 or not k.startswith(("skipped", "accept")) else k
                          for k, v in row["notes"].items())
        lines.append(f"| {row['experiment']} | {row['tries']} | {row['clean']} | {row['clean error']} | "
                     f"{row['lost or corrupted']} | {notes} |")
    total = sum(r["lost or corrupted"] for r in rows)
    lines += ["", f"Lost or corrupted in all: {total} of {sum(r['tries'] for r in rows)} tries."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=50, help="kills per accept step")
    p.add_argument("--random-tries", type=int, default=64, help="random-time kills of a 256^3 accept")
    p.add_argument("--race-tries", type=int, default=30, help="pairs of concurrent accepts (each kind)")
    p.add_argument("--disk-tries", type=int, default=30, help="accepts on a full tmpfs")
    p.add_argument("--train-tries", type=int, default=3, help="killed and resumed training jobs")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "random", "race", "disk", "train", "malformed"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.md")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="semiseg-faults-") as tmp:
        work = Path(tmp)
        plan = [("steps", lambda: rows.extend(kill_at_steps(work, args.tries))),
                ("random", lambda: rows.append(random_kills(work, args.random_tries))),
                ("race", lambda: rows.extend([concurrent(work, args.race_tries, True),
                                              concurrent(work, args.race_tries, False)])),
                ("disk", lambda: rows.append(full_disk(work, args.disk_tries))),
                ("malformed", lambda: rows.append(malformed(work))),
                ("train", lambda: rows.append(killed_training(work, args.train_tries)))]
        for name, run in plan:
            if name in args.skip:
                continue
            start = time.perf_counter()
            run()
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    text = report(rows, args, time.perf_counter() - t0)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 1 if any(r["lost or corrupted"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
