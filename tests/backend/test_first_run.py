"""The first run: the pretrained checkpoints shipped for the sample project, and the demo behind scripts/run.sh.

The shipped checkpoints must load into the CURRENT method code (a change of a method's networks that breaks them
fails here: rerun ``sample_data/train_pretrained.py``) and still segment the real sample case.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from backend.cli.demo import DEFAULT_METHODS
from backend.errors import InputError
from backend.engine.intensity import normalize_intensity
from backend.methods import get_method
from backend.engine.metrics import dice_per_class
from backend.project.sample import (PRETRAINED_RUN, RUN_FILES, copy_sample, install_pretrained, pretrained_methods,
                            pretrained_root, sample_root)
from backend.io.volume import read_volume
from conftest import REPO

METHODS = ("supervised", "supervised2d", "diffrect", "diffcl", "genericssl")  # shipped pretrained runs
DEMO_METHODS = DEFAULT_METHODS  # what the demo infers by default (supervised2d is DiffRect's benchmark baseline)


def test_every_method_has_a_small_shipped_checkpoint_that_is_package_data():
    assert pretrained_methods() == sorted(METHODS)
    files = [pretrained_root() / m / name for m in METHODS for name in RUN_FILES]
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    assert total_mb < 12, f"{total_mb:.1f} MB of pretrained runs (a few MB expected)"
    # every shipped file is matched by a package-data pattern (pyproject.toml), so an installed wheel has it
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["semiseg_sample_data"]
    root = REPO / "sample_data"
    packaged = {os.path.normpath(p) for pattern in patterns for p in glob.glob(str(root / pattern))}
    shipped = files + [pretrained_root().parent / "README.md"]
    assert [str(f) for f in shipped if str(f) not in packaged] == []


@pytest.mark.parametrize("method", METHODS)
def test_shipped_checkpoint_loads_into_the_current_method_and_segments_the_real_case(method, one_torch_thread):
    folder = pretrained_root() / method
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    config_json = json.loads((folder / "config.json").read_text())
    run = json.loads((folder / "run.json").read_text())
    assert state["method_name"] == method and run["method"] == method and run["status"] == "done"
    assert state["config"] == config_json
    cls = get_method(method)
    model = cls(cls.config_class.from_dict(config_json), "cpu")
    model.load_state_dict(state["method"])  # strict: every network key must match the current code
    for name, module in model.modules().items():
        for key, value in module.state_dict().items():
            saved = state["method"]["modules"][name][key]
            assert torch.equal(value.to(saved.dtype), saved), f"{name}.{key} not loaded"
    model.eval()

    # the real labeled sample cases, which the run validated on when it was trained (run.json): the current code
    # with the shipped (float16) weights must segment them as well as the run did (untrained networks: 0.0-0.16)
    folder = sample_root() / "brain_tissue"
    dices = []
    for case in run["val_cases"]:
        image = read_volume(folder / "imagesTr" / f"{case}_0000.nii.gz")
        label = read_volume(folder / "labelsTr" / f"{case}.nii.gz").array
        volume = torch.from_numpy(np.ascontiguousarray(normalize_intensity(image.array, "MR")[None]))
        with torch.no_grad():
            pred = model.predict(volume)
        assert pred.shape == image.shape and pred.dtype == np.uint8
        dices.append(float(np.mean(dice_per_class(pred, label, 3))))
    dice = float(np.mean(dices))
    recorded = run["best"]["dice"] if run.get("best") else run["last_validation"]["mean"]
    print(f"{method}: Dice on {run['val_cases']} {dice:.4f}, recorded at training {recorded:.4f}")
    assert recorded > 0.7 and abs(dice - recorded) < 0.02, (dice, recorded)


def test_pretrained_run_is_installed_once_and_sorts_before_trained_runs(brain_project, one_torch_thread):
    from backend.engine.inference import load_trained
    from backend.engine.training import train
    from backend.project.runs import latest_run, model_runs

    assert install_pretrained(brain_project, methods=["supervised"]) == {"supervised": PRETRAINED_RUN}
    folder = brain_project.model_dir("supervised", PRETRAINED_RUN)
    assert sorted(p.name for p in folder.iterdir()) == sorted(RUN_FILES)
    info = json.loads((folder / "run.json").read_text())
    assert info["run"] == PRETRAINED_RUN and info["unlabeled_cases"] == brain_project.unlabeled_cases()
    model, run, _ = load_trained(brain_project, "supervised", PRETRAINED_RUN, "cpu")
    assert run == PRETRAINED_RUN and not model.net.training

    (folder / "run.json").write_text(json.dumps({**info, "note": "kept"}))
    install_pretrained(brain_project, methods=["supervised"])  # an installed run is never overwritten
    assert json.loads((folder / "run.json").read_text())["note"] == "kept"

    new = train(brain_project, "supervised", preset="tiny", steps=2, device="cpu")
    assert model_runs(brain_project, "supervised") == [PRETRAINED_RUN, new]
    assert latest_run(brain_project, "supervised") == new


def test_pretrained_runs_need_the_sample_labeled_case(tmp_path):
    project = copy_sample(tmp_path / "p", "brain_tissue")
    project.label_path("mni152_t1").unlink()
    with pytest.raises(InputError, match="mni152_t1"):
        install_pretrained(project, methods=["diffrect"])
    assert not project.model_dir("diffrect", PRETRAINED_RUN).exists()


def _demo(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "backend.cli.demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_reaches_the_review_queue_with_every_method_from_the_pretrained_checkpoints(tmp_path):
    project = tmp_path / "first run"  # a space in the path: the printed commands must quote it
    tic = time.perf_counter()
    out = _demo([str(project), "--no-viewer"], timeout=500)
    seconds = time.perf_counter() - tic
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    print(f"demo first run: {seconds:.0f} s\n{text}")

    # pseudo labels and agreement scores of every method, from the shipped runs, nothing trained
    for method in DEMO_METHODS:
        scores = json.loads((project / "semiseg" / "pseudo" / method / PRETRAINED_RUN / "scores.json").read_text())
        assert sorted(scores["cases"]) == ["colin27_ch2", "colin27_ch2better"]
        assert sorted(p.name for p in (project / "semiseg" / "models" / method).iterdir()) == [PRETRAINED_RUN]
    # the review queue printed with a score column per method and the unlabeled cases on top
    table = text.split("Review queue", 1)[1]
    header = table.splitlines()[1]
    assert all(m in header for m in DEMO_METHODS), header
    rows = [line.split() for line in table.splitlines()[2:5]]
    assert {r[0] for r in rows[:2]} == {"colin27_ch2", "colin27_ch2better"} and rows[2][0] == "itk_kmeans_t1"
    cells = [r[4:4 + len(DEMO_METHODS)] for r in rows[:2]]
    assert all(re.fullmatch(r"\d\.\d{3}|-", c) for r in cells for c in r), rows
    assert all(sum(c != "-" for c in r) >= 3 for r in cells), rows  # one-view supervised has no agreement
    lowest = [min(float(c) for c in r if c != "-") for r in cells]
    assert lowest[0] <= lowest[1], rows  # the most doubtful case first
    # progress lines with the elapsed time and an ETA, during inference
    progress = [line for line in text.splitlines() if re.match(r"\[\s*[\d hmins]+\] ", line)]
    assert sum("ETA" in line for line in progress) >= len(DEMO_METHODS) * 2, progress
    assert any("review queue ready" in line for line in progress)
    # the exact commands to review (venv python, quoted project path; xvfb-run form without a display) and to train
    quoted = f"'{project.resolve()}'"
    assert f"{sys.executable} -m napari_semiseg {quoted}" in text
    assert f"xvfb-run -a {sys.executable} -m napari_semiseg {quoted}" in text
    assert f"{sys.executable} -m backend.cli.demo {quoted} --train --preset tiny" in text

    # a second run on the same project reuses the pseudo labels; --train trains, then infers with the best run
    again = _demo([str(project), "--no-viewer", "--methods", "supervised", "--train", "--steps", "2"], timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "supervised: pseudo labels of run 0-pretrained already there" in again.stdout
    runs = sorted(p.name for p in (project / "semiseg" / "models" / "supervised").iterdir())
    assert len(runs) == 2 and runs[0] == PRETRAINED_RUN
    # 2 steps validate far below the shipped run: inference keeps the pretrained run, chosen by validation
    assert "run 0-pretrained, chosen by best validation" in again.stdout, again.stdout


def test_demo_refuses_an_unknown_method_in_one_line(tmp_path):
    out = _demo([str(tmp_path / "p"), "--methods", "supervised,nosuch", "--no-viewer"], timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "nosuch" in out.stderr
    assert not (tmp_path / "p").exists()
