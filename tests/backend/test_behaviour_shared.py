"""Behaviour tests of the shared scoring and review path: values checked on constructed inputs whose answer is
known (issue 23).

Every method's pseudo labels go through this path: the metrics and the agreement of the views
(``backend/engine/metrics.py``, ``backend/engine/scores.py``), inference (which run and checkpoint, what
``scores.json`` holds: ``backend/engine/inference.py``, ``backend/project/runs.py``) and the review
(``backend/review/{queue,views,corrections,export}.py``).  Each test builds tiny label arrays or a tiny project
folder whose answers are counted by hand in the comments; ``bench/mutants.py`` runs this file for every method.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from backend.engine import inference
from backend.engine.checkpoints import RunFiles, save_checkpoint
from backend.engine.metrics import (agreement, dice_per_class, jaccard_per_class, segmentation_metrics,
                                    volumes_ml)
from backend.errors import InputError, LabelConflictError
from backend.io.atomic import write_json_atomic
from backend.io.volume import Volume, read_volume, write_volume
from backend.methods.base import BaseConfig, Method
from backend.project import Project, runs
from backend.review import colors
from backend.review.corrections import (accept_correction, accept_warnings, discard_draft, flag_case, flags,
                                        list_drafts, load_draft, save_draft, unflag_case)
from backend.review.export import export, segment_extent, slicer_metadata
from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES, cross_score, default_runs, review_rows, \
    sort_review_queue
from backend.review.views import (ALL_METHODS, disagreement, disagreement_by_method, majority_vote, pseudo_views,
                                  read_views, slice_profile, view_method, worst_slice)

# ---- a tiny project: 3 cases of [z, y, x] = 3 x 4 x 8 voxels, an oblique geometry ----------------------------
SHAPE = (3, 4, 8)
SPACING = (2.0, 1.5, 3.0)  # (x, y, z) mm: one voxel = 9 mm^3 = 0.009 ml
ORIGIN = (10.0, -5.0, 7.0)
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
LABELS = {0: "background", 1: "A", 2: "B"}


def ramp_image() -> Volume:
    """Intensity 10 x + 5 along x (all voxels non-zero: MR z-scoring keeps the order)."""
    ramp = np.arange(SHAPE[2], dtype=np.float32) * 10 + 5
    return Volume(np.broadcast_to(ramp, SHAPE).copy(), SPACING, ORIGIN, DIRECTION)


def columns(spec: dict[int, range], shape=SHAPE) -> np.ndarray:
    """A label with class ``k`` on the x columns ``spec[k]`` (every z and y)."""
    out = np.zeros(shape, np.uint8)
    for k, xs in spec.items():
        out[..., list(xs)] = k
    return out


MAIN = columns({1: range(0, 2), 2: range(3, 6)})  # A: 24 voxels, B: 36 voxels


def tiny_project(root, cases=("c1", "c2", "c3"), labeled=("c1",)) -> Project:
    project = Project.create(root, labels=LABELS, name="tiny")
    for case in cases:
        image = ramp_image()
        project.add_case(case, image, image.like(MAIN.copy()) if case in labeled else None)
    return project


def write_pseudo(project: Project, method: str, run: str, arrays: dict[str, dict[str, np.ndarray]],
                 scores: dict | None = None, spacing=SPACING) -> None:
    """Pseudo labels ``{case: {view: array}}`` of a run and its ``scores.json`` (``scores`` on top of a minimal one)."""
    folder = project.pseudo_dir(method, run)
    for case, views in arrays.items():
        for view, array in views.items():
            write_volume(Volume(array, spacing, ORIGIN, DIRECTION), folder / case / f"{view}.nii.gz")
    record = {"method": method, "run": run, "views": [], "cases": {c: {} for c in arrays}}
    record.update(scores or {})
    write_json_atomic(folder / "scores.json", record)


def model_run(project: Project, method: str, run: str, *, best=None, last=None, checkpoint=True, **info) -> None:
    """A model run folder: ``run.json`` (``best`` / ``last_validation`` Dice) and an (empty) ``checkpoint.pt``."""
    folder = project.model_dir(method, run)
    folder.mkdir(parents=True, exist_ok=True)
    if best is not None:
        info["best"] = {"step": 1, "dice": best}
    if last is not None:
        info["last_validation"] = {"mean": last}
    (folder / "run.json").write_text(json.dumps(info))
    if checkpoint:
        (folder / runs.CHECKPOINT).write_bytes(b"")


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_dice_and_jaccard_per_foreground_class_by_hand():
    pred = np.zeros((2, 3, 4), np.uint8)
    ref = np.zeros((2, 3, 4), np.uint8)
    pred[0, 0, 0:3] = 1
    ref[0, 0, 1:4] = 1  # class 1: 3 and 3 voxels, 2 shared
    pred[1, 2, 3] = 2  # class 2: in pred only
    ref[1, 0, 0] = 3  # class 3: in ref only; class 4: in neither
    # background excluded: one value per class 1..4
    assert dice_per_class(pred, ref, 5) == pytest.approx([4 / 6, 0.0, 0.0, 1.0])
    assert dice_per_class(ref, pred, 5) == pytest.approx([4 / 6, 0.0, 0.0, 1.0])
    assert dice_per_class(torch.from_numpy(pred), torch.from_numpy(ref), 5) == pytest.approx([4 / 6, 0, 0, 1])
    assert dice_per_class(pred.astype(np.float32), ref.astype(np.int16), 5) == pytest.approx([4 / 6, 0, 0, 1])
    assert dice_per_class(pred, ref, 5).dtype == np.float64
    assert jaccard_per_class(pred, ref, 5) == pytest.approx([2 / 4, 0.0, 0.0, 1.0])
    assert jaccard_per_class(pred, ref, 5).dtype == np.float64
    assert dice_per_class(pred, ref, 2) == pytest.approx([4 / 6])  # classes >= num_classes are not scored
    assert dice_per_class(pred, ref, 1).size == 0 and jaccard_per_class(pred, ref, 1).size == 0
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_class(pred, ref[:, :, :3], 5)


def test_segmentation_metrics_distances_in_mm_along_each_axis_and_empty_classes():
    pred = np.zeros((4, 3, 5), np.uint8)
    ref = np.zeros((4, 3, 5), np.uint8)
    ref[0, 0, 0] = 1
    pred[0, 0, 0] = pred[0, 0, 3] = 1  # class 1: one extra voxel 3 voxels away along x (x spacing 2 mm)
    ref[3, 2, 4] = 2
    pred[1, 2, 4] = 2  # class 2: 2 voxels apart along z (z spacing 3 mm) = 6 mm
    ref[2, 1, 1] = 3  # class 3: in ref only; class 4: in neither
    m = segmentation_metrics(pred, ref, 5, spacing_zyx=(3.0, 1.0, 2.0), labels={1: "A", 2: "B", 3: "C"})
    assert list(m) == ["dice", "jaccard", "hd95", "asd", "mean"]
    assert m["dice"] == pytest.approx({"A": 2 / 3, "B": 0.0, "C": 0.0, "4": 1.0})
    assert m["jaccard"] == pytest.approx({"A": 1 / 2, "B": 0.0, "C": 0.0, "4": 1.0})
    # A: distances pred->ref {0, 6 mm}, ref->pred {0}: HD95 = 95th percentile of [0, 6] = 5.7; ASD (symmetric)
    # = (0 + 6 + 0) / 3 = 2 (one-sided would be 3)
    assert m["hd95"]["A"] == pytest.approx(5.7, abs=1e-4) and m["asd"]["A"] == pytest.approx(2.0, abs=1e-5)
    assert m["hd95"]["B"] == pytest.approx(6.0, abs=1e-5) and m["asd"]["B"] == pytest.approx(6.0, abs=1e-5)
    assert m["hd95"]["C"] is None and m["asd"]["C"] is None  # empty in one: undefined
    assert m["hd95"]["4"] == 0.0 and m["asd"]["4"] == 0.0  # empty in both
    assert m["mean"] == pytest.approx({"dice": (2 / 3 + 1) / 4, "jaccard": 1.5 / 4, "hd95": (5.7 + 6) / 3,
                                       "asd": (2 + 6) / 3}, abs=1e-4)
    none = segmentation_metrics(pred, np.zeros_like(ref), 2, (1, 1, 1))  # class 1 only in pred
    assert none["mean"] == {"dice": 0.0, "jaccard": 0.0, "hd95": None, "asd": None}
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(pred, ref[:3], 5, (1, 1, 1))


def test_agreement_over_every_view_pair_by_hand():
    row = (1, 1, 10)
    v1 = columns({1: range(0, 4), 2: range(6, 8)}, row)
    v2 = columns({1: range(0, 2), 2: range(6, 8)}, row)
    v3 = columns({1: range(0, 4)}, row)
    s = agreement({"v1": v1, "v2": v2, "v3": v3}, 3, {1: "A", 2: "B"})
    assert list(s["agreement"]) == ["v1|v2", "v1|v3", "v2|v3"]  # 3 views: 3 pairs, in view order
    assert s["agreement"]["v1|v2"] == {"per_class": {"A": pytest.approx(0.666667, abs=1e-6), "B": 1.0},
                                       "mean": pytest.approx(0.833333, abs=1e-6)}  # A: 2*2/(4+2)
    assert s["agreement"]["v1|v3"] == {"per_class": {"A": 1.0, "B": 0.0}, "mean": 0.5}  # B empty in v3
    assert s["agreement"]["v2|v3"] == {"per_class": {"A": pytest.approx(0.666667, abs=1e-6), "B": 0.0},
                                       "mean": pytest.approx(0.333333, abs=1e-6)}
    assert s["agreement_mean"] == pytest.approx(5 / 9, abs=2e-6)  # mean of the 3 pair means
    assert s["agreement_worst"] == 0.0  # min over pairs and classes
    reordered = agreement({"v3": v3, "v1": v1}, 3)
    assert reordered["agreement"] == {"v3|v1": {"per_class": {"1": 1.0, "2": 0.0}, "mean": 0.5}}
    assert reordered["agreement_mean"] == 0.5 and reordered["agreement_worst"] == 0.0
    close = agreement({"v1": v1, "v2": v2}, 3)
    assert close["agreement_worst"] == pytest.approx(0.666667, abs=1e-6)
    assert close["agreement_mean"] == pytest.approx(0.833333, abs=1e-6)
    four = agreement({f"w{i}": v1 for i in range(4)}, 3)
    assert len(four["agreement"]) == 6 and four["agreement_mean"] == 1.0 and four["agreement_worst"] == 1.0
    assert agreement({"only": v1}, 3) == {"agreement": {}, "agreement_mean": None, "agreement_worst": None}
    no_classes = agreement({"v1": v1, "v2": v2}, 1)  # no foreground class: nothing to disagree on
    assert no_classes == {"agreement": {"v1|v2": {"per_class": {}, "mean": 1.0}}, "agreement_mean": 1.0,
                          "agreement_worst": None}


def test_volumes_in_millilitres():
    label = columns({1: range(0, 2)})  # 24 voxels of 9 mm^3
    label[0, 0, 7] = 2
    assert volumes_ml(label, 4, SPACING, {1: "A", 2: "B"}) == pytest.approx({"A": 0.216, "B": 0.009, "3": 0.0})
    assert volumes_ml(np.zeros(SHAPE, np.uint8), 2, (1.0, 1.0, 1.0)) == {"1": 0.0}


# ---- views: majority vote, disagreement, slices -----------------------------------------------------------------
def test_majority_vote_and_its_ties():
    def vote(*columns_, k=3):
        return majority_vote([np.array(c, np.uint8).reshape(1, 1, -1) for c in columns_], k).ravel().tolist()

    # voxel:      0  1  2  3  4  5
    v = vote([1, 2, 1, 2, 0, 1],
             [1, 2, 2, 1, 0, 2],
             [2, 1, 0, 2, 1, 2])
    assert v == [1, 2, 0, 2, 0, 2]  # voxel 2: a three-way tie goes to the lowest class, background
    assert vote([2, 0, 1], [1, 2, 2]) == [1, 0, 1]  # two views that differ: the lower class wins
    assert vote([1, 2], [2, 1], [2, 1], [1, 2]) == [1, 1]  # 2 against 2 between two structures: the lower
    assert vote([3, 3], [3, 0], k=4) == [3, 0]
    out = majority_vote([MAIN, MAIN], 3)
    assert out.dtype == np.uint8 and out.shape == SHAPE and np.array_equal(out, MAIN)
    with pytest.raises(ValueError):
        majority_vote([], 3)


def test_disagreement_maps_mark_where_any_view_differs():
    a = np.array([0, 1, 2, 0, 1], np.uint8).reshape(1, 1, -1)
    b = np.array([0, 1, 2, 1, 2], np.uint8).reshape(1, 1, -1)
    c = np.array([0, 2, 2, 0, 2], np.uint8).reshape(1, 1, -1)
    d = disagreement([a, b, c])
    assert d.dtype == np.uint8 and d.ravel().tolist() == [0, 1, 0, 1, 1]  # voxel 4: b == c, both differ from a
    assert disagreement([a, a, c]).ravel().tolist() == [0, 1, 0, 0, 1]  # only the third view differs
    assert disagreement([a]).ravel().tolist() == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        disagreement([])
    assert view_method("m1:view:x") == "m1"
    maps = disagreement_by_method({"m1:a": a, "m1:b": b, "m2:a": c})
    assert sorted(maps) == sorted(["m1", ALL_METHODS])  # m2 has one view: no map of its own
    assert maps["m1"].ravel().tolist() == [0, 0, 0, 1, 1]
    assert maps[ALL_METHODS].ravel().tolist() == [0, 1, 0, 1, 1]
    one = disagreement_by_method({"m1:a": a, "m1:b": c})
    assert list(one) == ["m1"] and one["m1"].ravel().tolist() == [0, 1, 0, 0, 1]
    two = disagreement_by_method({"m1:a": a, "m2:a": b})  # one view each: only the all-methods map
    assert list(two) == [ALL_METHODS] and two[ALL_METHODS].ravel().tolist() == [0, 0, 0, 1, 1]


def test_slice_profile_counts_per_axial_slice_and_worst_slice():
    mask = np.zeros((3, 2, 4), np.uint8)
    mask[1, 0, :3] = 1
    mask[2, 1, :] = 1
    mask[2, 0, 0] = 1
    profile = slice_profile(mask)
    assert profile.dtype == np.int64 and profile.tolist() == [0, 3, 5]  # one entry per z (axis 0)
    assert slice_profile(mask.astype(bool)).tolist() == [0, 3, 5]
    assert worst_slice(profile) == 2
    assert worst_slice([0, 4, 1, 4]) == 1  # ties: the lowest index
    assert worst_slice([4, 1]) == 0
    assert worst_slice([0, 0, 0]) is None and worst_slice([]) is None


# ---- runs: the default run and checkpoint -----------------------------------------------------------------------
def test_best_dice_and_best_run_rules():
    assert runs.run_best_dice({"best": {"dice": 0.7}, "last_validation": {"mean": 0.9}}) == 0.7
    assert runs.run_best_dice({"best": {"dice": 0.0}, "last_validation": {"mean": 0.5}}) == 0.0
    assert runs.run_best_dice({"best": {}, "last_validation": {"mean": 0.4}}) == 0.4  # before best.pt existed
    assert runs.run_best_dice({"best": None, "last_validation": {}}) is None and runs.run_best_dice({}) is None
    pick = runs.pick_best_run
    assert pick([]) is None
    assert pick([("a", 0.5), ("b", 0.7), ("c", 0.6)]) == "b"
    assert pick([("a", 0.7), ("b", 0.7), ("c", 0.1)]) == "b"  # ties: the newest
    assert pick([("a", None), ("b", 0.1), ("c", None)]) == "b"  # never validated: last
    assert pick([("a", 0.2), ("b", None)]) == "a"
    assert pick([("a", None), ("b", None)]) == "b"  # none validated: the newest
    assert pick([("a", 0.0), ("b", None)]) == "a"


def test_model_runs_best_run_run_table_and_checkpoint_choice(tmp_path):
    project = Project.create(tmp_path / "p", labels=LABELS)
    assert runs.model_runs(project, "m") == [] and runs.best_run(project, "m") is None
    with pytest.raises(InputError, match="no trained run"):
        runs.latest_run(project, "m")
    model_run(project, "m", "r2", best=0.4, labeled_count=3)
    model_run(project, "m", "r1", best=0.5, labeled_count=2)
    model_run(project, "m", "r3", best=0.99, checkpoint=False)  # no checkpoint: inference cannot use it
    model_run(project, "n", "r1", last=0.3)
    (project.model_dir("m", "r3") / runs.BEST).write_bytes(b"")
    assert runs.model_runs(project, "m") == ["r1", "r2"] and runs.latest_run(project, "m") == "r2"
    assert runs.best_run(project, "m") == "r1" and runs.best_run(project, "n") == "r1"
    assert runs.best_runs(project) == {"m": "r1", "n": "r1"}
    table = runs.run_table(project)
    assert [(r["run"], r["method"]) for r in table] == [("r1", "m"), ("r1", "n"), ("r2", "m"), ("r3", "m")]
    assert [r["best_dice"] for r in table] == [0.5, 0.3, 0.4, 0.99]
    assert [r["has_checkpoint"] for r in table] == [True, True, True, False]
    assert [r["labeled_count"] for r in table] == [2, None, 3, None]
    model_run(project, "m", "r4", best=0.5)
    assert runs.best_run(project, "m") == "r4" and runs.best_runs(project)["m"] == "r4"  # ties: the newest
    assert runs.run_info(project, "m", "r1")["best"] == {"step": 1, "dice": 0.5}
    (project.model_dir("m", "r2") / "run.json").write_text("[1, 2]")
    assert runs.run_info(project, "m", "r2") == {} and runs.run_info(project, "m", "r9") == {}
    (project.model_dir("m", "r1") / "run.json").write_text("{not json")
    assert runs.run_info(project, "m", "r1") == {}

    folder = project.model_dir("m", "r4")
    assert runs.run_checkpoint(project, "m", "r4") == folder / runs.CHECKPOINT  # no best.pt: the last
    (folder / runs.BEST).write_bytes(b"")
    assert runs.run_checkpoint(project, "m", "r4") == folder / runs.BEST  # default: the best
    assert runs.run_checkpoint(project, "m", "r4", "best") == folder / "best.pt"
    assert runs.run_checkpoint(project, "m", "r4", "last") == folder / "checkpoint.pt"
    with pytest.raises(InputError, match="'best' or 'last'"):
        runs.run_checkpoint(project, "m", "r4", "newest")
    first = runs.new_run_name(project, "m")
    second = runs.new_run_name(project, "m")
    assert second != first and second.startswith(first[:8])
    assert project.model_dir("m", first).is_dir() and project.model_dir("m", second).is_dir()


def test_pseudo_runs_need_a_scores_file(tmp_path):
    project = Project.create(tmp_path / "p", labels=LABELS)
    assert runs.pseudo_runs(project, "m") == [] and runs.methods_with_pseudo_labels(project) == []
    for method, run in (("m", "r2"), ("m", "r1"), ("k", "r1")):
        write_json_atomic(project.pseudo_dir(method, run) / "scores.json", {"cases": {}})
    project.pseudo_dir("m", "r3").mkdir(parents=True)  # inference still running: no scores.json
    project.pseudo_dir("z", "r1").mkdir(parents=True)
    assert runs.pseudo_runs(project, "m") == ["r1", "r2"]
    assert runs.methods_with_pseudo_labels(project) == ["k", "m"]


# ---- the review queue -------------------------------------------------------------------------------------------
QUEUE = [  # (case, labeled, {method: score}); None = the method has no value of the score
    ("d", False, {"m1": 0.9, "m2": 0.2}),  # its most doubtful method counts: 0.2
    ("b", False, {"m1": 0.5}),
    ("a", False, {"m1": 0.5}),  # ties: by case name
    ("c", False, {"m1": None}),  # no value: after every scored case
    ("e", False, {}),
    ("f", False, {"m1": 1.0}),
    ("g", True, {"m1": 0.0}),  # labeled: after every unlabeled case
    ("h", True, {}),
]


@pytest.mark.parametrize("score", list(SORT_SCORES))
def test_review_queue_puts_the_most_doubtful_unlabeled_case_first(score):
    rows = []
    for case, labeled, values in reversed(QUEUE):
        scores = {}
        for method, value in values.items():
            # every other score orders the cases the opposite way: sorting by the wrong key shows
            scores[method] = {k: (value if k == score else (0.0 if value is None else 1.0 - value))
                              for k in SORT_SCORES}
        if not values:
            scores["m9"] = {k: (None if k == score else 0.0) for k in SORT_SCORES}
        rows.append({"case": case, "labeled": labeled, "scores": scores})
    order = [r["case"] for r in sort_review_queue(rows, score)]
    assert order == ["d", "a", "b", "f", "c", "e", "g", "h"]
    if score == DEFAULT_SORT_SCORE:
        assert [r["case"] for r in sort_review_queue(rows)] == order


def test_review_queue_default_score_and_unknown_scores():
    assert DEFAULT_SORT_SCORE == next(iter(SORT_SCORES))
    with pytest.raises(KeyError, match="unknown review score"):
        sort_review_queue([], "dice")


def test_default_runs_prefer_the_best_run_with_pseudo_labels(tmp_path):
    project = Project.create(tmp_path / "p", labels=LABELS)
    model_run(project, "m1", "r1", best=0.8)
    model_run(project, "m1", "r2", best=0.3)
    model_run(project, "m1", "r3", best=0.95, checkpoint=False)
    model_run(project, "m2", "r1", best=0.9)
    model_run(project, "m2", "r2", best=0.1)
    model_run(project, "m4", "r1", best=0.9)  # no pseudo labels: not shown
    for method, run in (("m1", "r1"), ("m1", "r2"), ("m1", "r3"), ("m2", "r2"), ("m2", "r3"), ("m3", "r1"),
                        ("m3", "r2")):
        write_json_atomic(project.pseudo_dir(method, run) / "scores.json", {"cases": {}})
    project.pseudo_dir("m1", "r0").mkdir(parents=True)  # incomplete
    # m1: the best run (r1) has pseudo labels, not the newer r2 / r3; m2: its best (r1) has none: the newest;
    # m3: no model runs at all: the newest
    assert default_runs(project) == {"m1": "r1", "m2": "r3", "m3": "r2"}


def test_cross_score_takes_the_pair_of_the_shown_runs_from_either_side():
    scores = {"m1": {"cases": {"c": {"cross_agreement": {"m2:s1": 0.3, "m2:s0": 0.9}}}},
              "m2": {"cases": {"c": {"cross_agreement": {"m1:r2": 0.99}}, "d": {"cross_agreement": {"m1:r1": 0.5}}}},
              "m3": {"cases": {"c": {"cross_agreement": {"m1:r1": 0.7}}}}}
    shown = {"m1": "r1", "m2": "s1"}
    assert cross_score(scores, shown, "m1", "c") == 0.3  # its own record of m2:s1 (not m2:s0)
    assert cross_score(scores, shown, "m2", "c") == 0.3  # m2 recorded m1:r2 only: m1's record of m2:s1
    assert cross_score(scores, shown, "m1", "d") == 0.5 and cross_score(scores, shown, "m2", "d") == 0.5
    assert cross_score(scores, shown, "m1", "x") is None
    assert cross_score(scores, {"m1": "r1"}, "m1", "c") is None  # no other method shown
    assert cross_score(scores, {"m1": "r1", "m2": "s1", "m3": "t"}, "m1", "c") == pytest.approx(0.5)  # (0.3+0.7)/2


def test_review_rows_show_each_methods_best_run_with_every_score(tmp_path):
    project = tiny_project(tmp_path / "p")
    model_run(project, "m1", "r1", best=0.8)
    model_run(project, "m1", "r2", best=0.3)
    empty = {"c2": {}, "c3": {}}
    write_pseudo(project, "m1", "r1", empty, {"cases": {
        "c2": {"agreement_mean": 0.4, "agreement_worst": 0.1, "tta_agreement": 0.7, "confidence": 0.6,
               "cross_agreement": {"m2:s1": 0.3}},
        "c3": {"agreement_mean": 0.9, "agreement_worst": 0.8, "tta_agreement": 0.2, "confidence": 0.95}}})
    write_pseudo(project, "m1", "r2", empty, {"cases": {  # newer and worse on validation: not shown
        "c2": {"agreement_mean": 0.05, "agreement_worst": 0.01, "tta_agreement": 0.05, "confidence": 0.05,
               "cross_agreement": {"m2:s1": 0.01}},
        "c3": {"agreement_mean": 0.06, "tta_agreement": 0.06, "confidence": 0.06}}})
    write_pseudo(project, "m2", "s1", empty, {"cases": {"c2": {"cross_agreement": {"m1:r2": 0.01}},
                                                         "c3": {"cross_agreement": {"m1:r1": 0.5}}}})
    flag_case(project, "c3", "odd", user="tester")
    save_draft(project, "c2", project.read_image("c2").like(MAIN.copy()))
    rows = review_rows(project)
    assert [r["case"] for r in rows] == ["c2", "c3", "c1"]  # cross: c2 0.3, c3 0.5; c1 is labeled
    c2 = rows[0]
    assert c2["scores"]["m1"] == {"run": "r1", "mean": 0.4, "worst_class": 0.1, "tta": 0.7, "confidence": 0.6,
                                  "cross": 0.3}
    assert c2["scores"]["m2"] == {"run": "s1", "mean": None, "worst_class": None, "tta": None, "confidence": None,
                                  "cross": 0.3}
    assert rows[1]["scores"]["m1"]["cross"] == 0.5 and rows[1]["scores"]["m2"]["cross"] == 0.5
    assert [(r["flagged"], r["draft"]) for r in rows] == [(False, True), (True, False), (False, False)]
    assert rows[2]["labeled"] is True and rows[2]["scores"] == {}
    assert [r["case"] for r in review_rows(project, score="tta")] == ["c3", "c2", "c1"]
    assert [r["case"] for r in review_rows(project, score="mean")] == ["c2", "c3", "c1"]
    assert [r["case"] for r in review_rows(project, score="confidence")] == ["c2", "c3", "c1"]
    newest = review_rows(project, runs={"m1": "r2", "m2": "s1"})
    assert newest[0]["scores"]["m1"] == {"run": "r2", "mean": 0.05, "worst_class": 0.01, "tta": 0.05,
                                         "confidence": 0.05, "cross": 0.01}
    alone = review_rows(project, runs={"m1": "r1"}, score="mean")
    assert "m2" not in alone[0]["scores"] and alone[0]["scores"]["m1"]["cross"] is None


def test_pseudo_views_and_read_views_follow_the_shown_runs_and_skip_misfits(tmp_path):
    project = tiny_project(tmp_path / "p")
    alt = columns({1: range(0, 1)})
    model_run(project, "m1", "r1", best=0.8)
    model_run(project, "m1", "r2", best=0.1)
    write_pseudo(project, "m1", "r1", {"c2": {"main": MAIN, "alt": alt}})
    write_pseudo(project, "m1", "r2", {"c2": {"main": alt, "newest": alt}})
    write_pseudo(project, "m2", "s1", {"c3": {"p": MAIN}})  # no view of c2
    write_pseudo(project, "m3", "t1", {"c2": {"p": MAIN}}, spacing=(2.0, 1.5, 3.5))  # not on the image grid
    paths = pseudo_views(project, "c2")
    assert list(paths) == ["m1:alt", "m1:main", "m3:p"]  # default runs: m1's best (r1), not the newest
    assert paths["m1:main"] == project.pseudo_dir("m1", "r1") / "c2" / "main.nii.gz"
    views = read_views(project, "c2")
    assert list(views) == ["m1:alt", "m1:main"]  # m3's view does not fit the image: never shown misaligned
    assert views["m1:main"].dtype == np.uint8 and np.array_equal(views["m1:main"], MAIN)
    assert np.array_equal(views["m1:alt"], alt)
    newest = read_views(project, "c2", {"m1": "r2", "m2": "s1"})
    assert list(newest) == ["m1:main", "m1:newest"] and np.array_equal(newest["m1:main"], alt)
    assert list(pseudo_views(project, "c3")) == ["m2:p"]


# ---- inference: a probe method whose views are known ------------------------------------------------------------
@dataclasses.dataclass
class ProbeConfig(BaseConfig):
    num_classes: int = 3


class Probe(Method):
    """``main``: A where the normalised intensity is in the lowest fifth of its range (x 0-1 of the ramp), B on the
    fixed columns x 3-5; ``alt``: A on x < w, B on x 3-4, where w is the one weight (which checkpoint loaded).
    Its probabilities: 0.8 on the ``main`` class inside structures, (0.4, 0.3, 0.3) on background."""

    name = "probe"
    dims = 3
    config_class = ProbeConfig
    views = ("main", "alt")
    primary_view = "main"

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        self.net = torch.nn.Linear(1, 1, bias=False)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return [self.opt]

    def train_step(self, labeled, unlabeled, step):
        return {}

    def _main(self, volume: torch.Tensor) -> np.ndarray:
        v = volume[0].numpy()
        label = np.zeros(v.shape, np.uint8)
        label[v < v.min() + 0.2 * (v.max() - v.min())] = 1
        label[..., 3:6] = 2
        return label

    def predict(self, volume):
        return self._main(volume)

    def pseudo_labels(self, volume):
        width = int(round(float(self.net.weight)))
        return {"main": self._main(volume), "alt": columns({1: range(0, width), 2: range(3, 5)}, volume.shape[1:])}

    def primary_probabilities(self, volume):
        main = torch.from_numpy(self._main(volume)).long()
        inside = torch.nn.functional.one_hot(main, 3).permute(3, 0, 1, 2).float() * 0.7 + 0.1
        outside = torch.tensor([0.4, 0.3, 0.3])[:, None, None, None].expand_as(inside)
        return torch.where(main[None] > 0, inside, outside)


def probe_checkpoint(project, run, path_name, weight, step):
    method = Probe(ProbeConfig())
    with torch.no_grad():
        method.net.weight.fill_(weight)
    folder = project.model_dir("probe", run)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(RunFiles(folder), method, "probe", step, {}, folder / path_name)


@pytest.fixture
def probe_project(tmp_path, monkeypatch):
    """c1 labeled, c2 and c3 not; probe runs: OLD (best 0.7 at step 5 with w=1 in best.pt, last step 9 with w=3),
    NEW (newer, best 0.2, only checkpoint.pt with w=2)."""
    real = inference.get_method
    monkeypatch.setattr(inference, "get_method", lambda name: Probe if name == "probe" else real(name))
    project = tiny_project(tmp_path / "p")
    model_run(project, "probe", OLD, checkpoint=False, best=0.7, last=0.6, labeled_count=7)
    probe_checkpoint(project, OLD, "best.pt", 1.0, 5)
    probe_checkpoint(project, OLD, "checkpoint.pt", 3.0, 9)
    model_run(project, "probe", NEW, checkpoint=False, best=0.2, last=0.15)
    probe_checkpoint(project, NEW, "checkpoint.pt", 2.0, 4)
    return project


OLD, NEW = "20260101-000000", "20260102-000000"
# main vs alt with w=1: A {0,1} vs {0}: 2/3; B {3,4,5} vs {3,4}: 4/5; w=3: A {0,1} vs {0,1,2}: 4/5
AGREE_BEST = {"per_class": {"A": 0.666667, "B": 0.8}, "mean": 0.733333}
AGREE_LAST = {"per_class": {"A": 0.8, "B": 0.8}, "mean": 0.8}
# TTA: mirrored image -> A on x 6-7, fixed B 3-5; mirrored back: A 0-1, B 2-4: A 1, B 2*2/6
TTA = 0.833333
# confidence over the structure voxels of main: 1 - H(0.8, 0.1, 0.1) / ln 3 (background voxels do not count)
CONFIDENCE = 1 - -(0.8 * np.log(0.8) + 0.2 * np.log(0.1)) / np.log(3)


def test_inference_loads_the_best_checkpoint_of_the_best_run_by_default(probe_project):
    project = probe_project
    events = []
    assert inference.infer(project, "probe", device="cpu", on_event=events.append) == OLD  # not the newest
    scores = json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())
    loaded = {"run": OLD, "chosen_by": "best validation", "checkpoint": "best", "step": 5, "dice": 0.7}
    assert scores["model"] == loaded and events[0]["model"] == loaded
    assert list(scores["cases"]) == ["c2", "c3"]  # the unlabeled cases
    for case in ("c2", "c3"):
        assert scores["cases"][case]["agreement"] == {"main|alt": AGREE_BEST}
    assert not runs.pseudo_runs(project, "probe")[1:]

    assert inference.infer(project, "probe", run=OLD, device="cpu", cases=["c2"], checkpoint="last") == OLD
    scores = json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())
    assert scores["model"] == {"run": OLD, "chosen_by": "named", "checkpoint": "last", "step": 9, "dice": 0.6}
    assert scores["cases"]["c2"]["agreement"] == {"main|alt": AGREE_LAST}
    assert scores["cases"]["c3"]["agreement"] == {"main|alt": AGREE_BEST}  # a subset merges into the run

    inference.infer(project, "probe", device="cpu", cases=["c1"])  # a labeled case, named
    assert sorted(json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())["cases"]) == [
        "c1", "c2", "c3"]
    inference.infer(project, "probe", device="cpu")  # a full run replaces the table
    assert sorted(json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())["cases"]) == [
        "c2", "c3"]

    model, run, info = inference.load_trained(project, "probe", NEW, device="cpu")  # no best.pt: its last
    assert run == NEW and float(model.net.weight) == 2.0
    assert info["loaded"] == {"run": NEW, "chosen_by": "named", "checkpoint": "last", "step": 4, "dice": 0.15}
    model, run, info = inference.load_trained(project, "probe", device="cpu")
    assert run == OLD and float(model.net.weight) == 1.0 and info["loaded"]["checkpoint"] == "best"
    with pytest.raises(InputError, match="no trained run"):
        inference.load_trained(project, "supervised", device="cpu")
    with pytest.raises(InputError, match="no case"):
        inference.infer(project, "probe", device="cpu", cases=["c9"])


def test_inference_writes_views_on_the_image_grid_and_the_scores_by_hand(probe_project):
    project = probe_project
    events = []
    inference.infer(project, "probe", device="cpu", on_event=events.append)
    assert [e["type"] for e in events] == ["start", "progress", "progress", "done"]
    assert [(e["step"], e["total"], e["case"]) for e in events[1:3]] == [(1, 2, "c2"), (2, 2, "c3")]
    assert events[1]["agreement_mean"] == AGREE_BEST["mean"] and events[2]["eta_s"] == 0.0
    assert events[0]["cases"] == ["c2", "c3"] and events[0]["total"] == 2
    folder = project.pseudo_dir("probe", OLD)
    for view, expected in (("main", MAIN), ("alt", columns({1: range(0, 1), 2: range(3, 5)}))):
        path = folder / "c3" / f"{view}.nii.gz"
        image = sitk.ReadImage(str(path))
        assert image.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(image.GetSpacing(), SPACING) and np.allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
        assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), DIRECTION, atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(image), expected)
        assert project.read_image("c3").geometry_mismatch(read_volume(path)) is None
    scores = json.loads((folder / "scores.json").read_text())
    assert (scores["method"], scores["run"], scores["views"], scores["primary_view"]) == (
        "probe", OLD, ["main", "alt"], "main")
    assert scores["labels"] == {"1": "A", "2": "B"} and scores["labeled_count"] == 7  # as run.json says
    case = scores["cases"]["c2"]
    assert case["agreement_mean"] == AGREE_BEST["mean"] and case["agreement_worst"] == 0.666667
    assert case["tta_agreement"] == pytest.approx(TTA, abs=1e-6)
    assert case["confidence"] == pytest.approx(CONFIDENCE, abs=1e-5)
    assert case["volume_ml"] == {"main": pytest.approx({"A": 0.216, "B": 0.324}),
                                 "alt": pytest.approx({"A": 0.108, "B": 0.216})}
    assert case["cross_agreement"] == {}
    views, image = inference.case_views(inference.load_trained(project, "probe", device="cpu")[0], project, "c2")
    assert list(views) == ["main", "alt"] and np.array_equal(views["main"], MAIN) and image.shape == SHAPE


def test_inference_scores_cross_method_agreement_against_every_run_of_the_others(probe_project):
    project = probe_project
    a_only = columns({1: range(0, 2)})  # vs main: A 1, B 0 -> 0.5
    write_pseudo(project, "other", "r1", {"c2": {"pv": a_only, "x": MAIN}}, {"primary_view": "pv"})
    write_pseudo(project, "other", "r2", {"c2": {"pv": MAIN, "x": a_only}}, {"primary_view": "pv"})
    write_pseudo(project, "other", "r3", {"c3": {"pv": MAIN}}, {"primary_view": "pv"})  # no c2
    write_pseudo(project, "third", "q", {"c2": {"pv": MAIN}}, {"primary_view": "pv"}, spacing=(2.0, 1.5, 4.0))
    inference.infer(project, "probe", device="cpu", cases=["c2"])
    scores = json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())
    assert scores["cases"]["c2"]["cross_agreement"] == {"other:r1": 0.5, "other:r2": 1.0}
    inference.infer(project, "probe", device="cpu", cases=["c2"])  # its own earlier run is no other method
    scores = json.loads((project.pseudo_dir("probe", OLD) / "scores.json").read_text())
    assert scores["cases"]["c2"]["cross_agreement"] == {"other:r1": 0.5, "other:r2": 1.0}


# ---- export -------------------------------------------------------------------------------------------------------
def read_sitk(path):
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == SHAPE[::-1] and image.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(image.GetSpacing(), SPACING, atol=1e-5)
    assert np.allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), DIRECTION, atol=1e-6)
    return image, sitk.GetArrayFromImage(image)


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "seg.nrrd"])
def test_export_writes_labels_on_the_source_geometry(tmp_path, fmt):
    project = tiny_project(tmp_path / "p", labeled=("c3", "c1"))
    label = MAIN.copy()
    label[:, :, 3:6] = 0
    label[1, 1:3, 3:6] = 2  # B: x 3-5, y 1-2, z 1
    project.accept("c3", label, source="test")
    paths = export(project, tmp_path / "out", fmt=fmt)
    assert [p.name for p in paths] == [f"c1.{fmt}", f"c3.{fmt}"]
    image, array = read_sitk(paths[1])
    assert np.array_equal(array, label)
    assert np.array_equal(read_sitk(paths[0])[1], MAIN)
    if fmt == "seg.nrrd":
        assert image.GetMetaData("Segment0_Extent") == "0 1 0 3 0 2"  # i (x), j (y), k (z) of A
        assert image.GetMetaData("Segment1_Extent") == "3 5 1 2 1 1"
        assert image.GetMetaData("Segment1_Tags") == "Segmentation.Status:completed|"
        assert image.GetMetaData("Segment1_LabelValue") == "2" and image.GetMetaData("Segment1_Name") == "B"


def test_slicer_metadata_numbers_foreground_segments_only():
    label = np.zeros((2, 3, 4), np.uint8)
    label[1, 2, 3] = 5
    meta = slicer_metadata(label, {0: "bg", 1: "A", 5: "E"}, status="inprogress")
    assert "Segment2_ID" not in meta
    assert (meta["Segment0_ID"], meta["Segment1_ID"], meta["Segment1_LabelValue"]) == ("Segment_1", "Segment_5", "5")
    assert meta["Segment0_Extent"] == "0 -1 0 -1 0 -1" and meta["Segment1_Extent"] == "3 3 2 2 1 1"
    assert meta["Segment1_Color"] == "%g %g %g" % colors.label_color(5)
    assert meta["Segment0_Tags"] == "Segmentation.Status:inprogress|" and meta["Segment1_Layer"] == "0"
    box = np.zeros((4, 5, 6), bool)
    box[1:3, 2, 0:5] = True
    assert segment_extent(box) == "0 4 2 2 1 2"


def test_pseudo_label_export_takes_the_primary_view(tmp_path):
    project = tiny_project(tmp_path / "p")
    a, b = columns({1: range(0, 3)}), columns({2: range(4, 8)})
    write_pseudo(project, "m", "r0", {"c2": {"a": a, "b": b}}, {"views": ["a", "b"]})  # neither: views[0]
    write_pseudo(project, "m", "r1", {"c2": {"a": a, "b": b}, "c3": {"a": a}},
                 {"views": ["a", "b"], "primary_view": "b"})  # scores.json names it; c3 has no b
    model_run(project, "m", "r1", primary_view="a")  # what inference recorded wins over training's record
    write_pseudo(project, "m", "r2", {"c2": {"a": a, "b": b}}, {"views": ["a", "b"]})  # the latest
    model_run(project, "m", "r2", primary_view="b")  # training recorded it
    write_pseudo(project, "m", "rx", {"c2": {"a": a}}, {"views": []})
    (path,) = export(project, tmp_path / "latest", fmt="seg.nrrd", source="m", run="r2")
    image, array = read_sitk(path)
    assert np.array_equal(array, b) and image.GetMetaData("Segment1_Tags") == "Segmentation.Status:inprogress|"
    (path,) = export(project, tmp_path / "r1", source="m", run="r1")
    assert path.name == "c2.nii.gz" and np.array_equal(read_sitk(path)[1], b)
    (path,) = export(project, tmp_path / "r0", source="m", run="r0")
    assert np.array_equal(read_sitk(path)[1], a)
    with pytest.raises(InputError, match="names no views"):
        export(project, tmp_path / "rx", source="m")  # rx is the latest run
    with pytest.raises(InputError, match="no complete inference run"):
        export(project, tmp_path / "x", source="m", run="r9")
    with pytest.raises(InputError, match="no pseudo labels"):
        export(project, tmp_path / "x", source="nothing")
    with pytest.raises(InputError, match="unknown export format"):
        export(project, tmp_path / "x", fmt="png")
    write_pseudo(project, "k", "r1", {"c2": {"a": a}}, {"views": ["a"]}, spacing=(2.0, 1.5, 3.5))
    with pytest.raises(InputError, match="does not match its image"):
        export(project, tmp_path / "k", source="k")


# ---- corrections ----------------------------------------------------------------------------------------------------
def test_accept_correction_saves_the_label_and_its_history_and_grows_the_labeled_set(tmp_path):
    project = tiny_project(tmp_path / "p")
    image = project.read_image("c2")
    save_draft(project, "c2", image.like(MAIN.copy()), {"started_from": "m:main"})
    flag_case(project, "c2", "check B", user="tester")
    flag_case(project, "c3", "other", user="tester")
    assert list_drafts(project) == ["c2"] and sorted(flags(project)) == ["c2", "c3"]
    start = columns({1: range(0, 1), 2: range(3, 6)})  # differs from MAIN on x = 1: 12 voxels
    version = project.label_version("c2")
    assert version is None
    record = accept_correction(project, "c2", MAIN.copy(), source="m:main", start=start, seconds=12.34,
                               extra={"note": "x"}, expected_version=version)
    assert project.labeled_cases() == ["c1", "c2"]
    assert np.array_equal(project.read_label("c2").array, MAIN)
    assert project.read_image("c2").geometry_mismatch(project.read_label("c2")) is None
    dataset = json.loads(project.dataset_path.read_text())
    assert dataset["numTraining"] == 2 and [t["label"] for t in dataset["training"]] == [
        "./labelsTr/c1.nii.gz", "./labelsTr/c2.nii.gz"]
    assert record["source"] == "m:main" and record["started_from"] == "m:main" and record["note"] == "x"
    assert record["voxels_edited"] == 12 and record["seconds_spent"] == 12.3
    assert record["voxels_changed"] == 96  # no previous label: every voxel
    assert record["voxels_per_class"] == {"background": 36, "A": 24, "B": 36}
    assert record["accept_seconds"] >= 0
    (history,) = project.history("c2")
    assert history["started_from"] == "m:main" and history["voxels_edited"] == 12
    assert list_drafts(project) == [] and load_draft(project, "c2") is None  # the draft is cleared
    assert list(flags(project)) == ["c3"]  # so is its flag, only its own
    assert project.unlabeled_cases() == ["c3"]
    with pytest.raises(LabelConflictError):
        accept_correction(project, "c2", MAIN.copy(), source="m:main", expected_version=None)
    second = accept_correction(project, "c2", start, source="manual", start=MAIN.copy(),
                               expected_version=project.label_version("c2"))
    assert second["voxels_changed"] == 12 and second["voxels_edited"] == 12
    assert len(project.history("c2")) == 2 and np.array_equal(project.read_label("c2").array, start)
    assert "voxels_edited" not in accept_correction(project, "c3", MAIN.copy(), source="manual")  # no start


def test_drafts_and_flags_round_trip(tmp_path):
    project = tiny_project(tmp_path / "p")
    image = project.read_image("c2")
    assert load_draft(project, "c2") is None and list_drafts(project) == []
    save_draft(project, "c3", image.like(MAIN.copy()))
    save_draft(project, "c2", image.like(MAIN.astype(np.int64)), {"seconds": 4})
    volume, info = load_draft(project, "c2")
    assert volume.array.dtype == np.uint8 and np.array_equal(volume.array, MAIN)
    assert volume.geometry_mismatch(image) is None
    assert info["case"] == "c2" and info["seconds"] == 4 and "time" in info
    assert list_drafts(project) == ["c2", "c3"]
    discard_draft(project, "c2")
    assert list_drafts(project) == ["c3"] and not (project.semiseg / "drafts" / "c2.json").exists()
    record = flag_case(project, "c2", "odd", user="tester")
    assert record["reason"] == "odd" and record["user"] == "tester"
    assert flags(project)["c2"]["reason"] == "odd"
    with pytest.raises(KeyError):
        flag_case(project, "c9")
    unflag_case(project, "c2")
    unflag_case(project, "c2")
    assert flags(project) == {}


def test_accept_warnings_name_empty_labels_and_lost_classes():
    labels = {0: "background", 1: "A", 2: "B"}
    a_only = columns({1: range(0, 2)})
    assert accept_warnings(MAIN, {"m:v": MAIN}, labels) == []
    assert accept_warnings(a_only, {}, labels) == []  # no reference has B
    assert accept_warnings(a_only, {"m:v": MAIN, "none": None, "small": MAIN[:1]}, labels) == [
        "it has no 'B' (label 2), which m:v has"]
    assert accept_warnings(a_only, {"m:v": MAIN, "accepted": MAIN}, labels) == [
        "it has no 'B' (label 2), which m:v, accepted have"]
    assert accept_warnings(np.zeros(SHAPE, np.uint8), {"m:v": MAIN}, labels) == ["it is empty (background only)"]
    b_only = columns({2: range(0, 2)})
    assert accept_warnings(b_only, {"m:v": MAIN}, labels) == ["it has no 'A' (label 1), which m:v has"]
