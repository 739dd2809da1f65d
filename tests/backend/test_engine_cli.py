"""The engine through the real ``semiseg`` command line: sample -> train -> infer -> export, and the learning check.

The learning check is honest: the supervised ``tiny`` preset (a 4-feature V-Net, 32^3 patches, 200 steps) trains
on the one labeled real volume of the brain-tissue sample (MNI152 T1, grey / white matter), and its whole-volume
validation Dice on that volume (``val_on_train``: the only labeled case) must exceed 0.8 for both classes' mean.

Budget on a loaded 2-core machine: the commands run with the engine's CPU thread policy (``OMP_NUM_THREADS``
from the test environment is dropped for them, so training takes one thread there: two threads on two busy cores
spin-wait, 10x slower per step, see ``backend.engine.training``); measured under a load average of ~8 (niced) the
whole test took 2 min against the 15 min pytest limit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from backend.cli import main as cli_main
from backend.project import Project


def semiseg(*args, timeout=420) -> subprocess.CompletedProcess:
    """``semiseg ARGS`` in a child process with the engine's own CPU thread policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SEMISEG_THREADS")}
    result = subprocess.run([sys.executable, "-m", "backend.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"semiseg {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_sample_train_infer_export_through_the_cli(tmp_path):
    root = tmp_path / "p"
    semiseg("sample", root)
    out = semiseg("train", root, "--method", "supervised", "--preset", "tiny", "--device", "cpu").stdout
    assert "step 200/200" in out and "done: run" in out and "validation at step 200" in out
    if (os.cpu_count() or 1) == 2 and len(os.sched_getaffinity(0)) == 2:
        assert "on cpu (1 thread)" in out  # the thread policy reached the command

    project = Project.open(root)
    (run,) = [p.name for p in (project.semiseg / "models" / "supervised").iterdir()]
    folder = project.model_dir("supervised", run)
    assert (folder / "checkpoint.pt").is_file() and (folder / "config.json").is_file()
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if m["type"] == "train"]) == 200
    final = [m for m in metrics if m["type"] == "validation"][-1]
    assert final["step"] == 200 and final["val_on_train"] is True
    assert final["mean"] > 0.8, f"tiny supervised V-Net did not fit its training volume: {final}"  # learning check
    assert min(final["dice"].values()) > 0.7, final

    best = json.loads((folder / "run.json").read_text())["best"]
    assert best["step"] in (100, 200) and (folder / "best.pt").is_file()
    out = semiseg("infer", root, "--method", "supervised", "--device", "cpu").stdout
    assert "case 2/2" in out and "supervised cross" in out  # progress lines, then the review queue
    assert f"best checkpoint, step {best['step']}, validation Dice {best['dice']:.3f}; best run by validation" in out
    for case in project.unlabeled_cases():
        assert (project.pseudo_dir("supervised", run) / case / "prediction.nii.gz").is_file()
    scores = json.loads((project.pseudo_dir("supervised", run) / "scores.json").read_text())
    assert sorted(scores["cases"]) == project.unlabeled_cases()
    wm = {c: s["volume_ml"]["prediction"]["WM"] for c, s in scores["cases"].items()}
    assert all(200 < v < 1500 for v in wm.values()), wm  # a plausible adult white-matter volume, in ml

    for fmt in ("nii.gz", "nrrd", "seg.nrrd"):
        dest = tmp_path / fmt
        semiseg("export", root, dest, "--format", fmt, "--source", "supervised")
        for case in project.unlabeled_cases():
            exported = sitk.ReadImage(str(dest / f"{case}.{fmt}"))
            image = sitk.ReadImage(str(project.image_path(case)))
            assert exported.GetSize() == image.GetSize()
            assert np.allclose(exported.GetOrigin(), image.GetOrigin(), atol=1e-4)
            assert np.allclose(exported.GetSpacing(), image.GetSpacing(), atol=1e-6)
            assert np.allclose(exported.GetDirection(), image.GetDirection(), atol=1e-6)
            pseudo = sitk.ReadImage(str(project.pseudo_dir("supervised", run) / case / "prediction.nii.gz"))
            assert np.array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(pseudo))


def test_background_flag_hands_the_spec_to_the_jobs_subsystem(brain_project, monkeypatch, capsys):
    import backend.jobs

    specs = []
    monkeypatch.setattr(backend.jobs, "start_job", lambda root, spec: specs.append((root, spec)) or "job-1")
    assert cli_main(["train", str(brain_project.root), "--method", "supervised", "--preset", "tiny", "--steps", "7",
                     "--background"]) == 0
    assert cli_main(["infer", str(brain_project.root), "--method", "supervised", "--background"]) == 0
    assert capsys.readouterr().out.split() == ["job-1", "job-1"]
    (root, train_spec), (_, infer_spec) = specs
    assert root == brain_project.root
    assert train_spec == {"kind": "train", "method": "supervised", "preset": "tiny", "steps": 7, "device": "auto",
                          "run": None, "resume": False, "nproc": 1}
    assert infer_spec["kind"] == "infer" and infer_spec["method"] == "supervised"


def test_cli_reports_bad_input_in_one_line(brain_project, capsys):
    assert cli_main(["train", str(brain_project.root), "--method", "supervised", "--device", "cuda:7"]) == 2 or \
        __import__("torch").cuda.device_count() > 7
    assert cli_main(["export", str(brain_project.root), str(brain_project.root / "x"), "--source", "supervised"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("semiseg: ") and "no pseudo labels" in err[-1]
