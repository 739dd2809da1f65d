"""Issue 14: no label lost, no silent corruption.

Real processes are killed with SIGKILL at every step of an accept, two real processes accept at once, a real
(tmpfs) disk runs full, training jobs are killed after a checkpoint and resumed, and a table of malformed inputs
goes through the real ``semiseg`` entry point.  ``bench/faults.py`` runs the same experiments 50+ times each.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.cli import main as cli_main
from backend.errors import InputError, LabelConflictError
from backend.project.importer import init_project
from backend.project import Project
from backend.project.journal import ACCEPT_STEPS, COMMIT_STEP
from backend.io.volume import read_volume, write_volume

from helpers.fault_cases import (BRAIN_IMAGE, BRAIN_LABEL, CASE, LUNG_REFERENCE, MALFORMED, REPO, check_intact,
                         fill_disk, folder_hash, lesion_project, reference_label, semiseg, write_dicom_series)


# ---- the table of malformed inputs: exit 2, one line naming the file and the problem, nothing changed --------------
@pytest.mark.parametrize("row", MALFORMED, ids=[row.name for row in MALFORMED])
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(row, tmp_path, capsys):
    argv, project = row.build(tmp_path)
    before = folder_hash(project) if project else None
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == row.code, err
    assert len(lines) == 1 and lines[0].startswith("semiseg: "), err
    assert re.search(row.message, lines[0]), lines[0]
    assert "np.float" not in lines[0] and "Traceback" not in err
    if project is None:
        assert not (tmp_path / "project").exists()
    else:
        assert folder_hash(project) == before
        assert not any(p for p in tmp_path.iterdir() if p.name not in {"project", "out", "edited.nii.gz",
                                                                      "moved.nii.gz"})


def test_the_table_holds_at_least_30_inputs():
    assert len(MALFORMED) >= 30 and len({row.name for row in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("name", ["init-negative-label", "init-dicom-missing-slice", "accept-corrupt-history"])
def test_malformed_input_through_a_real_subprocess(name, tmp_path):
    (row,) = [r for r in MALFORMED if r.name == name]
    argv, project = row.build(tmp_path)
    before = folder_hash(project) if project else None
    out = semiseg(*argv)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == row.code and len(lines) == 1 and re.search(row.message, lines[0]), out.stderr
    assert (folder_hash(project) == before) if project else not (tmp_path / "project").exists()


# ---- the seven defects of issue 14, each with a test that failed before the fix ------------------------------------
def _negative_label_scans(tmp: Path) -> tuple[Path, Path]:
    images, labels = tmp / "scans", tmp / "labels"
    images.mkdir()
    labels.mkdir()
    (images / "case1_0000.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    label = read_volume(BRAIN_LABEL)
    write_volume(label.like(-(label.array.astype(np.int16))), labels / "case1.nii.gz")  # values {0, -1}
    return images, labels


def test_defect1_negative_label_values_are_refused_not_stored_as_255(tmp_path):
    images, labels = _negative_label_scans(tmp_path)
    out = semiseg("init", tmp_path / "p", "--images", images, "--labels", labels)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == (f"semiseg: {labels / 'case1.nii.gz'}: label values must be integers 0..255; "
                                  f"found -1")
    assert not (tmp_path / "p").exists()


def test_defect1_a_project_that_declares_a_negative_label_is_refused_in_one_line(tmp_path, capsys):
    project = lesion_project(tmp_path / "p")
    dataset = json.loads(project.dataset_path.read_text())
    dataset["labels"]["label_-1"] = -1  # what init wrote before the fix
    project.dataset_path.write_text(json.dumps(dataset))
    assert cli_main(["train", str(project.root), "--method", "supervised", "--preset", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"semiseg: {project.dataset_path}: invalid dataset.json") and "-1" in err
    assert "\n" not in err


def test_defect2_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    write_dicom_series(tmp_path / "complete", slices=10, spacing=1.5)
    complete = read_volume(tmp_path / "complete")
    assert complete.shape[0] == 10 and complete.spacing[2] == pytest.approx(1.5)
    write_dicom_series(tmp_path / "gap", slices=10, spacing=1.5)
    (tmp_path / "gap" / "slice004.dcm").unlink()  # 9 slices, one 3 mm gap: read as 9 x 1.667 mm before the fix
    with pytest.raises(InputError, match=r"non-uniform slice spacing: slices 4 and 5 are 3 mm apart, the others "
                                         r"1\.5 mm \(a missing slice\?\); 9 slices found"):
        read_volume(tmp_path / "gap")


def test_defect3_a_full_disk_after_the_label_leaves_no_label_without_history(tmp_path, monkeypatch):
    project = lesion_project(tmp_path / "p")
    before = folder_hash(project.root)
    import shutil

    def disk_full(*args, **kwargs):  # the snapshot copy fails: the disk ran full right after the label
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises((InputError, OSError), match="No space left on device"):
        project.accept(CASE, reference_label(), source="test")
    monkeypatch.undo()
    reopened = Project.open(project.root)
    assert not reopened.is_labeled(CASE) and reopened.history(CASE) == []
    assert reopened.verify() == [] and folder_hash(project.root) == before


def test_defect3_accept_refuses_a_label_that_changed_since_it_was_opened(tmp_path):
    project = lesion_project(tmp_path / "p")
    assert project.label_version(CASE) is None
    opened = project.label_version(CASE)  # the reviewer opens the unlabeled case
    other = Project.open(project.root)
    other.accept(CASE, reference_label(10), source="other reviewer")  # meanwhile, somebody else accepts it
    assert project.label_version(CASE) is not None
    before = folder_hash(project.root)
    with pytest.raises(LabelConflictError, match=f"the label of case '{CASE}' changed on disk since it was opened"):
        project.accept(CASE, reference_label(20), expected_version=opened)
    assert folder_hash(project.root) == before
    # with the current version the accept goes through, and the version changes again
    current = project.label_version(CASE)
    project.accept(CASE, reference_label(20), expected_version=current)
    assert project.label_version(CASE) != current and len(project.history(CASE)) == 2
    assert project.verify() == []


def test_defect4_stale_temp_files_of_a_killed_accept_are_removed_on_open(tmp_path):
    project = lesion_project(tmp_path / "p")
    stale = project.root / "labelsTr" / ".tmp-k3l9x2_q.nii.gz"  # what a killed accept left before the fix
    stale.write_bytes(BRAIN_LABEL.read_bytes()[:100])
    project.tmp_dir.mkdir(parents=True, exist_ok=True)
    (project.tmp_dir / "20261201T000000.000000Z-abcd.label.nii.gz").write_bytes(b"partial")
    reopened = Project.open(project.root)
    assert not stale.exists() and not any(project.tmp_dir.iterdir())
    assert reopened.labeled_cases() == ["radiomics_brain1"] and reopened.verify() == []


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_defect5_project_files_respect_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        scans = tmp_path / "scans"
        scans.mkdir()
        (scans / "case1_0000.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
        project = init_project(tmp_path / "p", scans)
        record = project.accept("case1", read_volume(BRAIN_LABEL), source="test")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = [project.dataset_path, project.image_path("case1"), project.label_path("case1"),
             project.history_path("case1"), project.semiseg / "history" / record["snapshot"]]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): oct(expected) for f in files}


@pytest.mark.parametrize("command", ["train", "infer"])
def test_defect6_foreground_run_names_cannot_leave_the_project(command, tmp_path):
    project = lesion_project(tmp_path / "projects" / "p")
    before = folder_hash(tmp_path)
    extra = ["--preset", "tiny"] if command == "train" else []
    out = semiseg(command, project.root, "--method", "supervised", "--device", "cpu", "--run", "../../../../x", *extra)
    assert out.returncode == 2, out.stdout + out.stderr
    assert re.fullmatch(r"semiseg: .*: invalid run name '\.\./\.\./\.\./\.\./x' \(.*\)", out.stderr.strip())
    assert folder_hash(tmp_path) == before and not (tmp_path / "x").exists()


def test_defect7_messages_print_plain_numbers_and_name_a_hidden_file(tmp_path):
    project = lesion_project(tmp_path / "p")
    reference = read_volume(LUNG_REFERENCE)
    moved = reference.like(reference.array)
    moved.origin = (reference.origin[0] + 2.5, reference.origin[1], reference.origin[2])
    write_volume(moved, tmp_path / "moved.nii.gz")
    out = semiseg("accept", project.root, CASE, tmp_path / "moved.nii.gz")
    assert out.returncode == 2 and "np.float64" not in out.stderr, out.stderr
    assert re.search(r"label does not match its image: origin \(-?[\d.]+, -?[\d.]+, -?[\d.]+\) differs from "
                     r"\(-?[\d.]+, -?[\d.]+, -?[\d.]+\)$", out.stderr.strip()), out.stderr
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "..x_0000.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    out = semiseg("init", tmp_path / "q", "--images", scans)
    assert out.returncode == 2 and "no images found" not in out.stderr
    assert out.stderr.strip().startswith(f"semiseg: {scans / '..x_0000.nii.gz'}: hidden file"), out.stderr


# ---- SIGKILL at each step of an accept, in a real `semiseg accept` process -----------------------------------------
@pytest.mark.parametrize("step", ACCEPT_STEPS)
def test_sigkill_at_each_step_of_accept_then_open_completes_or_rolls_back(step, tmp_path):
    project = lesion_project(tmp_path / "p")
    old = reference_label(0)
    project.accept(CASE, old, source="first")  # the label a crash must not lose
    new = reference_label(40)
    write_volume(read_volume(LUNG_REFERENCE).like(new), tmp_path / "new.nii.gz")
    out = semiseg("accept", project.root, CASE, tmp_path / "new.nii.gz", env={"SEMISEG_FAULT_AT": step})
    assert out.returncode == -signal.SIGKILL, out.stderr
    if step != ACCEPT_STEPS[-1]:
        assert any(project.tmp_dir.iterdir())  # the killed process left its transaction behind
    state = check_intact(project.root, CASE, old, new, old_records=1)
    expected = "new" if ACCEPT_STEPS.index(step) >= ACCEPT_STEPS.index(COMMIT_STEP) else "old"
    assert state == expected
    assert not any(project.tmp_dir.iterdir()) and not list(project.root.rglob(".tmp-*"))


def test_a_recovery_killed_midway_is_completed_by_the_next_open(tmp_path):
    project = lesion_project(tmp_path / "p")
    new = reference_label(0)
    project_env = {"SEMISEG_FAULT_AT": "renamed_snapshot"}
    write_volume(read_volume(LUNG_REFERENCE).like(new), tmp_path / "new.nii.gz")
    assert semiseg("accept", project.root, CASE, tmp_path / "new.nii.gz", env=project_env).returncode == -9
    # `semiseg cases` opens the project: its recovery is killed after renaming the label into place
    assert semiseg("cases", project.root, env={"SEMISEG_FAULT_AT": "renamed_label"}).returncode == -9
    assert check_intact(project.root, CASE, None, new, old_records=0) == "new"


# ---- two accepts at once -------------------------------------------------------------------------------------------
_RACER = """
import sys, time
from pathlib import Path
import numpy as np
from backend.errors import LabelConflictError
from backend.project import Project, ANY
root, case, edit, go, mode = sys.argv[1:]
project = Project.open(root)
version = project.label_version(case) if mode == "versioned" else ANY
from helpers.fault_cases import reference_label
array = reference_label(int(edit))
while not Path(go).exists():
    time.sleep(0.001)
try:
    record = project.accept(case, array, source=f"racer {edit}", expected_version=version)
    print("ok", record["tx"])
except LabelConflictError as exc:
    print("conflict", exc)
"""


def _race(root: Path, tmp: Path, mode: str) -> list[str]:
    go = tmp / "go"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(root), CASE, str(edit), str(go), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for edit in (10, 20)]
    time.sleep(3.0)  # both have imported numpy/nibabel and read the label version
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [o[0].split()[0] for o in outs]


def test_two_concurrent_accepts_of_one_opened_version_one_wins_one_is_refused(tmp_path):
    project = lesion_project(tmp_path / "p")
    project.accept(CASE, reference_label(0), source="first")
    results = _race(project.root, tmp_path, "versioned")
    assert sorted(results) == ["conflict", "ok"]
    reopened = Project.open(project.root)
    history = reopened.history(CASE)
    assert len(history) == 2 and reopened.verify() == []
    winner = 10 if results[0] == "ok" else 20
    assert history[-1]["source"] == f"racer {winner}"
    np.testing.assert_array_equal(reopened.read_label(CASE).array, reference_label(winner))


def test_two_concurrent_accepts_without_a_version_are_serialized(tmp_path):
    project = lesion_project(tmp_path / "p")
    assert _race(project.root, tmp_path, "any") == ["ok", "ok"]
    reopened = Project.open(project.root)
    history = reopened.history(CASE)
    assert len(history) == 2 and reopened.verify() == []  # the label is the last record's snapshot
    assert reopened.labeled_cases() == ["radiomics_brain1", CASE]
    last = int(history[-1]["source"].split()[-1])
    np.testing.assert_array_equal(reopened.read_label(CASE).array, reference_label(last))


# ---- a full disk (a small tmpfs) -------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs mount: root on Linux only")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_the_accept_in_one_line_and_changes_nothing(small_disk, tmp_path):
    project = lesion_project(small_disk / "p")
    project.accept(CASE, reference_label(0), source="first")
    noisy = (np.random.default_rng(0).random(reference_label().shape) < 0.5).astype(np.uint8)  # ~230 kB gzipped
    write_volume(read_volume(LUNG_REFERENCE).like(noisy), tmp_path / "noisy.nii.gz")
    outcomes = set()
    for leave in (0, 64 << 10, 256 << 10, 400 << 10):
        before = folder_hash(project.root)
        filler = fill_disk(small_disk, leave)
        out = semiseg("accept", project.root, CASE, tmp_path / "noisy.nii.gz")
        filler.unlink()
        if out.returncode == 0:
            outcomes.add("accepted")
            assert check_intact(project.root, CASE, None, noisy, len(Project.open(project.root).history(CASE)) - 1) \
                == "new"
            break
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], out.stderr
        assert "nothing was changed" in lines[0] or lines[0].startswith("semiseg: ")
        assert folder_hash(project.root) == before and Project.open(project.root).verify() == []
        outcomes.add("refused")
    assert "refused" in outcomes
    # room again: the same accept goes through
    if "accepted" not in outcomes:
        assert semiseg("accept", project.root, CASE, tmp_path / "noisy.nii.gz").returncode == 0
    assert Project.open(project.root).verify() == []


# ---- training jobs killed after a checkpoint resume and finish ------------------------------------------------------
@pytest.mark.slow
def test_a_training_job_killed_twice_after_checkpoints_resumes_to_a_loadable_checkpoint(brain_project):
    import torch

    from backend.jobs import job_status, resume_job, start_job, wait_job
    from helpers.jobs import TIMEOUT, train_spec, wait_for_event

    root = brain_project.root
    job = start_job(root, train_spec(10))
    run = None
    killed_at = []
    for _ in range(2):
        seen = wait_for_event(root, job, "checkpoint")
        run = run or seen[0]["run"]
        os.kill(job_status(root, job)["pid"], signal.SIGKILL)
        assert wait_job(root, job, timeout=30)["state"] == "dead"
        checkpoint = brain_project.model_dir("supervised", run) / "checkpoint.pt"
        killed_at.append(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
        job = resume_job(root, job)
    status = wait_job(root, job, timeout=TIMEOUT)
    assert status["state"] == "done" and status["step"] == 10 and status["run"] == run, status
    assert killed_at[0] < killed_at[1] < 10
    state = torch.load(brain_project.model_dir("supervised", run) / "checkpoint.pt", map_location="cpu",
                       weights_only=True)
    assert state["step"] == 10 and state["method_name"] == "supervised"
