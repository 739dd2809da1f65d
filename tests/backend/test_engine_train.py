"""The training loop: run files, events, checkpoints (weights_only), cancel + resume, case split, devices."""
from __future__ import annotations

import json

import pytest
import torch

from backend.engine.devices import available_devices, pick_device
from backend.errors import InputError
from backend.engine.checkpoints import load_checkpoint
from backend.engine.training import train
from helpers.engine_projects import small_brain_project

FAST = {"val_every": 1000, "checkpoint_every": 1000}  # validation and checkpoint only at the end


@pytest.fixture
def small(tmp_path):
    return small_brain_project(tmp_path / "small")


def test_train_writes_checkpoint_config_run_and_metrics(small):
    events = []
    run = train(small, "supervised", preset="tiny", steps=4, device="cpu",
                overrides={"val_every": 2, "checkpoint_every": 3}, on_event=events.append)
    folder = small.model_dir("supervised", run)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert [e["step"] for e in events if e["type"] == "validation"] == [2, 4]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3, 4]
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 4 and progress[-1]["total"] == 4 and progress[-1]["eta_s"] == 0
    assert {"losses", "lr", "seconds_per_step", "eta_s"} <= set(progress[-1]) and "loss" in progress[-1]["losses"]
    val = [e for e in events if e["type"] == "validation"][-1]
    assert set(val["dice"]) == {"GM", "WM"} and 0 <= val["mean"] <= 1

    ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["method_name"] == "supervised"
    assert set(ckpt["method"]["modules"]) == {"net"} and ckpt["sampler"]["index"] == 4
    assert ckpt["config"]["num_classes"] == 3 and ckpt["config"]["max_steps"] == 4
    assert json.loads((folder / "config.json").read_text())["patch_size"] == [32, 32, 32]
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "done" and info["steps_done"] == 4 and info["preset"] == "tiny"
    assert info["labeled_cases"] == ["mni152_t1"] and info["labeled_count"] == 1 and info["val_on_train"] is True
    assert info["unlabeled_cases"] == ["colin27_ch2", "colin27_ch2better", "itk_kmeans_t1"]
    assert info["device"] == "cpu"
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    assert all(line["lr"] > 0 and line["loss"] > 0 for line in train_lines)
    assert train_lines[0]["lr"] == pytest.approx(0.01) and train_lines[-1]["lr"] < train_lines[0]["lr"]  # poly
    assert [line["step"] for line in lines if line["type"] == "validation"] == [2, 4]


def test_cancel_then_resume_matches_an_uninterrupted_run(small):
    whole = train(small, "supervised", preset="tiny", steps=6, device="cpu", overrides=FAST)
    calls = {"n": 0}

    def stop_after_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    events = []
    part = train(small, "supervised", preset="tiny", steps=6, device="cpu", overrides=FAST,
                 should_stop=stop_after_3, on_event=events.append)
    assert events[-1] == {"type": "cancelled", "step": 3, "run": part}
    folder = small.model_dir("supervised", part)
    assert json.loads((folder / "run.json").read_text())["status"] == "cancelled"
    assert load_checkpoint(folder / "checkpoint.pt")["step"] == 3

    events = []
    again = train(small, "supervised", run=part, resume=True, device="cpu", on_event=events.append)
    assert again == part and events[0]["step"] == 3 and events[0]["resumed"] and events[-1]["type"] == "done"
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "done" and info["steps_done"] == 6
    a = load_checkpoint(small.model_dir("supervised", whole) / "checkpoint.pt")
    b = load_checkpoint(folder / "checkpoint.pt")
    assert b["step"] == 6
    for key, tensor in a["method"]["modules"]["net"].items():
        assert torch.equal(tensor, b["method"]["modules"]["net"][key]), key
    losses = lambda run: [(m["step"], m["loss"]) for m in map(json.loads, (  # noqa: E731
        small.model_dir("supervised", run) / "metrics.jsonl").read_text().splitlines()) if m["type"] == "train"]
    assert losses(part) == losses(whole)  # same batches, same numbers, no duplicated lines


def test_a_small_labeled_set_is_all_trained_on(tmp_path):
    """Two labeled cases: both are trained on (a just-accepted correction must count), validation on them."""
    project = small_brain_project(tmp_path / "two", labeled=2)
    run = train(project, "supervised", preset="tiny", steps=1, device="cpu", overrides=FAST)
    info = json.loads((project.model_dir("supervised", run) / "run.json").read_text())
    assert info["val_on_train"] is True and info["labeled_count"] == 2
    assert sorted(info["labeled_cases"]) == sorted(info["val_cases"]) == ["itk_kmeans_t1", "mni152_t1"]
    assert info["unlabeled_cases"] == ["colin27_ch2", "colin27_ch2better"]
    second = train(project, "supervised", preset="tiny", steps=1, device="cpu", overrides=FAST)
    assert second != run and len(second) >= len(run) and second[:8].isdigit()  # a fresh timestamped name


def test_a_larger_labeled_set_holds_one_case_out_for_validation():
    from backend.methods import get_method
    from backend.engine.training import split_labeled

    few, many = [f"c{i}" for i in range(4)], [f"c{i}" for i in range(5)]
    assert split_labeled(few, seed=0) == (few, few, True)
    train_cases, val_cases, on_train = split_labeled(many, seed=0)
    assert not on_train and len(val_cases) == 1 and val_cases[0] not in train_cases
    assert sorted(train_cases + val_cases) == many
    assert split_labeled(many, seed=0) == (train_cases, val_cases, on_train)  # the seed decides
    assert split_labeled(many, seed=0, hold_out_from=None) == (many, many, True)
    # the papers train on every labeled case (their test split is separate); the demo presets use the default
    assert get_method("genericssl").make_config("la").hold_out_from is None
    assert get_method("diffcl").make_config("pancreas").hold_out_from is None
    assert get_method("diffrect").make_config("acdc").hold_out_from is None
    assert get_method("supervised2d").make_config("quick").hold_out_from == 5


def test_bad_requests_fail_with_clear_errors(small, tmp_path):
    from backend.project import Project

    empty = Project.create(tmp_path / "empty", labels={0: "background", 1: "x"})
    with pytest.raises(InputError, match="no labeled case"):
        train(empty, "supervised", preset="tiny", steps=1, device="cpu")
    with pytest.raises(KeyError, match="unknown method"):
        train(small, "nonexistent", steps=1, device="cpu")
    with pytest.raises(KeyError, match="no preset 'huge'"):
        train(small, "supervised", preset="huge", steps=1, device="cpu")
    with pytest.raises(InputError, match="no trained run"):
        train(small, "supervised", resume=True, device="cpu")
    run = train(small, "supervised", preset="tiny", steps=1, device="cpu", overrides=FAST)
    with pytest.raises(InputError, match="exists"):
        train(small, "supervised", preset="tiny", steps=1, device="cpu", run=run)


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert "cpu" in available_devices() and available_devices()[-1] == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if "mps" in available_devices() else "cpu")
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu9")


def test_supervised2d_trains_on_slices_and_infers_whole_volumes(small):
    from backend.engine.inference import infer
    from backend.io.volume import read_volume

    run = train(small, "supervised2d", preset="tiny", steps=2, device="cpu", overrides=FAST)
    ckpt = load_checkpoint(small.model_dir("supervised2d", run) / "checkpoint.pt")
    assert ckpt["config"]["patch_size"] == [64, 64] and ckpt["step"] == 2
    infer(small, "supervised2d", device="cpu", cases=["colin27_ch2"])
    label = read_volume(small.pseudo_dir("supervised2d", run) / "colin27_ch2" / "prediction.nii.gz")
    assert small.read_image("colin27_ch2").geometry_mismatch(label) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: AMP training step and checkpoint on GPU")
def test_train_on_cuda_with_amp(small):
    run = train(small, "supervised", preset="tiny", steps=3, device="cuda", overrides=FAST)
    info = json.loads((small.model_dir("supervised", run) / "run.json").read_text())
    assert info["device"].startswith("cuda") and info["status"] == "done"


def test_cpu_thread_policy_leaves_a_core_free_and_is_restored(small, monkeypatch):
    from backend.engine import devices, training

    monkeypatch.delenv("SEMISEG_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert devices.cpu_threads() == 1  # 2 cores: one thread (2 threads collapse when a core is busy)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert devices.cpu_threads() == 15
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert devices.cpu_threads() == 1
    monkeypatch.setenv("SEMISEG_THREADS", "3")
    assert devices.cpu_threads() == 3
    monkeypatch.setenv("SEMISEG_THREADS", "lots")
    with pytest.raises(InputError, match="SEMISEG_THREADS"):
        devices.cpu_threads()
    monkeypatch.delenv("SEMISEG_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert devices.cpu_threads() == torch.get_num_threads()  # the user's explicit choice is kept

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    seen = []
    real_step = training.get_method("supervised").train_step

    def spy(self, labeled, unlabeled, step):
        seen.append(torch.get_num_threads())
        return real_step(self, labeled, unlabeled, step)

    monkeypatch.setattr(training.get_method("supervised"), "train_step", spy)
    events = []
    run = train(small, "supervised", preset="tiny", steps=2, device="cpu", overrides=FAST, on_event=events.append)
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert events[0]["cpu_threads"] == 1
    assert json.loads((small.model_dir("supervised", run) / "run.json").read_text())["cpu_threads"] == 1


@pytest.mark.parametrize("name", ["run.json", "config.json"])
def test_resume_with_a_corrupt_run_file_is_one_clear_error(small, name):
    run = train(small, "supervised", preset="tiny", steps=1, device="cpu", overrides=FAST)
    path = small.model_dir("supervised", run) / name
    path.write_text('{"method": "supervised", ')  # cut off mid-write by hand
    with pytest.raises(InputError, match=f"corrupt {name}") as info:
        train(small, "supervised", run=run, resume=True, steps=2, device="cpu")
    assert str(path) in str(info.value)
