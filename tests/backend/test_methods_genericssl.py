"""A&D / GenericSSL (backend.methods.genericssl.method): its parts (SVDA, Diff-VNet, DRS, RS, EMA transfer) and the method
contract on the tiny preset."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.methods import get_method
from backend.methods.genericssl.method import GenericSSL, GenericSSLConfig
from backend.methods.genericssl.diffvnet import DiffVNet, OneDNNConv3d, ema_transfer
from backend.methods.genericssl.losses import DifficultyWeights, dice_ce, hard_dice
from backend.methods.genericssl.rs import gaussian_smooth, rs_pseudo_label, rs_terms
from backend.methods.genericssl.svda import OPS, SVDAParams, draw_ops, svda


def _tiny(**overrides) -> GenericSSL:
    cls = get_method("genericssl")
    return cls(cls.make_config("tiny", **overrides))


def _blob_label(shape=(2, 1, 32, 32, 32), classes=2) -> torch.Tensor:
    """Off-centre ellipsoid (class 1) with a box (class 2) inside it: not symmetric under the augmentations."""
    d, h, w = shape[2:]
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((zz - 14) / 9.0) ** 2 + ((yy - 12) / 7.0) ** 2 + ((xx - 18) / 10.0) ** 2 <= 1
    lab = inside.long()
    if classes > 2:
        lab[(zz >= 12) & (zz < 17) & (yy >= 10) & (yy < 14) & (xx >= 12) & (xx < 24)] = 2
    return lab[None, None].repeat(shape[0], 1, 1, 1, 1)


# ---- registry and configuration ------------------------------------------------------------------------------

def test_registered_with_paper_defaults_and_presets():
    cls = get_method("genericssl")
    assert cls is GenericSSL and cls.name == "genericssl" and cls.dims == 3
    assert cls.views == ("diffusion", "difficulty", "combined") and cls.primary_view == "combined"
    c = cls.make_config()
    assert isinstance(c, GenericSSLConfig)
    # the paper's / published defaults (loss scale: the published CE + Dice)
    assert (c.features, c.n_aug, c.drs_tau, c.drs_alpha, c.mu, c.ema_w) == (32, 3, 50, 0.2, 10.0, 0.99)
    assert (c.diffusion_steps, c.ddim_steps, c.beta_schedule) == (1000, 10, "linear_beta")
    assert (c.momentum, c.nesterov, c.weight_decay, c.lambda_ce, c.lambda_dice) == (0.9, True, 3e-5, 1.0, 1.0)
    assert (c.drs_absent_dice, c.review_mode) == (0.5, "train")
    # Table 8, in (D, H, W) order (Synapse: batch 2 of the published config.py)
    expect = {"la": ((80, 112, 112), 1e-2, 4), "synapse": ((64, 128, 128), 3e-2, 2),
              "mmwhs": ((128, 128, 128), 5e-3, 2), "mms": ((32, 128, 128), 1e-2, 4)}
    # the published runs: 301 epochs of len(split) // batch iterations, mu ramped over 300 epochs (M&Ms: 100),
    # validation every epoch (the engine keeps the best checkpoint)
    lengths = {"la": (301 * 19, 300 * 19, 19), "synapse": (301 * 8, 300 * 8, 8), "mmwhs": (301 * 8, 300 * 8, 8),
               "mms": (301 * 110, 100 * 110, 110)}
    windows = {"la": None, "synapse": (-75.0, 275.0), "mmwhs": None, "mms": None}
    for preset, (patch, lr, batch) in expect.items():
        p = cls.make_config(preset)
        assert (p.patch_size, p.lr, p.batch_labeled, p.batch_unlabeled, p.features) == (patch, lr, batch, batch, 32)
        assert all(s % 16 == 0 for s in p.patch_size)
        assert (p.max_steps, p.rampup_steps, p.val_every) == lengths[preset], preset
        assert p.hold_out_from is None and p.target_spacing is None
        assert p.intensity_window == windows[preset], preset
    assert (c.max_steps, c.rampup_steps, c.val_every) == lengths["la"]  # the defaults are LASeg's
    # LASeg infers with the published strides (test.py: 16 in-plane, 4 along z) as MONAI computes them
    from monai.inferers.utils import _get_scan_interval
    la = cls.make_config("la")
    assert tuple(_get_scan_interval((200, 200, 200), la.patch_size, 3, la.sw_overlap)) == (4, 16, 16)
    for preset in ("quick", "tiny"):
        assert all(s % 16 == 0 for s in cls.make_config(preset).patch_size)
    # JSON round trip of the config (lists come back as tuples)
    import json
    again = GenericSSLConfig.from_dict(json.loads(cls.make_config("tiny", num_classes=3).to_json()))
    assert again == cls.make_config("tiny", num_classes=3)


def test_parameter_count_of_the_la_configuration_is_near_the_papers():
    net = DiffVNet(1, 2, 32)
    total = sum(p.numel() for p in net.parameters())
    # paper (Table 9): 57.894 M in all, 40.1 M at inference (published code); ours places one time-embedding
    # projection per stage instead of after most convolutions: 55.41 M / 37.78 M
    assert abs(total - 57.894e6) / 57.894e6 < 0.06, total
    assert abs(net.inference_parameters() - 40.1e6) / 40.1e6 < 0.08, net.inference_parameters()


# ---- Diff-VNet ---------------------------------------------------------------------------------------------

def test_split_diffusion_stem_equals_one_convolution_over_the_concatenation(one_torch_thread):
    torch.manual_seed(0)
    net = DiffVNet(1, 3, 4, time_embed_dim=16, emb_dim=32, encoder_dropout=0, decoder_dropout=0).eval()
    stem = net.diffusion_stem
    x, y_t = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 3, 16, 16, 16)
    weight = torch.cat([stem.image_conv.weight, stem.label_conv.weight], dim=1)
    joint = F.conv3d(torch.cat([x, y_t], 1), weight, stem.image_conv.bias, padding=1)
    split = stem.label_conv(y_t) + stem.image_term(x)
    torch.testing.assert_close(split, joint, rtol=1e-5, atol=1e-5)
    # and the DDIM path (context computed once) gives the plain denoising output
    t = torch.tensor([999, 3])
    torch.testing.assert_close(net.denoise_from_context(net.diffusion_context(x), y_t, t), net.denoise(x, y_t, t))


def test_onednn_convolution_matches_the_plain_one():
    conv = torch.nn.Conv3d(2, 8, 3, padding=1)
    fast = copy.deepcopy(conv)
    fast.__class__ = OneDNNConv3d
    x = torch.randn(1, 2, 12, 10, 8, requires_grad=True)
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast(x).square().sum(), [x, fast.weight])
    g_ref = torch.autograd.grad(conv(x).square().sum(), [x, conv.weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ema_transfer_moves_theta_toward_the_mean_of_xi_and_psi_at_the_stated_rate():
    torch.manual_seed(0)
    net = DiffVNet(1, 2, 4, time_embed_dim=16, emb_dim=32)
    theta, xi, psi = net.decoder_theta, net.decoder_xi, net.decoder_psi
    before = {n: p.detach().clone() for n, p in theta.named_parameters()}
    buffers = {n: b.clone() for n, b in theta.named_buffers()}
    xi_p, psi_p = dict(xi.named_parameters()), dict(psi.named_parameters())
    n = ema_transfer(theta, xi, psi, 0.99)
    assert n == len(before)  # every theta parameter has a counterpart (xi's time projections are extra)
    assert any(".emb." in name for name in xi_p) and not any(".emb." in name for name in before)
    for name, p in theta.named_parameters():
        target = (xi_p[name] + psi_p[name]) / 2
        torch.testing.assert_close(p, 0.99 * before[name] + 0.01 * target)
        # the distance to (xi + psi) / 2 shrinks by exactly w_ema
        d0, d1 = (before[name] - target).norm().item(), (p - target).detach().norm().item()
        assert math.isclose(d1, 0.99 * d0, rel_tol=1e-4, abs_tol=1e-7)
    for name, b in theta.named_buffers():  # running statistics stay theta's own
        assert torch.equal(b, buffers[name])


# ---- SVDA --------------------------------------------------------------------------------------------------

def test_svda_geometric_operations_keep_image_and_label_aligned():
    torch.manual_seed(0)
    label = _blob_label((4, 1, 32, 32, 32))
    image = label.float()  # an image equal to its label
    b = label.shape[0]
    ops = {name: torch.zeros(b, dtype=torch.bool) for name in OPS}
    ops["rotation"][:] = True
    ops["scaling"][:] = True
    params = SVDAParams(rotation_deg=15.0, scale_range=(0.7, 0.8))
    img_a, lab_a = svda(image, label, params, ops)
    assert img_a.shape == image.shape and lab_a.shape == label.shape and lab_a.dtype == label.dtype
    fg_img, fg_lab, fg_orig = img_a > 0.5, lab_a == 1, label == 1
    inter = (fg_img & fg_lab).sum().item()
    dice_aligned = 2 * inter / (fg_img.sum() + fg_lab.sum()).item()
    dice_moved = 2 * (fg_lab & fg_orig).sum().item() / (fg_lab.sum() + fg_orig.sum()).item()
    assert dice_aligned > 0.97, dice_aligned  # image and label went through the same transform
    assert dice_moved < 0.9, dice_moved  # ... and the transform did move the object


def test_svda_intensity_operations_leave_the_label_alone_and_change_the_image():
    torch.manual_seed(1)
    label = _blob_label((3, 1, 32, 32, 32), classes=3)
    image = torch.randn(3, 1, 32, 32, 32) + label.float()
    ops = {name: torch.zeros(3, dtype=torch.bool) for name in OPS}
    for i, name in enumerate(("blur", "contrast", "gamma")):
        ops[name][i] = True
    img_a, lab_a = svda(image, label, SVDAParams(), ops)
    assert torch.equal(lab_a, label)
    for i in range(3):
        assert not torch.allclose(img_a[i], image[i])
    # gamma keeps the sample's mean and standard deviation (retain_stats)
    assert math.isclose(img_a[2].mean().item(), image[2].mean().item(), abs_tol=1e-3)
    assert math.isclose(img_a[2].std().item(), image[2].std().item(), rel_tol=1e-3)
    # contrast keeps the value range
    assert img_a[1].min() >= image[1].min() - 1e-5 and img_a[1].max() <= image[1].max() + 1e-5


def test_svda_draws_n_aug_operations_per_sample():
    torch.manual_seed(2)
    ops = draw_ops(256, SVDAParams(n_aug=3, p=1.0), torch.device("cpu"))
    counts = torch.stack([ops[name] for name in OPS], 1).sum(1)
    assert torch.all(counts == 3)
    ops = draw_ops(4000, SVDAParams(n_aug=3, p=0.7), torch.device("cpu"))
    mean = torch.stack([ops[name] for name in OPS], 1).sum(1).float().mean().item()
    assert abs(mean - 2.1) < 0.1  # 3 draws kept with p = 0.7
    label = _blob_label((4, 1, 32, 32, 32), classes=3)
    img_a, lab_a = svda(torch.randn(4, 1, 32, 32, 32), label)  # the full random set
    assert set(lab_a.unique().tolist()) <= {0, 1, 2} and torch.isfinite(img_a).all()


# ---- DRS ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ema", "window"])
def test_drs_weights_favour_a_class_whose_dice_lags_and_stalls(mode):
    gen = torch.Generator().manual_seed(0)
    drs = DifficultyWeights(3, tau=50, alpha=0.2, mode=mode)
    for e in range(200):
        noise = 0.02 * torch.randn(3, generator=gen)
        easy = 0.97  # background: high and flat
        learning = 0.2 + 0.7 * min(e / 150, 1.0)  # a class learned steadily
        stalled = 0.3  # a class whose Dice lags and only fluctuates
        w = drs.update(torch.tensor([easy, learning, stalled]) + noise * torch.tensor([0.1, 0.2, 1.0]))
    assert w.shape == (3,) and torch.isfinite(w).all() and (w >= 0).all()
    assert w[2] > w[1] and w[2] > w[0], w
    assert w[2] > 2 * w[1], w  # by a clear margin
    # checkpoint round trip
    other = DifficultyWeights(3, tau=50, alpha=0.2, mode=mode)
    other.load_state_dict(drs.state_dict())
    torch.testing.assert_close(other.update(torch.tensor([0.9, 0.8, 0.3])), drs.update(torch.tensor([0.9, 0.8, 0.3])))


def test_hard_dice_and_weighted_dice_ce():
    target = _blob_label((2, 1, 16, 16, 16), classes=3)[:, :, :16, :16, :16]
    logits = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 10
    torch.testing.assert_close(hard_dice(logits, target), torch.ones(3))
    wrong = logits.roll(1, dims=1)
    assert (hard_dice(wrong, target) < 0.5).all()
    # class weights scale the Dice terms and weight the cross entropy
    plain = dice_ce(wrong, target)
    zero_fg = dice_ce(wrong, target, torch.tensor([1.0, 0.0, 0.0]))
    assert zero_fg < plain and torch.isfinite(zero_fg)
    assert dice_ce(logits, target) < 0.1


def _soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch soft Dice per class ``[K]`` written out (the published SoftDiceLoss without smoothing)."""
    k = logits.shape[1]
    p = torch.softmax(logits, 1)
    y = F.one_hot(target[:, 0], k).movedim(-1, 1).float()
    dims = (0, *range(2, p.ndim))
    return 2 * (p * y).sum(dims) / (p.sum(dims) + y.sum(dims))


def test_dice_ce_is_the_published_sum_of_ce_and_foreground_dice_with_class_weights_on_both():
    torch.manual_seed(0)
    target = _blob_label((2, 1, 16, 16, 16), classes=3)
    logits = torch.randn(2, 3, 16, 16, 16)
    ce = F.cross_entropy(logits, target[:, 0])
    dice = _soft_dice(logits, target)
    torch.testing.assert_close(dice_ce(logits, target), ce + (1 - dice[1:]).mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dice_ce(logits, target, lambda_dice=0.5, lambda_ce=0.5),
                               (ce + (1 - dice[1:]).mean()) / 2, rtol=1e-4, atol=1e-4)  # the paper's eq. 2
    w = torch.tensor([0.5, 2.0, 0.25])
    ce_w = F.cross_entropy(logits, target[:, 0], weight=w)
    torch.testing.assert_close(dice_ce(logits, target, w), ce_w + (w[1:] * (1 - dice[1:])).mean(),
                               rtol=1e-4, atol=1e-4)


def test_hard_dice_of_a_class_absent_from_prediction_and_label_is_one_half_as_published():
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[..., :4] = 1  # classes 0 and 1 present, class 2 absent
    perfect = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 10
    torch.testing.assert_close(hard_dice(perfect, target), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(hard_dice(perfect, target, absent=0.25)[2], torch.tensor(0.25))
    wrong = perfect.clone()
    wrong[:, 2, :, :, :2] = 20  # class 2 predicted where it is absent: Dice 0 (clamped to eps)
    d = hard_dice(wrong, target)
    assert d[2] <= 1e-7 and 0 < d[1] < 1 and d[0] == 1


def test_drs_weights_follow_the_published_running_averages_exactly():
    k, tau = 3, 4
    drs = DifficultyWeights(k, tau=tau, alpha=0.2, mode="ema")
    m = (tau - 1) / tau
    last = torch.full((k,), 1e-8)
    learn, unlearn, reverse = torch.zeros(k), torch.zeros(k), torch.ones(k)
    for dice in ([0.9, 0.5, 0.2], [0.95, 0.4, 0.3], [0.93, 0.45, 0.1]):
        d = torch.tensor(dice)
        delta, ratio = d - last, torch.log(d / last)
        learn = m * learn + (1 - m) * torch.where(delta > 0, delta, 0) * ratio
        unlearn = m * unlearn + (1 - m) * torch.where(delta <= 0, delta, 0) * ratio
        reverse = m * reverse + (1 - m) * (1 - d)
        expected = ((unlearn + 1e-8) / (learn + 1e-8)) ** 0.2 * reverse * k
        last = d
        torch.testing.assert_close(drs.update(d), expected, rtol=1e-5, atol=1e-7)


# ---- RS ----------------------------------------------------------------------------------------------------

def test_rs_pseudo_label_is_a_valid_label_map_that_follows_agreement():
    torch.manual_seed(0)
    k, shape = 4, (2, 4, 12, 12, 12)
    x0 = torch.rand(shape) * 2 - 1
    psi = torch.randn(shape)
    y = rs_pseudo_label(x0, psi)
    assert y.shape == (2, 1, 12, 12, 12) and y.dtype == torch.int64
    assert y.min() >= 0 and y.max() < k
    # where both maps agree confidently on a class, the label is that class
    cls = torch.randint(0, k, (2, 12, 12, 12))
    onehot = F.one_hot(cls, k).movedim(-1, 1).float()
    y = rs_pseudo_label(onehot * 2 - 1, onehot * 20)
    assert torch.equal(y[:, 0], cls)
    # with an uninformative diffusion map, a confident D(psi) decides
    y = rs_pseudo_label(torch.zeros(shape), onehot * 20)
    assert torch.equal(y[:, 0], cls)
    # the two terms of eq. 7: a smoothed Gumbel-softmax of the DDIM map and the softmax of D(psi)
    torch.manual_seed(3)
    domain, klass = rs_terms(x0, psi)
    torch.manual_seed(3)
    torch.testing.assert_close(domain, gaussian_smooth(F.gumbel_softmax(x0, tau=1.0, hard=False, dim=1), 3, 1.0))
    assert not torch.allclose(domain, F.gumbel_softmax(x0, tau=1.0, hard=False, dim=1))
    torch.testing.assert_close(klass, torch.softmax(psi, 1))
    # the smoothing kernel is normalised (a constant map stays constant inside)
    smooth = gaussian_smooth(torch.ones(1, 1, 8, 8, 8))
    torch.testing.assert_close(smooth[..., 1:-1, 1:-1, 1:-1], torch.ones(1, 1, 6, 6, 6))


# ---- the semantic rules of one iteration (Algorithm 1), each checked where it happens ------------------------

def _batches(k: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    label = _blob_label((1, 1, 32, 32, 32), classes=k)
    return ({"image": label.float() + 0.3 * torch.randn(1, 1, 32, 32, 32), "label": label},
            {"image": torch.randn(1, 1, 32, 32, 32)})


def test_mu_follows_the_published_gaussian_ramp_up_at_given_steps(one_torch_thread):
    cls = get_method("genericssl")
    for preset in ("la", "synapse", "mmwhs", "mms"):
        m = cls.__new__(cls)  # mu_at needs only the config
        m.config = cls.make_config(preset)
        r = m.config.rampup_steps
        assert m.mu_at(0) == pytest.approx(10.0 * math.exp(-5.0))
        assert m.mu_at(r // 2) == pytest.approx(10.0 * math.exp(-5.0 * (1 - (r // 2) / r) ** 2))
        assert m.mu_at(r) == pytest.approx(10.0) and m.mu_at(m.config.max_steps) == pytest.approx(10.0)
    # M&Ms ramps over its first 100 of 300 epochs (train.sh -cr 100): at full weight by a third of the run
    m.config = cls.make_config("mms")
    assert m.mu_at(110 * 100) == pytest.approx(10.0)
    assert m.mu_at(110 * 50) == pytest.approx(10.0 * math.exp(-1.25))
    # --steps shortens the whole schedule: the ramp keeps its place relative to the run's end
    short = cls.make_config("mms").with_steps(331)
    assert (short.max_steps, short.rampup_steps) == (331, 110)
    assert "rampup_steps" in cls.config_class.run_length_fields
    m.config = short
    assert m.mu_at(110) == pytest.approx(10.0) and m.mu_at(55) == pytest.approx(10.0 * math.exp(-1.25))
    # a run saved when None meant "the whole run" still loads and ramps over its whole length
    import json
    saved = json.loads(cls.make_config("tiny").to_json()) | {"rampup_steps": None, "max_steps": 80}
    old = cls(cls.config_class.from_dict(saved))
    assert old.config.rampup_steps == 80 and old.mu_at(80) == pytest.approx(10.0)


def test_one_iteration_wires_each_pseudo_label_and_loss_to_its_network(one_torch_thread, monkeypatch):
    """Which augmented batch each flow sees, the noisy label of eq. 1, DRS from D(xi)'s Dice (eq. 3-5) weighting
    L_diff (eq. 6), the RS pseudo label from D(xi)'s DDIM map and D(psi) (eq. 7) supervising D(theta) (eq. 8),
    and mu(t) L_u (eq. 9)."""
    m = _tiny(num_classes=3, encoder_dropout=0.0, decoder_dropout=0.0, aug_prob=1.0)
    labeled, unlabeled = _batches()
    calls: dict[str, list] = {"augment": [], "loss": [], "denoise": [], "ddim": [], "pseudo": [], "drs": [],
                              "last": []}
    orig_augment, orig_loss, orig_denoise = m._augment, m._loss, m.net.denoise
    orig_ddim, orig_pseudo, orig_drs, orig_bs = m.ddim_x0, m.pseudo_label, m.drs.update, m.backward_and_step

    def augment(image, label=None):
        out = orig_augment(image, label)
        calls["augment"].append((image, label, *out))
        return out

    def loss(logits, target, weights=None):
        calls["loss"].append((logits.detach(), target, weights))
        return orig_loss(logits, target, weights)

    def denoise(x, y_t, t):
        calls["denoise"].append((x, y_t, t))
        return orig_denoise(x, y_t, t)

    def ddim(x):
        out = orig_ddim(x)
        calls["ddim"].append((x, out))
        return out

    def pseudo(x0, logits_psi):
        with torch.no_grad():
            reference = m.net.psi(calls["ddim"][-1][0])  # D(psi) on the same unlabeled batch, now
        calls["pseudo"].append((x0, logits_psi, reference))
        out = orig_pseudo(x0, logits_psi)
        calls["pseudo"][-1] += (out,)
        return out

    def drs(dice):
        calls["drs"].append(dice)
        out = orig_drs(dice)
        calls["drs"][-1] = (dice, out.clone())
        return out

    def backward_and_step(total, optimizer):
        calls["last"].append(total.detach())
        return orig_bs(total, optimizer)

    monkeypatch.setattr(m, "_augment", augment)
    monkeypatch.setattr(m, "_loss", loss)
    monkeypatch.setattr(m.net, "denoise", denoise)
    monkeypatch.setattr(m, "ddim_x0", ddim)
    monkeypatch.setattr(m, "pseudo_label", pseudo)
    monkeypatch.setattr(m.drs, "update", drs)
    monkeypatch.setattr(m, "backward_and_step", backward_and_step)
    out = m.train_step(labeled, unlabeled, 7)

    # SVDA on both batches, the label moving with the labeled image
    (img_l, lab_l, x_l, y_l), (img_u, lab_u, x_u, _) = calls["augment"]
    assert img_l is labeled["image"] and torch.equal(lab_l, labeled["label"]) and img_u is unlabeled["image"]
    assert lab_u is None and y_l is not None and not torch.equal(x_u, unlabeled["image"])
    # eq. 1: y_t = sqrt(abar_t) y0 + sqrt(1 - abar_t) eps with y0 the signed one-hot label; D(xi) sees x^l
    (x_den, y_t, t), = calls["denoise"]
    assert x_den is x_l
    abar = torch.as_tensor(m.ddpm.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1, 1)
    y0 = F.one_hot(y_l[:, 0], 3).movedim(-1, 1).float() * 2 - 1
    eps = (y_t - abar.sqrt() * y0) / (1 - abar).sqrt()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05, (eps.mean(), eps.std())
    # the three losses: L_deno on D(xi) vs y, L_diff on D(psi) vs y with the DRS weights, L_u on D(theta) vs RS
    (l_xi, t_xi, w_xi), (l_psi, t_psi, w_psi), (l_theta, t_theta, w_theta) = calls["loss"]
    assert t_xi is y_l and t_psi is y_l and w_xi is None and w_theta is None
    (dice, weights), = calls["drs"]
    torch.testing.assert_close(dice, hard_dice(l_xi, y_l, absent=0.5))  # DRS measures D(xi) (eq. 3)
    assert w_psi is not None and torch.equal(w_psi, weights)
    (ddim_in, x0), = calls["ddim"]
    assert ddim_in is x_u  # the domain-unbiased map of the unlabeled batch
    x0_used, logits_used, psi_reference, label_u = calls["pseudo"][0]
    assert x0_used is x0
    torch.testing.assert_close(logits_used, psi_reference, rtol=1e-4, atol=1e-4)  # the class-unbiased map: D(psi)
    assert t_theta is label_u
    with torch.no_grad():
        assert not torch.allclose(l_theta, psi_reference)  # ... and D(theta), not D(psi), is trained on it
    # eq. 9: the last backward is mu(t) L_u (split backward), with mu(t) of the ramp-up at this step
    assert out["mu"] == pytest.approx(m.mu_at(7))
    (total,), = [calls["last"]]
    assert total.item() == pytest.approx(out["mu"] * out["loss_u"], rel=1e-5)


def test_each_loss_reaches_exactly_its_networks(one_torch_thread, monkeypatch):
    """L_deno trains the diffusion stem, encoder and D(xi); L_diff the image stem, encoder and D(psi); mu L_u the
    image stem, encoder and D(theta) (D(psi) only makes its pseudo label, without gradient)."""
    m = _tiny(num_classes=3, encoder_dropout=0.0, decoder_dropout=0.0, svda=False)
    labeled, unlabeled = _batches()
    snaps: list[dict[str, torch.Tensor | None]] = []

    def snapshot() -> None:
        snaps.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in m.net.named_parameters()})

    orig_partial = m._partial_backward

    def partial(loss):
        orig_partial(loss)
        snapshot()

    monkeypatch.setattr(m, "_partial_backward", partial)
    monkeypatch.setattr(m.optimizer, "step", lambda *a, **k: snapshot())
    m.train_step(labeled, unlabeled, 50)
    after_deno, after_diff, after_u = snaps

    def moved(before, after, prefix) -> bool:
        names = [n for n in after if n.startswith(prefix)]
        assert names, prefix
        return any(after[n] is not None and (before[n] is None or not torch.equal(before[n], after[n]))
                   for n in names)

    empty = {n: None for n in after_deno}
    assert moved(empty, after_deno, "decoder_xi.") and moved(empty, after_deno, "diffusion_stem.")
    assert moved(empty, after_deno, "encoder.")
    assert not moved(empty, after_deno, "decoder_psi.") and not moved(empty, after_deno, "decoder_theta.")
    assert moved(after_deno, after_diff, "decoder_psi.") and moved(after_deno, after_diff, "encoder.")
    assert not moved(after_deno, after_diff, "decoder_xi.") and not moved(after_deno, after_diff, "decoder_theta.")
    assert moved(after_diff, after_u, "decoder_theta.") and moved(after_diff, after_u, "encoder.")
    assert not moved(after_diff, after_u, "decoder_psi.") and not moved(after_diff, after_u, "decoder_xi.")


def test_train_step_transfers_xi_and_psi_into_theta_by_ema(one_torch_thread):
    m = _tiny(num_classes=3)
    for group in m.optimizer.param_groups:
        group["lr"] = 0.0  # no gradient update: only the EMA transfer moves D(theta)
    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    m.train_step(*_batches(), 0)
    for name, p in m.net.decoder_theta.named_parameters():
        target = (before[f"decoder_xi.{name}"] + before[f"decoder_psi.{name}"]) / 2
        torch.testing.assert_close(p.detach(), 0.99 * before[f"decoder_theta.{name}"] + 0.01 * target)
    for name, p in m.net.named_parameters():
        if not name.startswith("decoder_theta."):
            assert torch.equal(p, before[name]), name


def test_predict_is_d_theta_on_the_image_encoder(one_torch_thread):
    torch.manual_seed(0)
    m = _tiny(num_classes=3)
    m.train_step(*_batches(), 0)  # D(theta) differs from D(psi) after an update
    volume = torch.randn(1, 32, 32, 32)  # one sliding window
    m.net.eval()
    with torch.no_grad():
        theta = m.net.theta(volume[None]).argmax(1)[0].numpy()
        psi = m.net.psi(volume[None]).argmax(1)[0].numpy()
    m.net.train()
    pred = m.predict(volume)
    np.testing.assert_array_equal(pred, theta)
    assert (theta != psi).any()


def test_review_views_are_the_terms_of_eq7_made_as_during_training(one_torch_thread, monkeypatch):
    """``diffusion`` follows the DDIM map, ``difficulty`` D(psi), ``combined`` their RS sum; both networks run as
    when they make training targets (train mode, batch statistics), leaving the running statistics alone."""
    torch.manual_seed(0)
    m = _tiny(num_classes=3)
    zz = torch.arange(32).view(32, 1, 1).expand(32, 32, 32)
    xx = torch.arange(32).view(1, 1, 32).expand(32, 32, 32)
    p1 = torch.where(zz < 16, 1, 2)  # the DDIM map's classes, confident in the left half (x < 16), flat elsewhere
    p2 = torch.where(zz < 16, 2, 1)  # D(psi)'s classes, confident in the right half, flat elsewhere
    left, right = xx < 16, xx >= 16
    seen: dict[str, object] = {}

    def fake_ddim(batch):
        seen["ddim_training"] = m.net.training
        x0 = (F.one_hot(p1, 3).movedim(-1, 0).float() * 2 - 1) * 10 * left
        return x0[None].expand(batch.shape[0], -1, -1, -1, -1)

    real_psi = m.net.psi

    def fake_psi(batch):
        real_psi(batch)  # the real network runs in the review mode
        bn = next(x for x in m.net.modules() if isinstance(x, torch.nn.BatchNorm3d))
        seen["psi_training"], seen["track"] = m.net.training, bn.track_running_stats
        logits = F.one_hot(p2, 3).movedim(-1, 0).float() * 20 * right
        return logits[None].expand(batch.shape[0], -1, -1, -1, -1)

    monkeypatch.setattr(m, "ddim_x0", fake_ddim)
    monkeypatch.setattr(m.net, "psi", fake_psi)
    buffers = {n: b.clone() for n, b in m.net.named_buffers()}
    m.net.eval()
    views = {k: torch.from_numpy(v.astype(np.int64)) for k, v in m.pseudo_labels(torch.randn(1, 32, 32, 32)).items()}
    assert not m.net.training  # the caller's mode is restored
    assert seen == {"ddim_training": True, "psi_training": True, "track": False}
    for name, b in m.net.named_buffers():
        assert torch.equal(b, buffers[name]), name  # running statistics untouched
    inner_l, inner_r = xx < 14, xx >= 18  # away from the blur across the middle
    assert torch.equal(views["diffusion"][inner_l], p1[inner_l])
    assert torch.equal(views["combined"][inner_l], p1[inner_l])
    assert (views["difficulty"][inner_l] == 0).all()  # a flat D(psi): argmax of equal scores
    assert torch.equal(views["difficulty"][inner_r], p2[inner_r])
    assert torch.equal(views["combined"][inner_r], p2[inner_r])
    assert (views["diffusion"][inner_r] != p2[inner_r]).any()  # a flat DDIM map: Gumbel noise, not D(psi)


# ---- the method ----------------------------------------------------------------------------------------------

def test_train_step_reports_losses_and_drs_weights_and_updates_all_decoders(one_torch_thread):
    torch.manual_seed(0)
    m = _tiny(num_classes=3)
    label = _blob_label((1, 1, 32, 32, 32), classes=3)
    image = label.float() + 0.3 * torch.randn(1, 1, 32, 32, 32)
    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    out = m.train_step({"image": image, "label": label}, {"image": torch.randn(1, 1, 32, 32, 32)}, 0)
    for key in ("loss", "loss_deno", "loss_diff", "loss_u", "mu", "drs_w_0", "drs_w_1", "drs_w_2", "dice_xi_2"):
        assert key in out and math.isfinite(out[key]), key
    assert math.isclose(out["mu"], 10.0 * math.exp(-5.0))
    changed = {n.split(".")[0] for n, p in m.net.named_parameters() if not torch.equal(p, before[n])}
    assert {"encoder", "decoder_xi", "decoder_psi", "decoder_theta", "diffusion_stem", "time_embed"} <= changed
    state = m.extra_state()
    assert state["drs"]["count"] == 1
    assert m.mu_at(m.config.rampup_steps) == pytest.approx(10.0)


def test_split_backward_gives_the_same_update_as_one_backward_of_eq9(one_torch_thread):
    torch.manual_seed(0)
    base = _tiny(encoder_dropout=0.0, decoder_dropout=0.0, svda=False)
    other = _tiny(encoder_dropout=0.0, decoder_dropout=0.0, svda=False, split_backward=False)
    other.load_state_dict(base.state_dict())
    label = _blob_label((1, 1, 32, 32, 32))
    batch_l = {"image": label.float() + 0.1 * torch.randn(1, 1, 32, 32, 32), "label": label}
    batch_u = {"image": torch.randn(1, 1, 32, 32, 32)}
    torch.manual_seed(5)
    base.train_step(batch_l, batch_u, 3)
    torch.manual_seed(5)
    other.train_step(batch_l, batch_u, 3)
    for (name, a), b in zip(base.net.named_parameters(), other.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_pseudo_label_views_and_prediction_on_an_odd_sized_volume(one_torch_thread):
    torch.manual_seed(0)
    m = _tiny(num_classes=3)
    volume = torch.randn(1, 33, 31, 36)
    views = m.pseudo_labels(volume)
    assert set(views) == set(m.views)
    for v in views.values():
        assert v.shape == (33, 31, 36) and v.dtype == np.uint8 and v.max() < 3
    pred = m.predict(volume)
    assert pred.shape == (33, 31, 36) and pred.dtype == np.uint8
    assert m.net.training  # the caller's mode is restored


def test_state_dict_round_trip_gives_the_same_predictions(one_torch_thread):
    torch.manual_seed(0)
    m = _tiny()
    label = _blob_label((1, 1, 32, 32, 32))
    for step in range(2):
        m.train_step({"image": label.float(), "label": label}, {"image": torch.randn(1, 1, 32, 32, 32)}, step)
    state = copy.deepcopy(m.state_dict())
    fresh = _tiny()
    fresh.load_state_dict(state)
    assert fresh.drs.count == m.drs.count and torch.equal(fresh.drs.weights, m.drs.weights)
    volume = torch.randn(1, 32, 32, 32)
    np.testing.assert_array_equal(fresh.predict(volume), m.predict(volume))
    torch.manual_seed(7)
    a = m.pseudo_labels(volume)
    torch.manual_seed(7)
    b = fresh.pseudo_labels(volume)
    for view in m.views:
        np.testing.assert_array_equal(a[view], b[view])


def test_config_dataclass_fields_are_named_paper_values():
    names = {f.name for f in dataclasses.fields(GenericSSLConfig)}
    for field in ("n_aug", "drs_tau", "drs_alpha", "mu", "rampup_steps", "ema_w", "ddim_steps", "gumbel_tau",
                  "smooth_kernel", "smooth_sigma", "features", "lambda_ce", "lambda_dice"):
        assert field in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: AMP training step and inference on a GPU")
def test_cuda_amp_train_step_and_inference():
    cls = get_method("genericssl")
    m = cls(cls.make_config("tiny", num_classes=3), device="cuda")
    assert m.amp_dtype in (torch.bfloat16, torch.float16)
    label = _blob_label((1, 1, 32, 32, 32), classes=3).cuda()
    image = label.float() + 0.3 * torch.randn_like(label, dtype=torch.float32)
    for step in range(2):
        out = m.train_step({"image": image, "label": label}, {"image": torch.randn_like(image)}, step)
        assert all(math.isfinite(v) for v in out.values())
    volume = torch.randn(1, 36, 32, 32)
    assert m.predict(volume).shape == (40, 36, 32)
    assert set(m.pseudo_labels(volume)) == set(m.views)
