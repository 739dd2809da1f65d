"""Shared helpers of the plugin tests: pseudo labels and scores written by hand (so GUI tests need no training),
and the viewer-with-both-docks fixture.  The test at the bottom checks the helpers themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.project import Project
from backend.project.sample import reference_label_path
from backend.io.volume import read_volume, write_volume
from backend.project.runs import methods_with_pseudo_labels

FAKE_RUN = "20250101-000000"
FAKE_VIEWS = {"diffcl": ("cs", "ds"), "genericssl": ("combined", "diffusion")}  # real view names


class Answers:
    """Stands in for the docks' question boxes (``napari_semiseg._state.ask``): records each question and answers
    from a queue (else the last button, the one a closed box gives)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, list[str]]] = []
        self.queue: list[str] = []

    def __call__(self, parent, title, text, buttons, default=None):
        self.asked.append((title, text, buttons))
        return self.queue.pop(0) if self.queue else buttons[-1]


@pytest.fixture
def answers(monkeypatch):
    """The docks' questions answered by an :class:`Answers` (import it with ``autouse`` in a GUI test module)."""
    from napari_semiseg import _state

    fake = Answers()
    monkeypatch.setattr(_state, "ask", fake)
    return fake


def _threshold_label(image: np.ndarray) -> np.ndarray:
    """A crude but plausible tissue map of an unlabeled T1 head: dark-to-mid = GM, bright = WM."""
    low, mid, high = np.percentile(image[image > np.percentile(image, 60)], [10, 50, 90])
    out = np.zeros(image.shape, np.uint8)
    out[(image > low) & (image <= mid)] = 1
    out[(image > mid) & (image <= high)] = 2
    return out


def _perturb(label: np.ndarray, seed: int, amount: float) -> np.ndarray:
    """A plausible second opinion: inside a random box (``amount`` of each axis) grow or shrink one class by a
    voxel, as two models differ along the tissue borders they are unsure of."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = label.copy()
    size = [max(2, int(s * amount)) for s in label.shape]
    corner = [int(rng.integers(0, max(1, s - d))) for s, d in zip(label.shape, size)]
    box = tuple(slice(c, c + d) for c, d in zip(corner, size))
    region = out[box]
    k = 1 + seed % 2
    grown = ndimage.binary_dilation(region == k, iterations=1 + seed % 2)
    if seed % 3 == 0:
        region[(region == k) & ~ndimage.binary_erosion(region == k)] = 0
    else:
        region[grown & (region != 0)] = k
    return out


def dice_per_class(a: np.ndarray, b: np.ndarray, num_classes: int) -> dict[str, float]:
    out = {}
    for k in range(1, num_classes):
        sa, sb = a == k, b == k
        denom = int(sa.sum() + sb.sum())
        out[str(k)] = 1.0 if denom == 0 else 2.0 * int((sa & sb).sum()) / denom
    return out


def write_fake_pseudo_labels(project: Project, run: str = FAKE_RUN,
                             methods: dict[str, tuple[str, ...]] = FAKE_VIEWS) -> dict[str, dict]:
    """Write pseudo labels of every unlabeled case for ``methods`` (``semiseg/pseudo/<m>/<run>/<case>/<view>``)
    with a scores.json per run, as the engine does; the views are perturbed copies of the reference label
    (or a threshold map where the sample has none).  Returns the scores per method."""
    all_scores = {}
    primaries: dict[str, dict[str, np.ndarray]] = {}  # method -> case -> primary view (the cross-method pairs)
    for mi, (method, views) in enumerate(methods.items()):
        scores: dict = {"run": run, "method": method, "views": list(views), "primary_view": views[0], "cases": {}}
        for ci, case in enumerate(project.unlabeled_cases()):
            image = project.read_image(case)
            ref_path = reference_label_path(project.name, case)
            base = read_volume(ref_path).array.astype(np.uint8) if ref_path else _threshold_label(image.array)
            from scipy import ndimage

            base = ndimage.median_filter(base, size=3)
            arrays = {}
            for vi, view in enumerate(views):
                arrays[view] = _perturb(base, seed=7 * mi + 3 * vi + ci, amount=0.3 + 0.2 * ci + 0.1 * vi)
                write_volume(image.like(arrays[view]), project.pseudo_dir(method, run) / case / f"{view}.nii.gz")
            a, b = arrays[views[0]], arrays[views[1]]
            per_class = dice_per_class(a, b, project.num_classes)
            mean = float(np.mean(list(per_class.values())))
            # the other scores as the engine records them: the TTA label and the entropy are stood in for by the
            # second view (so they rank as the agreement does); the pairs with earlier methods are real Dice
            cross = {f"{other}:{run}": float(np.mean(list(dice_per_class(a, done[case], project.num_classes).values())))
                     for other, done in primaries.items() if other != method}
            primaries.setdefault(method, {})[case] = a
            scores["cases"][case] = {"agreement": {f"{views[0]}|{views[1]}": {"per_class": per_class, "mean": mean}},
                                     "agreement_mean": mean, "agreement_worst": min(per_class.values()),
                                     "tta_agreement": mean, "confidence": round(0.5 + 0.5 * mean, 6),
                                     "cross_agreement": cross}
        path = project.pseudo_dir(method, run) / "scores.json"
        path.write_text(json.dumps(scores, indent=2))
        all_scores[method] = scores
    return all_scores


def sort_by(qtbot, dock, score: str) -> None:
    """Choose ``score`` (a key of ``SORT_SCORES``) in the review dock's *Sort by* box and wait for the table."""
    index = dock.sort_combo.findData(score)
    assert index >= 0, f"no sort score {score!r} in the dock"
    if index != dock.sort_combo.currentIndex():
        with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
            dock.sort_combo.setCurrentIndex(index)


@pytest.fixture
def reviewed_project(tmp_path) -> Project:
    """A copy of the real brain-tissue sample with hand-made pseudo labels of two methods."""
    from backend.project.sample import copy_sample

    project = copy_sample(tmp_path / "brain", "brain_tissue")
    write_fake_pseudo_labels(project)
    return project


@pytest.fixture
def docks(make_napari_viewer, qtbot, brain_project):
    """A viewer with the review and training docks on a copy of the real brain-tissue sample."""
    from napari_semiseg.review import ReviewDock
    from napari_semiseg.training import TrainingDock

    viewer = make_napari_viewer()
    review = ReviewDock(viewer)
    training = TrainingDock(viewer)
    viewer.window.add_dock_widget(review, name="Review pseudo labels")
    viewer.window.add_dock_widget(training, name="Train and infer", tabify=True)
    with qtbot.waitSignal(review.table_refreshed, timeout=20000):
        review.open_project(brain_project.root)
    yield review, training
    review._baseline = None  # nothing left to ask about when the viewer closes
    training._timer.stop()
    process = training._choices_process
    if process.state() != process.ProcessState.NotRunning:
        process.kill()
        process.waitForFinished(5000)


# ---- the helpers' own tests ------------------------------------------------------------------------------------
def test_fake_pseudo_labels_follow_the_engine_layout(reviewed_project):
    project = reviewed_project
    assert methods_with_pseudo_labels(project) == ["diffcl", "genericssl"]
    for case in project.unlabeled_cases():
        for method, views in FAKE_VIEWS.items():
            for view in views:
                path = project.pseudo_dir(method, FAKE_RUN) / case / f"{view}.nii.gz"
                volume = read_volume(path)
                assert project.read_image(case).geometry_mismatch(volume) is None
                assert set(np.unique(volume.array)) <= {0, 1, 2}
    table = project.case_table()
    scored = [r for r in table if not r["labeled"]]
    assert all(0.0 < r["scores"]["diffcl"]["mean"] < 1.0 for r in scored)
