"""The data pipeline: two streams per batch, correct patches, foreground oversampling, padding, determinism, speed."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from backend.engine.data import BatchSampler, CaseArrays, load_case, make_sampler
from backend.engine.intensity import normalize_intensity


def coded_case(name: str, shape=(20, 40, 48), labeled=True) -> CaseArrays:
    """A volume whose intensity encodes its voxel position (z * 1e4 + y * 100 + x) and whose label is a function
    of the position, so every patch can be checked against where it claims to come from."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = (z * 10000 + y * 100 + x).astype(np.float32)[None] + 1.0  # +1: no voxel is 0 (0 = padding)
    label = ((x // 8 + y // 8) % 3).astype(np.uint8) if labeled else None
    return CaseArrays(name, image, label, (1.0, 1.0, 1.0))


def decode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.rint(values - 1.0).astype(np.int64)
    return v // 10000, v // 100 % 100, v % 100


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 32)])
def test_patches_come_from_the_volume_with_their_labels(patch):
    labeled = coded_case("a")
    unlabeled = coded_case("u", labeled=False)
    unlabeled.image += 5_000_000  # tell the streams apart
    sampler = BatchSampler([labeled], [unlabeled], patch, batch_labeled=3, batch_unlabeled=2, seed=1)
    for _ in range(10):
        lab, unl = sampler.next()
        assert lab["image"].shape == (3, 1, *patch) and lab["image"].dtype == torch.float32
        assert lab["label"].shape == (3, 1, *patch) and lab["label"].dtype == torch.int64
        assert unl["image"].shape == (2, 1, *patch) and set(unl) == {"image"}
        z, y, x = decode(lab["image"].numpy())
        assert np.array_equal(lab["label"].numpy(), (x // 8 + y // 8) % 3)  # label matches the image voxel
        if len(patch) == 2:  # one axial slice: constant z, consecutive y and x
            assert (z == z[:, :, :1, :1]).all()
            assert (np.diff(y, axis=2) == 1).all() and (np.diff(x, axis=3) == 1).all()
        else:
            assert (np.diff(z, axis=2) == 1).all() and (np.diff(x, axis=4) == 1).all()
        assert unl["image"].min() > 5_000_000  # the unlabeled stream holds the unlabeled case


def test_foreground_oversampling_centres_labeled_patches_on_foreground():
    case = coded_case("a", shape=(40, 40, 40))
    case.label = np.zeros_like(case.label)
    case.label[30:34, 4:8, 20:24] = 2  # a small object: a random 8^3 patch rarely holds it
    sampler = BatchSampler([case], [], (8, 8, 8), batch_labeled=4, batch_unlabeled=0, seed=0, fg_fraction=1.0,
                           num_classes=3)
    always = [sampler.next()[0]["label"].flatten(1).amax(1) for _ in range(25)]
    assert all(bool((m == 2).all()) for m in always)  # every patch holds the object
    sampler = BatchSampler([case], [], (8, 8, 8), batch_labeled=4, batch_unlabeled=0, seed=0, fg_fraction=0.0,
                           num_classes=3)
    never = torch.cat([sampler.next()[0]["label"].flatten(1).amax(1) for _ in range(25)])
    assert (never == 0).float().mean() > 0.8  # uniform patches mostly miss it


def test_small_volumes_are_zero_padded_and_unlabeled_stream_falls_back_to_labeled():
    case = coded_case("small", shape=(10, 12, 14))
    sampler = BatchSampler([case], [], (16, 16, 16), batch_labeled=2, batch_unlabeled=2, seed=0)
    assert sampler.unlabeled_from_labeled
    lab, unl = sampler.next()
    image = lab["image"][0, 0].numpy()
    assert (image > 0).sum() == 10 * 12 * 14  # the whole volume, once
    assert (image == 0).sum() == 16 ** 3 - 10 * 12 * 14  # and zero padding around it
    assert (lab["label"][0, 0].numpy()[image == 0] == 0).all()
    assert unl["image"].shape == (2, 1, 16, 16, 16) and int((unl["image"][0] > 0).sum()) == 10 * 12 * 14


def test_batches_are_a_function_of_seed_and_index():
    a = BatchSampler([coded_case("a")], [coded_case("u", labeled=False)], (8, 16, 16), batch_labeled=2,
                     batch_unlabeled=2, seed=3)
    b = BatchSampler([coded_case("a")], [coded_case("u", labeled=False)], (8, 16, 16), batch_labeled=2,
                     batch_unlabeled=2, seed=3)
    first = [a.next() for _ in range(3)]
    b.load_state_dict({"seed": 3, "index": 2})
    assert torch.equal(b.next()[0]["image"], first[2][0]["image"])  # resumed sampler continues identically
    assert torch.equal(a.batch(0)[1]["image"], first[0][1]["image"])
    other = BatchSampler([coded_case("a")], [], (8, 16, 16), batch_labeled=2, batch_unlabeled=0, seed=4)
    assert not torch.equal(other.batch(0)[0]["image"], first[0][0]["image"])  # another rank's seed, other data
    assert a.state_dict() == {"seed": 3, "index": 3}


def test_real_project_batches_are_normalised_and_drawn_from_memory(brain_project, monkeypatch):
    config = type("C", (), dict(patch_size=(64, 64, 64), batch_labeled=2, batch_unlabeled=2, num_classes=3))
    cache: dict = {}
    sampler = make_sampler(brain_project, config, brain_project.labeled_cases(), brain_project.unlabeled_cases(),
                           seed=0, cache=cache)
    assert set(cache) == set(brain_project.case_ids())
    mni = load_case(brain_project, "mni152_t1")
    raw = brain_project.read_image("mni152_t1").array
    assert np.allclose(mni.image[0], normalize_intensity(raw, "MR"))
    assert mni.label.dtype == np.uint8 and set(np.unique(mni.label)) == {0, 1, 2}
    sampler.next()

    def no_disk(*_args, **_kwargs):
        raise AssertionError("a batch read a volume from disk: the sampler must draw from the loaded cases")

    # a batch is cropped from the volumes loaded once (milliseconds; bench/speed.py times it), never read again
    monkeypatch.setattr(type(brain_project), "read_image", no_disk)
    monkeypatch.setattr(type(brain_project), "read_label", no_disk)
    for _ in range(20):
        lab, unl = sampler.next()
    assert set(torch.unique(lab["label"]).tolist()) <= {0, 1, 2}
    assert lab["image"].shape[-3:] == (64, 64, 64) and unl["image"].shape[0] == 2


# ---- preprocessing of a preset: resampling grid and intensity window ---------------------------------------------
class _Prep:
    patch_size = (32, 32, 32)
    batch_labeled = 1
    batch_unlabeled = 1
    num_classes = 3

    def __init__(self, target_spacing=None, intensity_window=None):
        self.target_spacing = target_spacing
        self.intensity_window = intensity_window


def test_target_spacing_resamples_cases_and_labels_come_back_to_the_exact_case_grid(brain_project):
    from backend.engine.data import model_input, resample_to_spacing, to_case_grid

    image = brain_project.read_image("mni152_t1")  # 2 mm isotropic, 94 x 116 x 98 (z, y, x)
    label = brain_project.read_label("mni152_t1")
    fine = load_case(brain_project, "mni152_t1", config=_Prep(target_spacing=(1.0, 1.0, 1.0)))
    assert fine.spacing == (1.0, 1.0, 1.0) and fine.shape == (188, 232, 196)
    assert fine.label.shape == fine.shape and set(np.unique(fine.label)) == {0, 1, 2}  # nearest: no new values
    # every original voxel centre is a fine voxel centre (same origin, half the spacing): nearest back is exact
    fine_image = resample_to_spacing(image, (1.0, 1.0, 1.0))
    back = to_case_grid(fine.label, fine_image, image)
    assert back.shape == image.shape and np.array_equal(back, label.array)
    # the image is resampled (linear: exact at those centres, in between elsewhere), then normalised
    assert np.allclose(fine_image.array[::2, ::2, ::2], image.array, atol=1e-3)
    assert np.allclose(fine.image[0], normalize_intensity(fine_image.array, "MR"))

    coarse_config = _Prep(target_spacing=(3.0, 4.0, 2.0))  # (x, y, z) mm
    volume, grid, same = model_input(brain_project, "mni152_t1", coarse_config)
    assert tuple(volume.shape) == (1, 94, 58, 65) and grid.spacing == (3.0, 4.0, 2.0)
    assert grid.origin == image.origin and np.array_equal(grid.direction, image.direction)
    assert same.geometry_mismatch(image) is None
    coarse = load_case(brain_project, "mni152_t1", config=coarse_config)
    back = to_case_grid(coarse.label, grid, image)
    assert back.shape == image.shape
    for k in (1, 2):  # a coarse label brought back still overlaps the original well
        a, b = back == k, label.array == k
        assert 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) > 0.7

    sampler = make_sampler(brain_project, coarse_config, ["mni152_t1"], ["colin27_ch2"], seed=0)
    assert sampler.labeled[0].shape == (94, 58, 65)  # the sampler trains on the preset's grid
    unchanged = load_case(brain_project, "mni152_t1", config=_Prep())
    assert unchanged.shape == image.shape and np.array_equal(unchanged.label, label.array)


def test_intensity_window_clips_before_normalisation(brain_project):
    raw = brain_project.read_image("mni152_t1").array.astype(np.float32)
    out = normalize_intensity(raw, "MR", (30.0, 120.0))
    mask = raw != 0  # the zero background stays out of the statistics and stays zero
    clipped = np.clip(raw[mask], 30.0, 120.0)
    assert np.allclose(out[mask], (clipped - clipped.mean()) / clipped.std(), atol=1e-4)
    assert np.all(out[~mask] == 0)
    assert not np.allclose(out, normalize_intensity(raw, "MR"))
    case = load_case(brain_project, "mni152_t1", config=_Prep(intensity_window=(30.0, 120.0)))
    assert np.allclose(case.image[0], out)
    hu = np.array([-2000.0, -125.0, 75.0, 275.0, 3000.0], np.float32)
    assert np.allclose(normalize_intensity(hu, "CT", (-125, 275)), [-1, -1, 0, 1, 1])  # a paper's CT window
    assert np.allclose(normalize_intensity(hu, "CT"), np.clip(hu, -1000, 1000) / 1000)  # the default window
    with pytest.raises(ValueError, match="low < high"):
        normalize_intensity(raw, "MR", (5.0, 5.0))
