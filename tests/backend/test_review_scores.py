"""The review scores (backend/engine/scores.py) on constructed cases whose answer is known, the cross-method pairs
the queue averages, and the queue's order following the chosen score (issue 19)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.engine import scores
from backend.engine.inference import infer, review_case
from backend.io.atomic import write_json_atomic
from backend.io.volume import write_volume
from backend.review.queue import DEFAULT_SORT_SCORE, SORT_SCORES, cross_score, review_rows, sort_review_queue
from helpers.engine_projects import small_brain_project


def _label() -> np.ndarray:
    """An asymmetric two-class label: class 1 in the left third, class 2 a block in the right half."""
    out = np.zeros((4, 6, 12), np.uint8)
    out[:, :, 0:4] = 1
    out[:, 1:5, 7:11] = 2
    return out


def test_entropy_is_zero_when_sure_and_one_when_uniform():
    sure = torch.zeros(3, 2, 2)
    sure[1] = 1.0
    assert torch.allclose(scores.normalised_entropy(sure), torch.zeros(2, 2), atol=1e-6)
    assert torch.allclose(scores.normalised_entropy(torch.full((3, 2, 2), 1 / 3)), torch.ones(2, 2), atol=1e-6)
    half = torch.tensor([[0.5], [0.5], [0.0]])  # two of three classes equally likely: log 2 / log 3
    assert scores.normalised_entropy(half).item() == pytest.approx(np.log(2) / np.log(3), rel=1e-5)


def test_confidence_averages_entropy_over_the_labeled_structure_only():
    label = np.array([[0, 1, 2, 0]])
    entropy = np.array([[0.9, 0.2, 0.4, 0.9]])  # unsure background must not count
    assert scores.confidence(entropy, label) == pytest.approx(1 - 0.3)
    assert scores.confidence(entropy, np.zeros_like(label)) is None


def test_identical_views_agree_fully_and_a_mirrored_view_does_not():
    label = _label()
    same = scores.case_scores({"a": label, "b": label.copy()}, "a", 3, tta_label=label.copy())
    assert same["agreement_mean"] == 1.0 and same["tta_agreement"] == 1.0
    mirrored = label[..., ::-1].copy()  # the two classes land where the other was: no overlap at all
    flipped = scores.case_scores({"a": label, "b": mirrored}, "a", 3, tta_label=mirrored)
    assert flipped["agreement_mean"] == 0.0 and flipped["tta_agreement"] == 0.0
    assert flipped["confidence"] is None  # no entropy map given


def test_tta_agreement_is_the_foreground_dice_against_the_tta_label():
    label = _label()
    tta = label.copy()
    tta[:, :, 3] = 0  # class 1 loses a quarter of its voxels: Dice 2*18/(24+18)
    got = scores.case_scores({"a": label}, "a", 3, tta_label=tta)["tta_agreement"]
    assert got == pytest.approx(((2 * 72 / (96 + 72)) + 1.0) / 2, abs=1e-6)


def test_cross_agreement_is_the_mean_over_the_other_methods():
    label = _label()
    assert scores.cross_agreement(label, [label, label[..., ::-1].copy()], 3) == pytest.approx(0.5)
    assert scores.cross_agreement(label, [], 3) is None


def test_slabs_cover_the_volume_and_slab_scores_read_only_their_slices():
    assert scores.slabs(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert scores.slabs(2, 5) == [(0, 1), (1, 2)]
    label = _label()
    bad = label.copy()
    bad[2:] = label[2:, :, ::-1]  # slices 2-3 mirrored in the other view and the TTA label
    entropy = np.zeros(label.shape, np.float32)
    entropy[2:] = 0.5
    top = scores.slab_scores({"a": label, "b": bad}, "a", 3, 0, 2, entropy=entropy, tta_label=bad, others=[bad])
    low = scores.slab_scores({"a": label, "b": bad}, "a", 3, 2, 4, entropy=entropy, tta_label=bad, others=[bad])
    assert top == {"mean": 1.0, "tta": 1.0, "confidence": 1.0, "cross": 1.0}
    assert low == {"mean": 0.0, "tta": 0.0, "confidence": 0.5, "cross": 0.0}


def test_cross_score_reads_the_pair_from_either_run_and_ignores_runs_not_shown():
    runs = {"a": "r1", "b": "r2", "c": "r3"}
    table = {"a": {"cases": {"x": {"cross_agreement": {"b:r2": 0.2, "c:old": 0.9}}}},
             "b": {"cases": {"x": {}}},
             "c": {"cases": {"x": {"cross_agreement": {"a:r1": 0.6}}}}}
    assert cross_score(table, runs, "a", "x") == pytest.approx(0.4)  # (0.2 + 0.6) / 2; c:old is not shown
    assert cross_score(table, runs, "b", "x") == pytest.approx(0.2)
    assert cross_score(table, {"a": "r1"}, "a", "x") is None


def test_the_queue_follows_the_chosen_score_lowest_first():
    rows = [{"case": c, "labeled": False, "scores": {"m": {"mean": mean, "cross": cross}, "n": {"mean": 0.7}}}
            for c, mean, cross in [("p", 0.9, 0.1), ("q", 0.5, 0.8), ("r", 0.1, 0.5)]]  # a case's doubt: its min
    rows.append({"case": "lab", "labeled": True, "scores": {"m": {"mean": 0.0, "cross": 0.0}}})
    assert [r["case"] for r in sort_review_queue(rows, "mean")] == ["r", "q", "p", "lab"]
    assert [r["case"] for r in sort_review_queue(rows, "cross")] == ["p", "r", "q", "lab"]
    assert set(SORT_SCORES) == set(scores.SCORES) and DEFAULT_SORT_SCORE == next(iter(SORT_SCORES))
    with pytest.raises(KeyError):
        sort_review_queue(rows, "max")


def test_inference_records_every_score_and_the_queue_sorts_by_each(tmp_path, one_torch_thread):
    """Two real methods on the real (cropped) sample: per case TTA, confidence and the cross-method pair, and the
    queue of each score ordered by that score."""
    from backend.engine.training import train

    project = small_brain_project(tmp_path / "p", size=(32, 48, 48))
    fast = {"val_every": 1, "checkpoint_every": 1}
    for method in ("supervised", "supervised2d"):
        train(project, method, preset="tiny", steps=1, device="cpu", overrides=fast)
        infer(project, method, device="cpu")
    late = json.loads(next((project.semiseg / "pseudo" / "supervised2d").glob("*/scores.json")).read_text())
    first_run = next((project.semiseg / "pseudo" / "supervised").iterdir()).name
    for case in project.unlabeled_cases():
        s = late["cases"][case]
        assert 0 <= s["tta_agreement"] <= 1 and 0 <= s["confidence"] <= 1
        assert list(s["cross_agreement"]) == [f"supervised:{first_run}"]
    for score in SORT_SCORES:
        rows = [r for r in review_rows(project, score=score) if not r["labeled"]]
        values = [min([v[score] for v in r["scores"].values() if v.get(score) is not None] or [2.0]) for r in rows]
        assert values == sorted(values), (score, values)
        assert (max(values) < 2.0) == (score != "mean"), (score, values)  # one-view methods: no own agreement


def test_review_case_tta_label_is_the_primary_view_of_the_mirror(tmp_path, one_torch_thread, monkeypatch):
    """A network that mirrors exactly (it labels by intensity alone) gives a TTA label equal to the view; the
    entropy map lies in [0, 1] on the case's own grid."""
    from backend.engine.training import train
    from backend.engine.inference import load_trained

    project = small_brain_project(tmp_path / "p", size=(24, 32, 32))
    train(project, "supervised", preset="tiny", steps=1, device="cpu", overrides={"val_every": 1})
    model, _, _ = load_trained(project, "supervised", device="cpu")
    case = project.unlabeled_cases()[0]
    review = review_case(model, project, case)
    assert review.entropy.shape == review.image.shape and 0 <= review.entropy.min() <= review.entropy.max() <= 1
    assert review.tta_label.shape == review.image.shape
    # replace the net with a voxel-wise one (1x1x1 convolution): mirror-equivariant, so TTA must agree exactly
    net = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-4.0], [0.5], [4.0]]).view(3, 1, 1, 1, 1))
        net.bias.zero_()
    monkeypatch.setattr(model, "net", net)
    review = review_case(model, project, case)
    assert np.array_equal(review.tta_label, review.views["prediction"])
    assert review.views["prediction"].any()
    # and a net that is not mirror-equivariant (it sees x through a shifted kernel) disagrees somewhere
    shifted = torch.nn.Conv3d(1, 3, (1, 1, 3), padding=(0, 0, 1))
    with torch.no_grad():
        shifted.weight.zero_()
        shifted.weight[:, 0, 0, 0, 2] = torch.tensor([-4.0, 0.5, 4.0])
        shifted.bias.zero_()
    monkeypatch.setattr(model, "net", shifted)
    review = review_case(model, project, case)
    assert not np.array_equal(review.tta_label, review.views["prediction"])


def test_a_stale_pseudo_label_of_another_method_on_another_grid_is_skipped(tmp_path, one_torch_thread):
    from backend.engine.inference import cross_method_pairs

    project = small_brain_project(tmp_path / "p", size=(24, 32, 32))
    case = project.unlabeled_cases()[0]
    image = project.read_image(case)
    folder = project.pseudo_dir("other", "r1")
    good = np.ones(image.shape, np.uint8)
    write_volume(image.like(good), folder / case / "prediction.nii.gz")
    write_json_atomic(folder / "scores.json", {"primary_view": "prediction", "cases": {case: {}}})
    assert cross_method_pairs(project, "mine", case, good, image) == {"other:r1": 1.0}
    bad = image.like(good)
    bad.spacing = (3.0, 3.0, 3.0)
    write_volume(bad, folder / case / "prediction.nii.gz")
    assert cross_method_pairs(project, "mine", case, good, image) == {}
