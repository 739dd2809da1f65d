"""DiffRect as a registered method: config and presets, training step, review views, checkpoint round trip,
learning on real slices, CUDA with AMP."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from backend.methods import get_method, method_names
from backend.methods.diffrect import DiffRect, DiffRectConfig, pad_to_multiple
from realdata import real_patch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**overrides) -> DiffRect:
    torch.manual_seed(0)
    return DiffRect(DiffRect.make_config("tiny", **{"num_classes": 3, **overrides}))


def _random_batch(bl=2, bu=2, size=64, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (bl, 1, size, size), generator=g)
    labeled = {"image": torch.randn(bl, 1, size, size, generator=g) + labels.float(), "label": labels}
    return labeled, {"image": torch.randn(bu, 1, size, size, generator=g)}


def _dice(pred: np.ndarray, ref: np.ndarray, classes) -> float:
    return float(np.mean([2 * ((pred == k) & (ref == k)).sum() / max(1, (pred == k).sum() + (ref == k).sum())
                          for k in classes]))


def test_registered_with_paper_defaults_and_presets():
    assert "diffrect" in method_names()
    cls = get_method("diffrect")
    assert cls is DiffRect and cls.dims == 2
    assert cls.views == ("weak", "strong", "rectified") and cls.primary_view == "rectified"
    c = cls.make_config()
    assert isinstance(c, DiffRectConfig)
    assert (c.patch_size, c.batch_labeled, c.batch_unlabeled, c.max_steps) == ((256, 256), 3, 3, 30000)
    assert (c.lr, c.momentum, c.weight_decay) == (0.01, 0.9, 1e-4)
    assert (c.diffusion_steps, c.schedule, c.sample_steps, c.rect_start) == (10, "cosine", 2, 1000)
    assert (c.consistency, c.guidance, c.bsem_channels[-1]) == (0.1, "dice", 256)
    assert cls.make_config("acdc").num_classes == 4
    assert set(cls.presets) == {"tiny", "quick", "acdc"}
    for name in ("tiny", "quick"):
        assert "num_classes" not in cls.presets[name]
    with pytest.raises(ValueError):
        DiffRect(DiffRect.make_config("tiny", guidance="dice-ish"))
    with pytest.raises(ValueError):
        DiffRect(DiffRect.make_config("tiny", patch_size=(48, 48)))


def test_train_step_logs_every_loss_and_rectifies_after_rect_start():
    method = _tiny(rect_start=1)
    labeled, unlabeled = _random_batch()
    first = method.train_step(labeled, unlabeled, 0)
    keys = {"loss", "loss_sup", "loss_semi", "loss_rect", "loss_lat_u", "loss_lat_l", "loss_dec_l", "loss_dec_u",
            "tau_l", "tau_u", "confident", "consistency_weight"}
    assert keys <= set(first)
    assert all(np.isfinite(v) for v in first.values())
    assert first["loss_rect"] == 0.0  # before rect_start
    assert first["loss_lat_l"] > 0 and first["loss_lat_u"] > 0
    assert 0 <= first["tau_l"] <= 1 and 0 <= first["tau_u"] <= 1
    before = {k: v.clone() for k, v in method.seg.state_dict().items()}
    second = method.train_step(labeled, unlabeled, 1)
    assert all(np.isfinite(v) for v in second.values())
    changed = [k for k, v in method.seg.state_dict().items() if v.dtype.is_floating_point
               and not torch.equal(v, before[k])]
    assert changed  # the optimizer stepped
    assert float(method.rect.tau_ema) >= 0  # the running guidance has been set


def test_rectified_pseudo_labels_supervise_the_segmentation_net():
    method = _tiny(rect_start=0, conf_thresh=0.0)
    labeled, unlabeled = _random_batch()
    out = method.train_step(labeled, unlabeled, 0)
    assert out["loss_rect"] > 0


@pytest.mark.parametrize("guidance", ["jaccard", "both", "fixed", "random", "none"])
def test_guidance_ablation_choices_train(guidance):
    method = _tiny(guidance=guidance, rect_start=0)
    labeled, unlabeled = _random_batch()
    out = method.train_step(labeled, unlabeled, 0)
    assert np.isfinite(out["loss"])
    if guidance == "fixed":
        assert out["tau_l"] == pytest.approx(0.5) and out["tau_u"] == pytest.approx(0.5)
    if guidance == "none":
        assert out["tau_l"] == 0.0


def test_latent_losses_are_zero_when_the_denoiser_returns_the_target(monkeypatch):
    import backend.methods.diffrect as module

    method = _tiny()
    monkeypatch.setattr(module, "q_sample", lambda ddpm, x0, t, noise=None: x0)  # z_t = z_0
    monkeypatch.setattr(method.rect.denoiser, "forward", lambda z_t, t, cond: z_t + 0 * cond.sum())
    labeled, unlabeled = _random_batch()
    out = method.train_step(labeled, unlabeled, 0)
    assert out["loss_lat_u"] == 0.0 and out["loss_lat_l"] == 0.0  # eq. 9 / 11 compare r with the right z


def test_pseudo_label_views_on_a_volume_of_any_size():
    method = _tiny()
    labeled, unlabeled = _random_batch()
    method.train_step(labeled, unlabeled, 0)
    volume = torch.randn(1, 3, 50, 70)
    views = method.pseudo_labels(volume)
    assert set(views) == {"weak", "strong", "rectified"}
    for label in views.values():
        assert label.shape == (3, 50, 70) and label.dtype == np.uint8 and label.max() < 3
    again = method.pseudo_labels(volume)
    for view in views:
        assert np.array_equal(views[view], again[view])  # seeded reverse process: reproducible review
    assert np.array_equal(method.predict(volume), views["rectified"])
    method.config.predict_view = "weak"
    assert np.array_equal(method.predict(volume), views["weak"])


def test_pad_to_multiple():
    x = torch.randn(2, 1, 50, 64)
    padded, (top, left) = pad_to_multiple(x, 64)
    assert padded.shape == (2, 1, 64, 64) and (top, left) == (7, 0)
    assert torch.equal(padded[..., top:top + 50, left:left + 64], x)


def test_state_dict_round_trip():
    method = _tiny(rect_start=0)
    labeled, unlabeled = _random_batch()
    for step in range(3):
        method.train_step(labeled, unlabeled, step)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    volume = torch.randn(1, 4, 64, 64)
    expected = method.pseudo_labels(volume)

    fresh = _tiny(rect_start=0, seed=0)
    torch.manual_seed(123)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert float(fresh.rect.tau_ema) == pytest.approx(float(method.rect.tau_ema))
    assert torch.equal(fresh.rect.coloring.palette, method.rect.coloring.palette)
    got = fresh.pseudo_labels(volume)
    for view in expected:
        assert np.array_equal(got[view], expected[view]), view
    # training goes on from the restored optimizer state
    assert np.isfinite(fresh.train_step(labeled, unlabeled, 3)["loss"])


def test_learns_real_brain_slices(brain_project):
    """Tiny DiffRect on 8 real 64 x 64 slices of the MNI152 T1 (GM / WM): 4 labeled, 4 unlabeled."""
    torch.manual_seed(0)
    image, label = real_patch(brain_project, "mni152_t1", (8, 64, 64))
    x = image[0, 0][:, None]
    y = label[0, 0][:, None]
    lab_idx, unl_idx = [1, 3, 5, 7], [0, 2, 4, 6]
    method = _tiny()
    g = torch.Generator().manual_seed(0)
    history = []
    for step in range(100):
        li = [lab_idx[i] for i in torch.randint(0, 4, (2,), generator=g)]
        ui = [unl_idx[i] for i in torch.randint(0, 4, (2,), generator=g)]
        history.append(method.train_step({"image": x[li], "label": y[li]}, {"image": x[ui]}, step))
    views = method.pseudo_labels(x[lab_idx][:, 0][None])
    ref = y[lab_idx][:, 0].numpy()
    dice = {view: _dice(pred, ref, (1, 2)) for view, pred in views.items()}
    assert dice["weak"] > 0.8, dice
    assert dice["rectified"] > 0.7, dice
    for key in ("loss_lat_l", "loss_lat_u", "loss_sup"):
        early = np.mean([h[key] for h in history[:10]])
        late = np.mean([h[key] for h in history[-20:]])
        assert late < 0.75 * early, (key, early, late)
    assert np.mean([h["tau_l"] for h in history[-20:]]) > np.mean([h["tau_l"] for h in history[:10]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_code_path_on_cpu(monkeypatch, dtype):
    """The AMP path (autocast casts, the fp16 grad scaler shared by both backward passes), run on CPU autocast."""
    monkeypatch.setattr(DiffRect, "amp_dtype", property(lambda self: dtype))
    monkeypatch.setattr(DiffRect, "autocast", lambda self: torch.autocast(device_type="cpu", dtype=dtype))
    method = _tiny(rect_start=0)
    labeled, unlabeled = _random_batch()
    for step in range(2):
        out = method.train_step(labeled, unlabeled, step)
        assert all(np.isfinite(v) for v in out.values())
    assert (method._scaler is not None) == (dtype == torch.float16)
    assert all(torch.isfinite(p).all() for p in method.seg.parameters())
    views = method.pseudo_labels(torch.randn(1, 2, 64, 64))
    assert all(v.shape == (2, 64, 64) for v in views.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: autocast (bf16 / fp16) training step")
def test_cuda_amp_train_step_and_review():
    torch.manual_seed(0)
    method = DiffRect(DiffRect.make_config("tiny", num_classes=3, rect_start=0), device="cuda")
    assert method.amp_dtype in (torch.bfloat16, torch.float16)
    labeled, unlabeled = _random_batch()
    labeled = {k: v.cuda() for k, v in labeled.items()}
    unlabeled = {k: v.cuda() for k, v in unlabeled.items()}
    for step in range(3):
        out = method.train_step(labeled, unlabeled, step)
        assert all(np.isfinite(v) for v in out.values())
    views = method.pseudo_labels(torch.randn(1, 3, 64, 64))
    assert all(v.shape == (3, 64, 64) for v in views.values())
