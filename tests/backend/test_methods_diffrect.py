"""DiffRect as a registered method: config and presets, training step, review views, checkpoint round trip,
learning on real slices (scored on a held-out slab), CUDA with AMP; and one test per semantic rule of the paper /
published code (which pseudo label supervises which network, the confidence rule, each loss term reaching the
gradients, each schedule value at a given step, each view depending on what it should), so that a one-line bug
in the method fails a fast test (``bench/mutants.py``)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from backend.methods import get_method, method_names
from backend.methods.diffrect.method import DiffRect, DiffRectConfig, confident_labels, pad_to_multiple
from backend.methods.diffrect.aug import strong_perturb
from backend.methods.diffrect.dropout import FastDropout
from backend.methods.diffrect.lcc import label_overlap
from helpers.realdata import real_patch


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


# ---- one test per semantic rule (bench/mutants.py checks that each catches its one-line bugs) -------------------


class _Recorder(torch.nn.Module):
    """Wraps a network and keeps a copy of every input and output."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x, *args):
        self.inputs.append(x.detach().clone())
        out = self.inner(x, *args)
        self.outputs.append(out.detach().clone())
        return out


class _ProbeSeg(torch.nn.Module):
    """A stand-in segmentation net with prescribed outputs: row i of a batch gets ``logits[i]`` (times a
    parameter, so that the losses have gradients); keeps its inputs."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.logits[: x.shape[0]] * self.scale


def _spy(monkeypatch, obj, name: str) -> list:
    """Record ``(args, kwargs, result)`` of every call of ``obj.name``."""
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def _maps(seed: int, n: int = 2, size: int = 64, classes: int = 3) -> torch.Tensor:
    return torch.randint(0, classes, (n, size, size), generator=torch.Generator().manual_seed(seed))


def _onehot_logits(maps: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Confident logits (margin 10) of label maps ``[B, H, W]``."""
    return 10.0 * torch.nn.functional.one_hot(maps, classes).permute(0, 3, 1, 2).float()


def test_confidence_rule_of_the_published_code():
    """(p - p_min) / p_max > thresh: the most probable passing class, background where none passes."""
    prob = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05], [0.0, 0.45, 0.55]]).T
    prob = prob[None, :, :, None]  # [1, 3, 4 pixels, 1]
    labels, confident = confident_labels(prob, 0.8, "official")
    assert labels[0, :, 0].tolist() == [2, 0, 1, 2]
    assert confident[0, :, 0].tolist() == [True, False, True, True]
    labels, confident = confident_labels(prob, 0.8, "fixmatch")  # arg-max; confident where max p >= 0.8
    assert labels[0, :, 0].tolist() == [2, 2, 1, 2]
    assert confident[0, :, 0].tolist() == [False, False, True, False]
    with pytest.raises(ValueError):
        confident_labels(prob, 0.8, "never")


def test_pseudo_labels_supervise_the_right_networks(monkeypatch):
    """Eq. 5-14 with a stand-in segmentation net of known outputs: which label map conditions and which is the
    target of each transport, on which view's image; which pseudo label each loss compares with; the
    calibration guidance of each sample; unconfident pixels become background and stay in the losses."""
    method = _tiny(rect_start=0, weak_flip_p=0.0, weak_rotate_p=0.0, strong_enhance_p=1.0, strong_blur_p=1.0)
    labeled, unlabeled = _random_batch()
    y_l = labeled["label"][:, 0]
    weak_l, weak_u, rect_map = _maps(1), _maps(2), _maps(4)
    strong_u = weak_u.clone()
    strong_u[:, 32:48] = (strong_u[:, 32:48] + 1) % 3
    logits = _onehot_logits(torch.cat([weak_l, weak_u, strong_u]))
    logits[2:4, :, :16] = torch.tensor([0.0, 0.0, 0.5])[:, None, None]  # unconfident weak pixels
    target_u = weak_u.clone()
    target_u[:, :16] = 0  # ... become background
    rect_logits = _onehot_logits(rect_map)
    rect_logits[:, :, 40:] = torch.tensor([0.0, 0.5, 0.0])[:, None, None]
    target_r = rect_map.clone()
    target_r[:, 40:] = 0
    probe = _ProbeSeg(logits)
    method.seg = probe
    decoder = _Recorder(method.rect.decoder)
    monkeypatch.setattr(method.rect, "decoder", decoder)
    encodes = _spy(monkeypatch, method.rect, "encode")
    rectified = []

    def fake_rectify(z, skips, emb, *args, **kwargs):
        rectified.append(z)
        return rect_logits.clone()

    monkeypatch.setattr(method.rect, "rectify", fake_rectify)
    out = method.train_step(labeled, unlabeled, 150)

    assert len(encodes) == 2 and len(rectified) == 1
    (t_labels, t_images, _, t_emb), _, (z_all, _) = encodes[0]
    (c_labels, c_images, _, c_emb), _, _ = encodes[1]
    assert torch.equal(t_labels, torch.cat([target_u, y_l, target_u]))  # targets: y_w (S2W), y_l (W2G); rect: y_w
    assert torch.equal(c_labels, torch.cat([strong_u, weak_l]))  # conditions: y_s (S2W), y_w (W2G)
    assert torch.equal(rectified[0], z_all[4:])  # rectification conditioned on z_w
    xw_l, xw_u, xs_u = probe.inputs[0].split(2)
    assert torch.allclose(xw_l, labeled["image"], atol=1e-4) and torch.allclose(xw_u, unlabeled["image"], atol=1e-4)
    assert not torch.allclose(xs_u, xw_u, atol=1e-2)  # the strong view is perturbed
    assert torch.equal(t_images, torch.cat([xs_u, xw_l, xw_u])) and torch.equal(c_images, torch.cat([xs_u, xw_l]))
    tau_u = label_overlap(strong_u, target_u, 3)[0]
    tau_l = label_overlap(weak_l, y_l, 3)[0]
    assert float(tau_u.mean()) > float(tau_l.mean()) + 0.2
    assert out["tau_u"] == pytest.approx(float(tau_u.mean()), rel=1e-5)
    assert out["tau_l"] == pytest.approx(float(tau_l.mean()), rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(c_emb, method.rect.embed_tau(torch.cat([tau_u, tau_l])), atol=1e-3)
        assert torch.allclose(t_emb, method.rect.embed_tau(torch.cat([tau_u, tau_l, tau_l.mean().expand(2)])),
                              atol=1e-3)
    lw_l, lw_u, ls_u = logits.split(2)
    dec = decoder.outputs[0]
    expected = {"loss_sup": method.ce_dice(lw_l, y_l), "loss_semi": method.ce_dice(ls_u, target_u),
                "loss_rect": method.ce_dice(lw_u, target_r), "loss_dec_l": method.ce_dice(dec[2:], y_l),
                "loss_dec_u": method.ce_dice(dec[:2], target_u)}
    for key, value in expected.items():
        assert out[key] == pytest.approx(float(value), rel=1e-5), key
    assert out["confident"] == pytest.approx(0.75)
    w = out["consistency_weight"]
    assert w == pytest.approx(0.1)
    total = (out["loss_sup"] + w * out["loss_semi"] + out["loss_rect"] + w * out["loss_lat_u"] + out["loss_lat_l"]
             + out["loss_dec_l"] + w * out["loss_dec_u"])
    assert out["loss"] == pytest.approx(total, rel=1e-5)  # eq. 13 (+ the decoder's supervision)


def test_every_loss_term_reaches_the_gradients(monkeypatch):
    """Switching one term's weight off changes the gradients of the network it trains."""
    labeled, unlabeled = _random_batch()

    def grads(**overrides) -> dict[str, torch.Tensor]:
        method = _tiny(rect_start=0, **overrides)
        monkeypatch.setattr(method.optimizer, "step", lambda *args, **kwargs: None)
        torch.manual_seed(1)
        method.train_step(labeled, unlabeled, 150)
        return {f"{name}.{key}": p.grad.clone() for name, net in method.modules().items()
                for key, p in net.named_parameters() if p.grad is not None}

    ref = grads()
    assert ref == ref and grads().keys() == ref.keys()

    def changed(other: dict[str, torch.Tensor], net: str) -> bool:
        return any(not torch.equal(g, other.get(k, torch.zeros_like(g))) for k, g in ref.items()
                   if k.startswith(net + "."))

    assert not changed(grads(), "seg") and not changed(grads(), "rect")  # deterministic under the seed
    assert changed(grads(lambda_rect=0.0), "seg")  # L_Rect (eq. 14) trains the segmentation net
    assert changed(grads(consistency=0.0), "seg")  # L_Semi^Seg
    assert changed(grads(lambda_lat_u=0.0), "rect")  # L_Lat-U (eq. 9)
    assert changed(grads(lambda_lat_l=0.0), "rect")  # L_Lat-L (eq. 11)
    assert changed(grads(lambda_decoder=0.0), "rect")  # the decoder's supervision


def test_schedules_at_given_steps(monkeypatch):
    method = _tiny()  # consistency 0.1 with a sigmoid ramp-up over 100 steps, rectification from step 10
    assert method.consistency_weight(0) == pytest.approx(0.1 * np.exp(-5.0))
    assert method.consistency_weight(50) == pytest.approx(0.1 * np.exp(-5.0 * 0.5 ** 2))
    assert method.consistency_weight(100) == pytest.approx(0.1)
    assert method.consistency_weight(180) == pytest.approx(0.1)
    # train --steps: a shortened paper run rescales the ramp-up and the rectification start
    c = DiffRect.make_config("acdc").with_steps(3000)
    assert (c.max_steps, c.consistency_rampup, c.rect_start) == (3000, 3000.0, 100)
    # rectification (and L_Rect) from step rect_start on
    method = _tiny(rect_start=2)
    calls = _spy(monkeypatch, method.rect, "rectify")
    labeled, unlabeled = _random_batch()
    before = method.train_step(labeled, unlabeled, 1)
    assert not calls and before["loss_rect"] == 0.0
    assert before["consistency_weight"] == pytest.approx(method.consistency_weight(1))
    after = method.train_step(labeled, unlabeled, 2)
    assert len(calls) == 1 and after["loss_rect"] > 0
    assert calls[0][1]["clamp"] == 1.0  # x0 predictions clamped to [-1, 1] while sampling (published)


def test_weak_view_warps_images_and_labels_alike(monkeypatch):
    method = _tiny(weak_flip_p=1.0, weak_rotate_p=0.0)  # both flips: a half turn
    labels = _maps(7)[:, None]
    labeled = {"image": labels.float(), "label": labels}  # image = label: alignment is visible
    unlabeled = {"image": torch.randn(2, 1, 64, 64)}
    seg = _Recorder(method.seg)
    method.seg = seg
    encodes = _spy(monkeypatch, method.rect, "encode")
    method.train_step(labeled, unlabeled, 0)
    turned = labels.flip(-1).flip(-2)
    assert torch.allclose(seg.inputs[0][:2], turned.float(), atol=1e-4)  # the segmentation net sees the weak view
    assert torch.allclose(seg.inputs[0][2:4], unlabeled["image"].flip(-1).flip(-2), atol=1e-4)
    assert torch.equal(encodes[0][0][0][2:4], turned[:, 0])  # ... and is supervised with its warped label


def test_predict_is_the_segmentation_net_and_each_view_depends_on_its_input(monkeypatch):
    method = _tiny(rect_start=0)
    labeled, unlabeled = _random_batch()
    method.train_step(labeled, unlabeled, 0)
    volume = torch.randn(1, 4, 64, 64)
    seg, rect = method._inference_nets()
    seg = _Recorder(seg)
    monkeypatch.setattr(method, "_inference_nets", lambda: (seg, rect))
    encodes = _spy(monkeypatch, rect, "encode")
    views = method.pseudo_labels(volume)
    x = volume.permute(1, 0, 2, 3)
    c = method.config
    assert torch.equal(seg.inputs[0][:4], x)  # weak: the unperturbed slices
    strong = strong_perturb(x, enhance_max=c.strong_enhance_max, blur_sigma_max=c.strong_blur_sigma_max,
                            deterministic=True)
    assert torch.allclose(seg.inputs[0][4:], strong, atol=1e-6)  # strong: the strongest training perturbation
    assert np.array_equal(encodes[0][0][0].numpy(), views["weak"])  # rectified: conditioned on the weak view

    def no_rectifier(*args, **kwargs):
        raise AssertionError("predict() runs the segmentation net only")

    monkeypatch.setattr(rect, "rectify", no_rectifier)
    monkeypatch.setattr(rect, "encode", no_rectifier)
    seg.inputs.clear()
    assert np.array_equal(method.predict(volume), views["weak"])
    assert len(seg.inputs) == 1 and torch.equal(seg.inputs[0], x)


def test_segmentation_unet_dropout_as_ssl4mis():
    method = _tiny(seg_dropout=(0.05, 0.1, 0.2, 0.3, 0.5))
    rates = {name: m.p for name, m in method.seg.named_modules() if isinstance(m, (FastDropout, torch.nn.Dropout))}
    assert rates == {"conv_0.conv_0.adn.D": 0.05, "down_1.convs.conv_0.adn.D": 0.1, "down_2.convs.conv_0.adn.D": 0.2,
                     "down_3.convs.conv_0.adn.D": 0.3, "down_4.convs.conv_0.adn.D": 0.5}  # encoder only
    assert not any(isinstance(m, (FastDropout, torch.nn.Dropout)) for m in _tiny().seg.modules())  # tiny: none


# ---- the method as a whole -------------------------------------------------------------------------------------


def test_registered_with_paper_defaults_and_presets():
    assert "diffrect" in method_names()
    cls = get_method("diffrect")
    assert cls is DiffRect and cls.dims == 2
    assert cls.views == ("weak", "strong", "rectified") and cls.primary_view == "weak"
    c = cls.make_config()
    assert isinstance(c, DiffRectConfig)
    assert (c.patch_size, c.batch_labeled, c.batch_unlabeled, c.max_steps) == ((256, 256), 3, 3, 30000)
    assert (c.lr, c.momentum, c.weight_decay) == (0.01, 0.9, 1e-4)
    assert (c.diffusion_steps, c.schedule, c.sample_steps, c.rect_start) == (10, "cosine", 2, 1000)
    assert (c.consistency, c.guidance, c.bsem_channels[-1]) == (0.1, "dice", 256)
    assert (c.conf_thresh, c.conf_rule, c.latent_clamp, c.predict_view) == (0.8, "official", 1.0, "weak")
    assert c.seg_dropout == (0.05, 0.1, 0.2, 0.3, 0.5)
    assert cls.make_config("acdc").num_classes == 4
    assert set(cls.presets) == {"tiny", "quick", "acdc"}
    for name in ("tiny", "quick"):
        assert "num_classes" not in cls.presets[name]
    with pytest.raises(ValueError):
        DiffRect(DiffRect.make_config("tiny", guidance="dice-ish"))
    with pytest.raises(ValueError):
        DiffRect(DiffRect.make_config("tiny", patch_size=(48, 48)))
    with pytest.raises(ValueError):
        DiffRect(DiffRect.make_config("tiny", conf_rule="sometimes"))


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
    import backend.methods.diffrect.method as module

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
    assert np.array_equal(method.predict(volume), views["weak"])  # the segmentation net, as the paper infers
    method.config.predict_view = "rectified"
    assert np.array_equal(method.predict(volume), views["rectified"])


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


@pytest.mark.slow
def test_learns_real_brain_slices_scored_on_a_held_out_slab(brain_project):
    """Tiny DiffRect on 12 real 64 x 64 slices of the MNI152 T1 (GM / WM): 6 labeled, 6 unlabeled, 150 steps;
    scored on a slab of 8 slices 4 slices (8 mm) away from every trained slice."""
    torch.manual_seed(0)
    image, label = real_patch(brain_project, "mni152_t1", (24, 64, 64))
    x = image[0, 0][:, None]
    y = label[0, 0][:, None]
    lab_idx, unl_idx, test_idx = [0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11], list(range(16, 24))
    method = _tiny()
    volume = x[test_idx][:, 0][None]
    ref = y[test_idx][:, 0].numpy()
    untrained = _dice(method.predict(volume), ref, (1, 2))
    g = torch.Generator().manual_seed(0)
    history = []
    for step in range(150):
        li = [lab_idx[i] for i in torch.randint(0, 6, (2,), generator=g)]
        ui = [unl_idx[i] for i in torch.randint(0, 6, (2,), generator=g)]
        history.append(method.train_step({"image": x[li], "label": y[li]}, {"image": x[ui]}, step))
    views = method.pseudo_labels(volume)
    dice = {view: _dice(pred, ref, (1, 2)) for view, pred in views.items()}
    assert dice["weak"] > 0.8 and dice["weak"] > untrained + 0.3, (dice, untrained)
    assert dice["rectified"] > 0.75, dice
    assert np.array_equal(method.predict(volume), views["weak"])
    for key in ("loss_lat_l", "loss_lat_u", "loss_sup"):
        early = np.mean([h[key] for h in history[:10]])
        late = np.mean([h[key] for h in history[-20:]])
        assert late < 0.75 * early, (key, early, late)
    assert np.mean([h["tau_l"] for h in history[-20:]]) > np.mean([h["tau_l"] for h in history[:10]])

    # The finding of the README: at this budget the rectified view does not depend on the sampled latent; the
    # decoder segments from the conditioning label's B_sem skips (image features + weak label).  Should this
    # fail, the rectified view has come to depend on the latent: update the README and this check.
    method.eval()
    seg, rect = method._inference_nets()
    with torch.no_grad():
        xs = x[test_idx]
        weak = seg(xs).argmax(1)
        emb = rect.embed_tau(rect.inference_tau(len(xs), xs.device))
        z_w, skips = rect.encode(weak, xs, rect.image_encoder(xs), emb)
        sampled = rect.rectify(z_w, skips, emb, method.alphas_cumprod, method.timesteps,
                               generator=torch.Generator().manual_seed(0)).argmax(1)
        zero_latent = rect.decoder(torch.zeros_like(z_w), skips, emb).argmax(1)
        background = torch.zeros_like(weak)
        _, background_skips = rect.encode(background, xs, rect.image_encoder(xs), emb)
        background_skips_out = rect.decoder(z_w, background_skips, emb).argmax(1)
    assert float((zero_latent == sampled).float().mean()) > 0.99
    assert float((background_skips_out == weak).float().mean()) > 0.9  # the image features in the skips suffice


@pytest.mark.slow  # CPU autocast is slow (about 10 s per dtype on a loaded 2-core machine); no semantic rule here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_code_path_on_cpu(monkeypatch, dtype):
    """The AMP path (autocast casts, the fp16 grad scaler shared by both backward passes), run on CPU autocast."""
    labeled, unlabeled = _random_batch()
    torch.manual_seed(1)
    full = _tiny(rect_start=0).train_step(labeled, unlabeled, 0)  # the same step in float32, same random draws
    monkeypatch.setattr(DiffRect, "amp_dtype", property(lambda self: dtype))
    monkeypatch.setattr(DiffRect, "autocast", lambda self: torch.autocast(device_type="cpu", dtype=dtype))
    method = _tiny(rect_start=0)
    torch.manual_seed(1)
    for step in range(2):
        out = method.train_step(labeled, unlabeled, step)
        assert all(np.isfinite(v) for v in out.values())
        if step == 0:  # the segmentation terms and the guidance as in float32, to the half type's precision
            for name in ("loss_sup", "loss_semi", "loss_rect", "loss_dec_l", "loss_dec_u", "tau_l", "tau_u",
                         "confident", "consistency_weight"):  # (the latent MSEs of a fresh net: 15 % off in bf16)
                assert out[name] == pytest.approx(full[name], rel=0.05, abs=0.02), name
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
