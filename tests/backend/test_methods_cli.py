"""Every semi-supervised method through the real CLI: `semiseg train --preset tiny` then `semiseg infer` write
each method's review views and agreement scores for every unlabeled case (issues 4, 5, 6: the end-to-end
acceptance).  The project is the real brain-tissue sample cropped around its centre (tests/engine_projects.py), so
whole-volume inference of the diffusion views stays within a CI budget on 2 CPU cores.  The commands run with the
engine's CPU thread policy (the test environment's ``OMP_NUM_THREADS`` is dropped for them: one thread on 2 cores,
where two threads on busy cores spin-wait ~10x slower per step; see ``backend.engine.training``).  Measured niced under a
load average of ~7: 55 s (diffrect), 97 s (diffcl), 63 s (genericssl) per method, each command within 400 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from backend.methods import get_method
from backend.project import Project
from backend.project.runs import pseudo_runs

from helpers.engine_projects import small_brain_project  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def semiseg(*args: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SEMISEG_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "backend.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["diffrect", "diffcl", "genericssl"])
def test_train_then_infer_writes_every_view_and_scores(method, tmp_path):
    root = small_brain_project(tmp_path / "p").root
    out = semiseg("train", root, "--method", method, "--preset", "tiny", "--steps", "4", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    out = semiseg("infer", root, "--method", method, "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    project = Project.open(root)
    views = get_method(method).views
    (run,) = pseudo_runs(project, method)
    scores = json.loads((project.pseudo_dir(method, run) / "scores.json").read_text())
    assert scores["views"] == list(views)
    for case in project.unlabeled_cases():
        image = sitk.ReadImage(str(project.image_path(case)))
        for view in views:
            label = sitk.ReadImage(str(project.pseudo_dir(method, run) / case / f"{view}.nii.gz"))
            assert label.GetSize() == image.GetSize() and label.GetOrigin() == pytest.approx(image.GetOrigin())
            assert label.GetPixelID() == sitk.sitkUInt8
        case_scores = scores["cases"][case]
        assert 0.0 <= case_scores["agreement_mean"] <= 1.0
        assert len(case_scores["agreement"]) == len(views) * (len(views) - 1) // 2
    # The review queue (CLI table) now shows the method's column of the default score, or of the one asked for.
    assert f"{method} cross" in semiseg("cases", root).stdout
    assert f"{method} mean" in semiseg("cases", root, "--sort", "mean").stdout
