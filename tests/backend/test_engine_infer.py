"""Inference (pseudo labels in the image geometry, scores.json for the review queue) and the metrics behind it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.engine import checkpoints, inference, training
from backend.project import runs
from backend.engine.inference import infer
from backend.methods.supervised import Supervised
from backend.engine.metrics import agreement, dice_per_class, segmentation_metrics, volumes_ml
from backend.engine.training import train
from backend.io.volume import read_volume
from backend.project.runs import pseudo_runs
from helpers.engine_projects import small_brain_project

FAST = {"val_every": 1000, "checkpoint_every": 1000}


# ---- metrics -------------------------------------------------------------------------------------------------------
def cube(shape=(20, 30, 30), box=(slice(5, 15), slice(5, 15), slice(5, 15)), value=1):
    a = np.zeros(shape, np.uint8)
    a[box] = value
    return a


def test_dice_jaccard_and_distances_in_mm():
    ref = cube()
    pred = cube(box=(slice(5, 15), slice(5, 15), slice(6, 16)))  # shifted one voxel along x
    m = segmentation_metrics(pred, ref, 2, spacing_zyx=(3.0, 1.0, 2.0), labels={1: "A"})
    assert m["dice"]["A"] == pytest.approx(0.9)  # 900 of 1000 voxels shared
    assert m["jaccard"]["A"] == pytest.approx(900 / 1100)
    assert m["hd95"]["A"] == pytest.approx(2.0)  # one voxel along x = 2 mm
    assert 0 < m["asd"]["A"] < 2.0
    assert m["mean"]["dice"] == pytest.approx(0.9)
    same = segmentation_metrics(ref, ref, 2, (1, 1, 1))
    assert same["dice"]["1"] == 1.0 and same["hd95"]["1"] == 0.0 and same["asd"]["1"] == 0.0


def test_empty_classes_follow_the_documented_conventions():
    ref = cube()
    pred = ref.copy()
    pred[0, 0, 0] = 2  # class 2: a false positive; class 3: absent from both
    m = segmentation_metrics(pred, ref, 4, (1, 1, 1))
    assert m["dice"]["2"] == 0.0 and m["hd95"]["2"] is None
    assert m["dice"]["3"] == 1.0 and m["hd95"]["3"] == 0.0
    assert np.allclose(dice_per_class(pred, ref, 4), [1.0, 0.0, 1.0])


def test_agreement_between_views_and_volumes():
    a = cube()
    b = cube(box=(slice(5, 15), slice(5, 15), slice(6, 16)))
    scores = agreement({"x": a, "y": b, "z": a}, 3, {1: "GM", 2: "WM"})
    assert list(scores["agreement"]) == ["x|y", "x|z", "y|z"]
    assert scores["agreement"]["x|y"]["per_class"] == {"GM": pytest.approx(0.9), "WM": 1.0}
    assert scores["agreement"]["x|z"]["mean"] == 1.0
    assert scores["agreement_mean"] == pytest.approx((0.95 + 1.0 + 0.95) / 3)
    assert scores["agreement_worst"] == pytest.approx(0.9)
    single = agreement({"prediction": a}, 3)
    assert single == {"agreement": {}, "agreement_mean": None, "agreement_worst": None}
    assert volumes_ml(a, 3, (2.0, 2.0, 2.0), {1: "GM", 2: "WM"}) == {"GM": 8.0, "WM": 0.0}  # 1000 x 8 mm^3


# ---- inference -----------------------------------------------------------------------------------------------------
class TwoViews(Supervised):
    """A two-view method for the tests: the network's prediction and the prediction of the x-flipped volume."""

    name = "twoviews"
    views = ("prediction", "flipped")

    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        flipped = self.predict(torch.flip(volume, dims=[-1]))[..., ::-1]
        return {"prediction": self.predict(volume), "flipped": np.ascontiguousarray(flipped)}


@pytest.fixture
def trained(tmp_path):
    project = small_brain_project(tmp_path / "small")
    run = train(project, "supervised", preset="tiny", steps=2, device="cpu", overrides=FAST)
    return project, run


def test_infer_writes_every_view_in_the_image_geometry_and_scores(trained):
    project, run = trained
    events = []
    assert infer(project, "supervised", device="cpu", on_event=events.append) == run
    assert [e["type"] for e in events] == ["start", "progress", "progress", "progress", "done"]
    assert [e["case"] for e in events if e["type"] == "progress"] == ["colin27_ch2", "colin27_ch2better",
                                                                      "itk_kmeans_t1"]
    out = project.pseudo_dir("supervised", run)
    for case in project.unlabeled_cases():
        label = read_volume(out / case / "prediction.nii.gz")
        assert project.read_image(case).geometry_mismatch(label) is None
        assert label.array.dtype == np.uint8 and set(np.unique(label.array)) <= {0, 1, 2}
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"method", "run", "views", "primary_view", "labels", "labeled_count", "model", "cases"}
    assert scores["primary_view"] == "prediction"
    assert scores["model"]["run"] == run and scores["model"]["chosen_by"] == "best validation"
    assert scores["model"]["checkpoint"] == "best" and scores["model"]["step"] == 2
    assert scores["method"] == "supervised" and scores["run"] == run and scores["views"] == ["prediction"]
    assert scores["labels"] == {"1": "GM", "2": "WM"} and scores["labeled_count"] == 1
    case = scores["cases"]["colin27_ch2"]
    assert case["agreement"] == {} and case["agreement_mean"] is None and case["agreement_worst"] is None
    assert set(case["volume_ml"]["prediction"]) == {"GM", "WM"}
    assert 0 <= case["tta_agreement"] <= 1 and 0 <= case["confidence"] <= 1  # the supervised net gives probabilities
    assert case["cross_agreement"] == {}  # no other method has pseudo labels yet
    row = {r["case"]: r for r in project.case_table()}["colin27_ch2"]
    assert row["scores"]["supervised"] == {"run": run, "mean": None, "worst_class": None}


def test_infer_scores_agreement_of_multi_view_methods_and_merges_subsets(trained, monkeypatch):
    project, _ = trained
    real = training.get_method

    def get_method(name):
        return TwoViews if name == "twoviews" else real(name)

    monkeypatch.setattr(training, "get_method", get_method)
    monkeypatch.setattr(inference, "get_method", get_method)
    run = train(project, "twoviews", preset="tiny", steps=2, device="cpu", overrides=FAST)
    infer(project, "twoviews", device="cpu", cases=["colin27_ch2"])
    scores = json.loads((project.pseudo_dir("twoviews", run) / "scores.json").read_text())
    case = scores["cases"]["colin27_ch2"]
    pair = case["agreement"]["prediction|flipped"]
    assert set(pair["per_class"]) == {"GM", "WM"} and 0 <= pair["mean"] <= 1
    assert case["agreement_mean"] == pair["mean"] and case["agreement_worst"] == min(pair["per_class"].values())
    assert list(scores["cases"]) == ["colin27_ch2"]
    infer(project, "twoviews", device="cpu", cases=["itk_kmeans_t1"])  # a second subset joins the first
    scores = json.loads((project.pseudo_dir("twoviews", run) / "scores.json").read_text())
    assert sorted(scores["cases"]) == ["colin27_ch2", "itk_kmeans_t1"]


def test_cancelled_inference_leaves_no_scores(trained):
    project, run = trained
    events = []
    infer(project, "supervised", device="cpu", should_stop=lambda: bool(events) and len(events) > 1,
          on_event=events.append)
    assert events[-1]["type"] == "cancelled" and events[-1]["step"] == 1
    assert not (project.pseudo_dir("supervised", run) / "scores.json").exists()
    assert pseudo_runs(project, "supervised") == []  # an incomplete run never shows up as a result


# ---- the best model ------------------------------------------------------------------------------------------------
def _net_weights(path):
    return checkpoints.load_checkpoint(path)["method"]["modules"]["net"]


def test_best_checkpoint_follows_validation_and_inference_loads_it(tmp_path):
    project = small_brain_project(tmp_path / "small")
    events = []
    run = train(project, "supervised", preset="tiny", steps=6, device="cpu",
                overrides={"val_every": 1, "checkpoint_every": 1000, "lr": 0.05}, on_event=events.append)
    folder = project.model_dir("supervised", run)
    vals = [e for e in events if e["type"] == "validation"]
    means = [v["mean"] for v in vals]
    best_step = vals[means.index(max(means))]["step"]  # the first of the highest
    info = json.loads((folder / "run.json").read_text())
    assert info["best"] == {"step": best_step, "dice": max(means)}
    improved = [v["step"] for v in vals if v.get("best")]
    assert improved[0] == 1 and improved[-1] == best_step
    for v in vals:  # best.pt is rewritten exactly when validation beats every earlier one
        assert bool(v.get("best")) == (v["mean"] > max(means[:v["step"] - 1], default=-1.0))
    best = checkpoints.load_checkpoint(folder / "best.pt")
    assert best["step"] == best_step and best["method_name"] == "supervised"
    assert not list(folder.glob(".*.tmp"))  # written atomically
    last = _net_weights(folder / "checkpoint.pt")
    if best_step != 6:
        assert any(not torch.equal(best["method"]["modules"]["net"][k], last[k]) for k in last)

    model, _, loaded = inference.load_trained(project, "supervised", device="cpu")
    assert loaded["loaded"] == {"run": run, "chosen_by": "best validation", "checkpoint": "best",
                                "step": best_step, "dice": max(means)}
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, best["method"]["modules"]["net"][k])
    _, _, named_last = inference.load_trained(project, "supervised", run, device="cpu", checkpoint="last")
    assert named_last["loaded"]["checkpoint"] == "last" and named_last["loaded"]["step"] == 6
    assert named_last["loaded"]["chosen_by"] == "named"


def test_inference_picks_the_run_with_the_best_validation_not_the_newest(tmp_path):
    project = small_brain_project(tmp_path / "small")
    assert runs.best_run(project, "supervised") is None
    old = train(project, "supervised", preset="tiny", steps=2, device="cpu", overrides=FAST)
    new = train(project, "supervised", preset="tiny", steps=2, device="cpu", overrides=FAST)
    assert old < new and runs.model_runs(project, "supervised") == [old, new]

    def set_best(run, dice):
        path = project.model_dir("supervised", run) / "run.json"
        info = json.loads(path.read_text())
        info["best"] = {"step": 2, "dice": dice}
        path.write_text(json.dumps(info))

    set_best(old, 0.759)
    set_best(new, 0.134)  # the case: a newer run far worse on validation
    assert runs.best_run(project, "supervised") == old
    events = []
    assert infer(project, "supervised", device="cpu", cases=["colin27_ch2"], on_event=events.append) == old
    assert events[0]["model"]["run"] == old and events[0]["model"]["dice"] == 0.759
    assert (project.pseudo_dir("supervised", old) / "scores.json").is_file()
    assert infer(project, "supervised", run=new, device="cpu", cases=["colin27_ch2"]) == new  # a named run wins
    set_best(new, 0.759)
    assert runs.best_run(project, "supervised") == new  # ties: the newest
    set_best(new, 0.9)
    assert runs.best_run(project, "supervised") == new


def test_a_preset_grid_trains_and_infers_and_pseudo_labels_land_on_the_case_grid(tmp_path):
    project = small_brain_project(tmp_path / "small")
    run = train(project, "supervised", preset="tiny", steps=2, device="cpu",
                overrides={**FAST, "target_spacing": (3.0, 3.0, 4.0), "intensity_window": (10.0, 200.0)})
    model, _, _ = inference.load_trained(project, "supervised", device="cpu")
    assert tuple(model.config.target_spacing) == (3.0, 3.0, 4.0)
    assert tuple(model.config.intensity_window) == (10.0, 200.0)
    views, image = inference.case_views(model, project, "colin27_ch2")
    assert views["prediction"].shape == image.shape == (48, 64, 64)
    infer(project, "supervised", device="cpu")
    for case in project.unlabeled_cases():
        label = read_volume(project.pseudo_dir("supervised", run) / case / "prediction.nii.gz")
        assert project.read_image(case).geometry_mismatch(label) is None
