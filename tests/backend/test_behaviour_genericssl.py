"""Behaviour tests of A&D (GenericSSL): values checked on constructed inputs whose answer is known (issue 23).

Every expected value here is computed independently in the test (hand formulas of the paper's equations, the
published code's conventions) rather than by calling the code under test a second time:

* one whole training iteration recomputed by hand (EMA transfer, SVDA draws, eq. 1 noisy label, L_deno, hard
  Dice -> DRS weights, L_diff, DDIM from noise with x0 clamp, RS pseudo label, L_u, mu(t), eq. 9) and compared
  term by term, gradient by gradient and parameter update by parameter update (SGD Nesterov, weight decay);
* which batch each term reads, and which parameters each flow reaches;
* the Diff-VNet flows against a composition of their layers; the V-Net blocks against their definitions;
* the diffusion schedule, q_sample, timestep range, DDIM step list and update, noise start, x0 clamp;
* L_DiceCE, hard Dice and DRS (both modes) by hand; RS smoothing and Gumbel-softmax by hand;
* SVDA by its effect on ramp images and labels whose transform is known exactly;
* config defaults against the paper and the wiring of every config field into the method;
* the review views, primary probabilities and inference path, and the shared scoring / review functions.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.methods import get_method
from backend.methods.genericssl.config import PRESETS, GenericSSLConfig, _OfficialRun
from backend.methods.genericssl.diffvnet import DiffVNet, ema_transfer
from backend.methods.genericssl.losses import DifficultyWeights, dice_ce, hard_dice
from backend.methods.genericssl.rs import domain_unbiased_map, gaussian_smooth, rs_pseudo_label, rs_scores, rs_terms
from backend.methods.genericssl.svda import OPS, SVDAParams, draw_ops, svda
from backend.methods.layers.diffusion import (ddim_reverse, ddim_sample, ddim_timesteps, from_signed,
                                              make_schedulers, q_sample, sample_timesteps, to_signed)
from backend.methods.layers.embeddings import SinusoidalEmbedding
from backend.methods.layers.vnet import ConvStage, VNetDecoder, VNetEncoder
from backend.methods.schedules import gaussian_warmup, sigmoid_rampup

EPS = 1e-8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _method(**overrides):
    cls = get_method("genericssl")
    overrides.setdefault("amp", False)  # fp32 everywhere (no bf16 DDIM on bf16 CPUs): exact comparisons
    return cls(cls.make_config("tiny", **overrides))


# ---- hand formulas ---------------------------------------------------------------------------------------------

def _onehot(label: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(label[:, 0].long(), k).movedim(-1, 1).float()


def _hand_dice_ce(logits, target, w=None, lambda_dice=1.0, lambda_ce=1.0, background=False):
    """lambda_ce * CE (class-weighted mean) + lambda_dice * mean_k w_k (1 - batch soft Dice_k), MONAI smoothing."""
    k = logits.shape[1]
    p = torch.softmax(logits.float(), 1)
    y = _onehot(target, k)
    dims = (0, *range(2, p.ndim))
    inter, den = (p * y).sum(dims), p.sum(dims) + y.sum(dims)
    loss_k = 1 - (2 * inter + 1e-5) / (den + 1e-5)
    ww = torch.ones(k) if w is None else w.float()
    first = 0 if background else 1
    dice = (ww[first:] * loss_k[first:]).mean()
    nll = -(torch.log_softmax(logits.float(), 1) * y).sum(1)  # [B, ...]
    wv = ww[target[:, 0].long()]
    ce = (wv * nll).sum() / wv.sum()
    return lambda_ce * ce + lambda_dice * dice


def _hand_hard_dice(logits, target, absent=0.5):
    k = logits.shape[1]
    pred = logits.argmax(1)
    true = target[:, 0]
    out = []
    for c in range(k):
        p, g = pred == c, true == c
        tp, ps, gs = (p & g).sum().item(), p.sum().item(), g.sum().item()
        if ps + gs == 0:
            out.append(absent)
        else:
            out.append(2 * tp / (ps + gs))
    return torch.tensor(out).clamp(EPS, 1.0)


def _hand_kernel(size: int, sigma: float) -> torch.Tensor:
    r = (size - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).float()


def _hand_smooth(x: torch.Tensor, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """3D normalised Gaussian (outer product of the 1D kernel), zero padding, channel by channel."""
    g = _hand_kernel(size, sigma)
    k3 = g[:, None, None] * g[None, :, None] * g[None, None, :]
    c = x.shape[1]
    return F.conv3d(x, k3.expand(c, 1, *k3.shape).contiguous(), padding=size // 2, groups=c)


def _hand_gumbel_softmax(x0: torch.Tensor, tau: float) -> torch.Tensor:
    """The re-parameterisation of eq. 7 drawn as torch draws it: softmax((x0 + g) / tau), g = -log Exp(1)."""
    g = -torch.empty_like(x0).exponential_().log()
    return torch.softmax((x0 + g) / tau, dim=1)


def _abar(steps: int = 1000) -> torch.Tensor:
    """alpha-bar of the published linear schedule (Ho et al.: beta from 1e-4 to 2e-2)."""
    betas = torch.linspace(1e-4, 2e-2, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def _sched_abar(m) -> torch.Tensor:
    """The method's alpha-bar in float32 (checked against :func:`_abar` elsewhere): the few-step DDIM of a tiny,
    batch-normalised net amplifies one-ulp differences of the schedule, so the hand DDIM uses the same numbers."""
    torch.testing.assert_close(m.ddim.alphas_cumprod.float(), _abar(m.config.diffusion_steps))
    return m.ddim.alphas_cumprod.float()


def _hand_ddim(predict, x_t, timesteps, abar):
    x = x_t
    for i, t in enumerate(timesteps):
        x0 = predict(x, torch.full((x.shape[0],), t, dtype=torch.long))
        if i == len(timesteps) - 1:
            return x0
        a_t, a_s = abar[t], abar[timesteps[i + 1]]
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    raise AssertionError("no steps")


class _HandDRS:
    """DRS of eq. 3-5 with the published running averages (momentum (tau - 1) / tau), written out."""

    def __init__(self, k, tau, alpha):
        self.k, self.m, self.alpha = k, (tau - 1) / tau, alpha
        self.last = torch.full((k,), EPS)
        self.learn, self.unlearn, self.reverse = torch.zeros(k), torch.zeros(k), torch.ones(k)

    def update(self, d):
        d = d.clamp(EPS, 1)
        delta, r = d - self.last, torch.log(d / self.last)
        gain = torch.where(delta > 0, delta * r, torch.zeros(self.k))
        loss = torch.where(delta < 0, delta * r, torch.zeros(self.k))
        m = self.m
        self.learn = m * self.learn + (1 - m) * gain
        self.unlearn = m * self.unlearn + (1 - m) * loss
        self.reverse = m * self.reverse + (1 - m) * (1 - d)
        self.last = d
        return self.reverse * ((self.unlearn + EPS) / (self.learn + EPS)) ** self.alpha * self.k


def _ramp(d, h, w):
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    return zz.float(), yy.float(), xx.float()


def _blobs(b, k, shape, seed):
    """Labels with every class 0..k-1 as boxes at seeded places, and images correlated with them."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    lab = torch.zeros(b, 1, d, h, w, dtype=torch.long)
    for i in range(b):
        for c in range(1, k):
            z0, y0, x0 = (int(torch.randint(0, s - s // 2, (1,), generator=g)) for s in (d, h, w))
            lab[i, 0, z0:z0 + d // 2, y0:y0 + h // 2, x0:x0 + w // 3] = c
    img = lab.float() + 0.3 * torch.randn(b, 1, d, h, w, generator=g)
    return img, lab


# ---- config: the paper's values and their wiring --------------------------------------------------------------

def test_config_defaults_are_the_papers_and_the_published_codes():
    c = GenericSSLConfig()
    expected = {
        "patch_size": (80, 112, 112), "batch_labeled": 4, "batch_unlabeled": 4, "lr": 1e-2, "momentum": 0.9,
        "nesterov": True, "weight_decay": 3e-5, "features": 32, "norm": "batch", "time_embed_dim": 128,
        "emb_dim": 512, "encoder_dropout": 0.5, "decoder_dropout": 0.5, "diffusion_steps": 1000,
        "beta_schedule": "linear_beta", "ddim_steps": 10, "clip_x0": True, "svda": True, "n_aug": 3,
        "aug_prob": 0.7, "rotation_deg": 15.0, "scale_range": (0.7, 1.0), "blur_sigma": (0.7, 1.3),
        "brightness_range": (0.7, 1.3), "contrast_range": (0.7, 1.3), "gamma_range": (0.7, 1.3),
        "lambda_ce": 1.0, "lambda_dice": 1.0, "dice_include_background": False, "drs_tau": 50, "drs_alpha": 0.2,
        "drs_mode": "ema", "drs_absent_dice": 0.5, "mu": 10.0, "rampup_steps": 300 * 19, "gumbel_tau": 1.0,
        "smooth_kernel": 3, "smooth_sigma": 1.0, "ema_w": 0.99, "review_mode": "train", "split_backward": True,
        "max_steps": 301 * 19, "val_every": 19, "num_classes": 2, "in_channels": 1, "poly_power": 0.9,
    }
    for name, value in expected.items():
        assert getattr(c, name) == value, name
    assert SVDAParams() == SVDAParams(3, 0.7, 15.0, (0.7, 1.0), (0.7, 1.3), (0.7, 1.3), (0.7, 1.3), (0.7, 1.3), OPS)
    assert OPS == ("rotation", "scaling", "blur", "brightness", "contrast", "gamma")
    run = _OfficialRun(iterations=7, rampup_epochs=5, epochs=9)
    assert (run.steps, run.rampup_steps) == (70, 35)
    assert GenericSSLConfig.run_length_fields == ("rampup_steps",)
    short = GenericSSLConfig().with_steps(301 * 19 // 10)
    assert short.rampup_steps == round(300 * 19 * (301 * 19 // 10) / (301 * 19))
    assert PRESETS["tiny"]["patch_size"] == (32, 32, 32)


def test_method_builds_every_part_from_its_config():
    m = _method(num_classes=3, in_channels=2, features=4, time_embed_dim=6, emb_dim=10, encoder_dropout=0.3,
                decoder_dropout=0.2, lr=0.07, momentum=0.8, weight_decay=1e-3, nesterov=False, diffusion_steps=50,
                drs_tau=7, drs_alpha=0.4, drs_mode="window", n_aug=2, aug_prob=0.6, rotation_deg=9.0,
                scale_range=(0.8, 0.9), blur_sigma=(0.5, 0.6), brightness_range=(0.9, 1.1),
                contrast_range=(0.8, 1.2), gamma_range=(0.6, 1.4))
    net = m.net
    assert net.encoder.stage1.convs[0][0].in_channels == 2 and net.encoder.stage1.convs[0][0].out_channels == 4
    assert net.diffusion_stem.image_conv.in_channels == 2 and net.diffusion_stem.label_conv.in_channels == 3
    for dec in (net.decoder_xi, net.decoder_psi, net.decoder_theta):
        assert dec.out.out_channels == 3 and dec.dropout.p == 0.2
    assert net.bottleneck_dropout.p == 0.3
    assert net.time_embed.dim == 6 and net.time_embed.out_dim == 10
    assert net.decoder_xi.stage6.emb is not None and net.decoder_psi.stage6.emb is None
    assert net.decoder_theta.stage6.emb is None and net.encoder.stage2.emb is not None
    assert isinstance(net.encoder.stage1.convs[0][1], torch.nn.BatchNorm3d)
    g = m.optimizer.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.07, 0.8, 1e-3, False)
    assert {id(p) for p in g["params"]} == {id(p) for p in net.parameters()}
    assert m.ddpm.num_train_timesteps == 50 and m.ddim.num_train_timesteps == 50
    torch.testing.assert_close(m.ddpm.alphas_cumprod.float(), _abar(50))
    torch.testing.assert_close(m.ddim.alphas_cumprod.float(), _abar(50))
    assert (m.drs.num_classes, m.drs.tau, m.drs.alpha, m.drs.mode) == (3, 7, 0.4, "window")
    assert m.svda_params == SVDAParams(2, 0.6, 9.0, (0.8, 0.9), (0.5, 0.6), (0.9, 1.1), (0.8, 1.2), (0.6, 1.4))
    assert m.modules() == {"diffvnet": net} and m.optimizers() == [m.optimizer]
    with pytest.raises(ValueError):
        _method(review_mode="nope")


# ---- one training iteration, recomputed by hand -----------------------------------------------------------------

_P = (16, 32, 32)  # the bottleneck holds 2 x 2 x 2 values per channel: its batch norm is well conditioned
_STEP_CFG = dict(num_classes=4, patch_size=_P, batch_labeled=2, batch_unlabeled=2, encoder_dropout=0.0,
                 decoder_dropout=0.0, aug_prob=1.0, lambda_ce=0.7, lambda_dice=1.3, ema_w=0.95, gumbel_tau=0.7,
                 smooth_sigma=0.8, mu=4.0, drs_alpha=0.3, drs_tau=7, rampup_steps=40, drs_absent_dice=0.3,
                 lr=0.05, momentum=0.8, weight_decay=1e-3, ddim_steps=3)


def _step_batches(seed=0):
    x_l, y_l = _blobs(2, 3, _P, seed)  # classes 0..2: class 3 of 4 is absent from the label
    x_u, _ = _blobs(2, 3, _P, seed + 100)
    return {"image": x_l, "label": y_l}, {"image": x_u + 0.2}


def _silence_class(m, k):
    """D(xi) never predicts class k (its output bias is very negative), so k is absent from prediction and label."""
    with torch.no_grad():
        m.net.decoder_xi.out.bias[k] = -100.0


@pytest.mark.parametrize("variant", ["split", "joint"])
def test_one_iteration_equals_its_hand_computation_term_by_term(variant):
    """Algorithm 1, every line: EMA transfer first; SVDA of the labeled batch (with its label) then of the
    unlabeled one; y_t of eq. 1 with t uniform in [0, T); L_deno = L_DiceCE(D(xi), y) (eq. 2); DRS weights from
    D(xi)'s hard Dice (eq. 3-5, absent class = drs_absent_dice); L_diff with them (eq. 6); DDIM from N(0, I) over
    [999, 500, 0] with x0 clamped; RS pseudo label (eq. 7); L_u on D(theta) (eq. 8); mu(t) (eq. 9).  Then the
    gradients of L_deno + L_diff + mu L_u and one SGD (Nesterov, weight decay) step."""
    cfg = dict(_STEP_CFG, split_backward=variant == "split", dice_include_background=variant == "joint",
               smooth_kernel=3 if variant == "split" else 5)
    torch.manual_seed(0)
    m = _method(**cfg)
    _silence_class(m, 3)
    m.train()
    ref = copy.deepcopy(m.net)
    labeled, unlabeled = _step_batches()
    lab_before = {k: v.clone() for k, v in labeled.items()}
    start = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    seen = {}
    real_step = m.optimizer.step

    def step(*a, **k):
        seen["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in m.net.named_parameters()}
        seen["params"] = {n: p.detach().clone() for n, p in m.net.named_parameters()}
        return real_step(*a, **k)

    m.optimizer.step = step
    step_no = 13
    torch.manual_seed(42)
    out = m.train_step(labeled, unlabeled, step_no)
    for k, v in labeled.items():
        assert torch.equal(v, lab_before[k])  # the batch itself is not modified in place

    # ---- by hand ----
    c = m.config
    with torch.no_grad():  # EMA transfer: theta <- w theta + (1 - w) (xi + psi) / 2, before anything else
        xi_p, psi_p = dict(ref.decoder_xi.named_parameters()), dict(ref.decoder_psi.named_parameters())
        for name, p in ref.decoder_theta.named_parameters():
            p.copy_(0.95 * p + 0.05 * (xi_p[name] + psi_p[name]) / 2)
    torch.manual_seed(42)
    x_l, y_l = svda(labeled["image"], labeled["label"], SVDAParams(p=1.0))
    x_u, _ = svda(unlabeled["image"], None, SVDAParams(p=1.0))
    assert not torch.equal(y_l, labeled["label"])  # the draw moved the label (so the check below means something)
    t = torch.randint(0, 1000, (2,))
    # eq. 1's noise: N(0, I) drawn like the signed one-hot label (channels-last strides, as F.one_hot leaves them)
    noise = torch.randn_like(torch.empty(2, *_P, 4).movedim(-1, 1))
    a = _sched_abar(m)[t].view(-1, 1, 1, 1, 1)  # the same float32 numbers: one-ulp differences of y_t would show
    y_t = a ** 0.5 * (2 * _onehot(y_l, 4) - 1) + (1 - a) ** 0.5 * noise  # in the gradients (batch norm)
    p_xi = ref.denoise(x_l, y_t, t)
    l_deno = _hand_dice_ce(p_xi, y_l, None, 1.3, 0.7, c.dice_include_background)
    dice = _hand_hard_dice(p_xi.detach(), y_l, absent=0.3)
    assert dice[3] == pytest.approx(0.3)  # the absent class scores drs_absent_dice
    weights = _HandDRS(4, 7, 0.3).update(dice)
    p_psi = ref.psi(x_l)
    l_diff = _hand_dice_ce(p_psi, y_l, weights, 1.3, 0.7, c.dice_include_background)
    x_T = torch.randn(2, 4, *_P)
    with torch.no_grad():
        x0 = _hand_ddim(lambda y, tt: ref.denoise(x_u, y, tt).clamp(-1, 1), x_T, [999, 500, 0], _sched_abar(m))
        logits_u_psi = ref.psi(x_u)
        domain = _hand_smooth(_hand_gumbel_softmax(x0, 0.7), c.smooth_kernel, 0.8)
        pseudo = (domain + torch.softmax(logits_u_psi, 1)).argmax(1, keepdim=True)
    l_u = _hand_dice_ce(ref.theta(x_u), pseudo, None, 1.3, 0.7, c.dice_include_background)
    mu = 4.0 * math.exp(-5 * (1 - 13 / 40) ** 2)
    total = l_deno + l_diff + mu * l_u

    assert out["mu"] == pytest.approx(mu, rel=1e-9)
    assert out["loss_deno"] == pytest.approx(l_deno.item(), rel=1e-4)
    assert out["loss_diff"] == pytest.approx(l_diff.item(), rel=1e-4)
    assert out["loss_u"] == pytest.approx(l_u.item(), rel=1e-4)
    assert out["loss"] == pytest.approx(total.item(), rel=1e-4)
    for k in range(4):
        assert out[f"dice_xi_{k}"] == pytest.approx(dice[k].item(), rel=1e-5)
        assert out[f"drs_w_{k}"] == pytest.approx(weights[k].item(), rel=1e-4)
    assert m.drs.count == 1

    # the parameters the step started from: D(theta) after the EMA transfer, everything else untouched
    for name, p in ref.named_parameters():
        torch.testing.assert_close(seen["params"][name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)
        if not name.startswith("decoder_theta."):
            assert torch.equal(seen["params"][name], start[name]), name
    # the gradients of eq. 9, parameter by parameter (None = not reached by any term)
    total.backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for name, p in ref.named_parameters():
        got, want = seen["grads"][name], p.grad
        if want is None or not want.any():
            assert got is None or not got.any(), f"{name} reached by no term of eq. 9"
            continue
        assert got is not None, name
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-5 * scale, msg=lambda s: f"{name}: {s}")
    # one SGD step, first iteration (momentum buffer = gradient): Nesterov d = (1 + momentum) (g + wd p)
    for name, p in m.net.named_parameters():
        g = seen["grads"][name]
        if g is None:
            assert torch.equal(p.detach(), seen["params"][name]), name
            continue
        p0 = seen["params"][name]
        expect = p0 - 0.05 * (1 + 0.8) * (g + 1e-3 * p0)
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-7, msg=name)


def test_labeled_terms_read_only_the_labeled_batch_and_l_u_only_the_unlabeled_one():
    """L_deno / L_diff must change with x^l (and y^l) and not with x^u; L_u the reverse (SVDA on)."""
    torch.manual_seed(0)
    base = _method(**_STEP_CFG)
    state = copy.deepcopy(base.state_dict())

    def run(labeled, unlabeled):
        m = _method(**_STEP_CFG)
        m.load_state_dict(copy.deepcopy(state))
        torch.manual_seed(3)
        return m.train_step(labeled, unlabeled, 20)

    lab, unl = _step_batches()
    ref = run(lab, unl)
    other_u = run(lab, {"image": -2.0 * unl["image"].flip(-1) + 1.0})
    other_x = run({"image": lab["image"] * -1.0, "label": lab["label"]}, unl)
    other_y = run({"image": lab["image"], "label": lab["label"].flip(-2)}, unl)
    for key in ("loss_deno", "loss_diff", "dice_xi_0", "dice_xi_1", "drs_w_1"):
        assert other_u[key] == pytest.approx(ref[key], rel=1e-6), key
    assert abs(other_u["loss_u"] - ref["loss_u"]) > 1e-5
    for changed in (other_x, other_y):
        assert changed["loss_u"] == pytest.approx(ref["loss_u"], rel=1e-6)
        assert abs(changed["loss_deno"] - ref["loss_deno"]) > 1e-5
        assert abs(changed["loss_diff"] - ref["loss_diff"]) > 1e-5


def test_mu_and_learning_rate_at_given_steps():
    m = _method(mu=10.0, rampup_steps=40, max_steps=100, lr=0.03)
    for step, expect in ((0, 10 * math.exp(-5)), (10, 10 * math.exp(-5 * 0.75 ** 2)), (20, 10 * math.exp(-1.25)),
                         (40, 10.0), (90, 10.0)):
        assert m.mu_at(step) == pytest.approx(expect, rel=1e-12), step
    for step in (0, 37, 99, 150):
        assert m.lr_at(step) == pytest.approx(0.03 * (1 - min(step, 99) / 100) ** 0.9, rel=1e-12)
    assert sigmoid_rampup(-5, 10) == pytest.approx(math.exp(-5)) and sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(7.5, 10) == pytest.approx(math.exp(-5 * 0.25 ** 2))
    assert gaussian_warmup(5, 10, 2.0) == pytest.approx(2 * math.exp(-1.25))


def test_each_flow_reaches_its_parameters_and_no_others():
    """D(xi): diffusion stem, time embedding, deeper encoder (with its time projections), D(xi); D(psi) / D(theta):
    image stem, encoder (no time projections), their own decoder; the label y_t reaches D(xi)'s output."""
    torch.manual_seed(0)
    net = DiffVNet(1, 3, 4, time_embed_dim=8, emb_dim=16, encoder_dropout=0.0, decoder_dropout=0.0)
    x = torch.randn(2, 1, 16, 16, 16)
    y_t = torch.randn(2, 3, 16, 16, 16, requires_grad=True)
    t = torch.tensor([5, 700])
    params = dict(net.named_parameters())

    def reached(out):
        grads = torch.autograd.grad(out.square().mean(), list(params.values()), allow_unused=True)
        return {n for n, g in zip(params, grads) if g is not None and g.abs().sum() > 0}

    def groups(names):
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("encoder.") else "") for n in names}

    deno = reached(net.denoise(x, y_t, t))
    assert groups(deno) == {"time_embed", "diffusion_stem", "encoder.down1", "encoder.stage2", "encoder.down2",
                            "encoder.stage3", "encoder.down3", "encoder.stage4", "encoder.down4", "encoder.stage5",
                            "decoder_xi"}
    assert {n for n in params if n.startswith("decoder_xi.")} <= deno  # incl. every decoder time projection
    assert {n for n in params if n.startswith("encoder.") and ".emb." in n} <= deno
    assert "diffusion_stem.label_conv.weight" in deno and "diffusion_stem.image_conv.bias" in deno
    all_encoder = {"encoder.stage1", "encoder.down1", "encoder.stage2", "encoder.down2", "encoder.stage3",
                   "encoder.down3", "encoder.stage4", "encoder.down4", "encoder.stage5"}
    for flow, decoder in ((net.psi, "decoder_psi"), (net.theta, "decoder_theta"), (net.forward, "decoder_theta")):
        names = reached(flow(x))
        assert groups(names) == all_encoder | {decoder}, flow
        assert not any(".emb." in n for n in names)
    (gy,) = torch.autograd.grad(net.denoise(x, y_t, t).sum(), [y_t])
    assert gy.abs().sum() > 0  # label conditioning reaches the output
    with torch.no_grad():  # ... and so do the image and the timestep
        net.eval()
        base = net.denoise(x, y_t, t)
        assert not torch.allclose(net.denoise(x, y_t * 0, t), base, atol=1e-4)
        assert not torch.allclose(net.denoise(x, y_t, torch.tensor([400, 100])), base, atol=1e-4)
        assert not torch.allclose(net.denoise(x.flip(-1), y_t, t), base, atol=1e-4)
        # a sample's output depends on its own t only
        other = net.denoise(x, y_t, torch.tensor([5, 20]))
        torch.testing.assert_close(other[0], base[0], rtol=1e-5, atol=1e-5)


def test_diffvnet_flows_are_the_compositions_of_their_layers():
    torch.manual_seed(0)
    net = DiffVNet(1, 3, 4, time_embed_dim=8, emb_dim=16, encoder_dropout=0.5, decoder_dropout=0.5).train()
    x, y_t, t = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 3, 16, 16, 16), torch.tensor([3, 999])
    enc, stem = net.encoder, net.diffusion_stem

    def drop(feats):  # Dropout3d on the deepest feature only
        return feats[:-1] + [net.bottleneck_dropout(feats[-1])]

    with torch.no_grad():
        torch.manual_seed(1)
        got = net.denoise(x, y_t, t)
        torch.manual_seed(1)
        emb = net.time_embed(t)
        w = torch.cat([stem.image_conv.weight, stem.label_conv.weight], 1)
        first = F.relu(stem.norm(F.conv3d(torch.cat([x, y_t], 1), w, stem.image_conv.bias, padding=1)))
        want = net.decoder_xi(drop(enc(None, emb, first=first)), emb)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())  # conv sum order
        for flow, dec in ((net.psi, net.decoder_psi), (net.theta, net.decoder_theta), (net, net.decoder_theta)):
            torch.manual_seed(2)
            got = flow(x)
            torch.manual_seed(2)
            want = dec(drop(enc(x)))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net.encode_image(x)[0], enc.stage1(x))
        torch.testing.assert_close(net.diffusion_context(x), stem.image_conv(x))
        # dropout: random in train mode, off in eval mode
        assert not torch.allclose(net.psi(x), net.psi(x))
        net.eval()
        torch.testing.assert_close(net.psi(x), net.psi(x))


def test_vnet_blocks_follow_their_definition():
    torch.manual_seed(0)
    f = 2
    enc, dec = VNetEncoder(1, f, "batch", emb_dim=6), VNetDecoder(3, f, "batch", emb_dim=6, dropout=0.0)
    stage = ConvStage(2, 3, 4, "batch", emb_dim=6)
    x, e = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 6)
    with torch.no_grad():
        h = stage.convs[0](x) + stage.emb(e)[:, :, None, None, None]  # embedding after the first conv only
        torch.testing.assert_close(stage(x, e), stage.convs[1](h))
        torch.testing.assert_close(stage(x), stage.convs[1](stage.convs[0](x)))
        conv, bn = stage.convs[0][0], stage.convs[0][1]
        torch.testing.assert_close(stage.convs[0](x), F.relu(bn(conv(x))))
        img = torch.randn(2, 1, 16, 16, 16)
        feats = enc(img, e)
        want = [enc.stage1(img, e)]
        for down, st in ((enc.down1, enc.stage2), (enc.down2, enc.stage3), (enc.down3, enc.stage4),
                         (enc.down4, enc.stage5)):
            want.append(st(down(want[-1]), e))
        for a, b in zip(feats, want):
            torch.testing.assert_close(a, b)
        assert [t.shape[1] for t in feats] == [f, 2 * f, 4 * f, 8 * f, 16 * f]
        assert [t.shape[-1] for t in feats] == [16, 8, 4, 2, 1]
        x1, x2, x3, x4, x5 = feats
        h = dec.stage6(dec.up5(x5) + x4, e)
        h = dec.stage7(dec.up6(h) + x3, e)
        h = dec.stage8(dec.up7(h) + x2, e)
        h = dec.stage9(dec.up8(h) + x1, e)
        logits, last = dec(feats, e, return_features=True)
        torch.testing.assert_close(last, h)
        torch.testing.assert_close(logits, dec.out(h))
        assert len(enc.stage3.convs) == 3 and len(dec.stage8.convs) == 2 and len(dec.stage9.convs) == 1
        d0, d1 = enc.down1[0], enc.down1[1]  # down: 2x2x2 stride-2 conv, norm, ReLU; up: transposed conv, ...
        torch.testing.assert_close(enc.down1(x1), F.relu(d1(d0(x1))))
        u0, u1 = dec.up5[0], dec.up5[1]
        torch.testing.assert_close(dec.up5(x5), F.relu(u1(u0(x5))))
        assert isinstance(u0, torch.nn.ConvTranspose3d) and u0.stride == (2, 2, 2)
        from backend.methods.layers.vnet import VNet, _norm
        full = VNet(1, 3, f, "batch", emb_dim=6, dropout=0.0)
        torch.testing.assert_close(full(img, e), full.decoder(full.encoder(img, e), e))
    assert _norm("group", 32).num_groups == 16 and _norm("group", 8).num_groups == 8
    assert _norm("instance", 4).affine and isinstance(_norm("none", 4), torch.nn.Identity)
    with pytest.raises(ValueError):
        _norm("layer", 4)
        assert isinstance(enc.down1[0], torch.nn.Conv3d) and enc.down1[0].stride == (2, 2, 2)


def test_time_embedding_is_the_sinusoid_lifted_by_linear_silu_linear():
    torch.manual_seed(0)
    emb = SinusoidalEmbedding(8, 12)
    t = torch.tensor([0.0, 3.0, 999.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    s = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    lin1, lin2 = emb.mlp[0], emb.mlp[2]
    with torch.no_grad():
        torch.testing.assert_close(emb(t), lin2(F.silu(lin1(s))), rtol=1e-5, atol=1e-5)
        assert SinusoidalEmbedding(8).out_dim == 32 and lin1.in_features == 8 and lin2.out_features == 12
        scaled = SinusoidalEmbedding(8, 12, scale=100.0)
        scaled.load_state_dict(emb.state_dict())
        torch.testing.assert_close(scaled(torch.tensor([0.5])), emb(torch.tensor([50.0])))


def test_ema_transfer_by_hand_with_another_weight_and_unmatched_parameters():
    torch.manual_seed(0)
    theta, xi, psi = (torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 2)})
                      for _ in range(3))
    psi["b"] = torch.nn.Linear(3, 2)  # weight shape mismatch: theta's "b.weight" keeps its values
    xi["c"] = torch.nn.Linear(1, 1)  # an extra parameter of xi is ignored
    before = {n: p.detach().clone() for n, p in theta.named_parameters()}
    n = ema_transfer(theta, xi, psi, 0.7)
    assert n == 3
    for name in ("a.weight", "a.bias", "b.bias"):
        want = 0.7 * before[name] + 0.3 * (dict(xi.named_parameters())[name] + dict(psi.named_parameters())[name]) / 2
        torch.testing.assert_close(dict(theta.named_parameters())[name].detach(), want)
    for name in ("b.weight",):
        assert torch.equal(dict(theta.named_parameters())[name], before[name])


# ---- diffusion ----------------------------------------------------------------------------------------------

def test_forward_process_and_timesteps():
    ddpm, ddim = make_schedulers(1000, "linear_beta")
    torch.testing.assert_close(ddpm.alphas_cumprod.float(), _abar(1000))
    x0 = to_signed(torch.tensor([[0.0, 1.0, 0.5]]))
    torch.testing.assert_close(x0, torch.tensor([[-1.0, 1.0, 0.0]]))
    torch.testing.assert_close(from_signed(x0), torch.tensor([[0.0, 1.0, 0.5]]))
    x0 = torch.rand(3, 2, 4, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    a = _abar()[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(q_sample(ddpm, x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.manual_seed(4)
    drawn = q_sample(ddpm, x0, t)
    torch.manual_seed(4)
    torch.testing.assert_close(drawn, q_sample(ddpm, x0, t, torch.randn_like(x0)))  # standard normal noise
    assert abs(((drawn - a.sqrt() * x0) / (1 - a).sqrt()).std().item() - 1) < 0.15
    torch.manual_seed(0)
    ts = sample_timesteps(ddpm, 30000, torch.device("cpu"))
    assert ts.dtype == torch.long and ts.shape == (30000,)
    assert ts.min().item() == 0 and ts.max().item() == 999  # uniform over [0, T)
    assert abs(ts.float().mean().item() - 499.5) < 8
    assert (ts < 500).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_ddim_step_list_and_reverse_process_by_hand():
    assert ddim_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(1000, 3) == [999, 500, 0] and ddim_timesteps(10, 2) == [9, 0]
    assert ddim_timesteps(1000, 1) == [999] and ddim_timesteps(5, 5) == [4, 3, 2, 1, 0]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)
    _, ddim = make_schedulers(1000)
    abar = _abar()
    calls = []
    target = torch.tensor([0.6, -0.2, 0.9]).view(1, 3, 1, 1, 1)

    def predict(x, t):
        calls.append((x.clone(), t.clone()))
        return target * (1 + t.float().view(-1, 1, 1, 1, 1) / 1000) + 0.1 * x

    x_T = torch.randn(2, 3, 2, 2, 2)
    out = ddim_sample(ddim, predict, x_T, 4)
    assert [c[1].tolist() for c in calls] == [[999, 999], [666, 666], [333, 333], [0, 0]]
    assert torch.equal(calls[0][0], x_T)  # sampling starts from the given noise
    record = calls[:]
    calls.clear()
    want = _hand_ddim(predict, x_T, [999, 666, 333, 0], abar)
    torch.testing.assert_close(out, want)
    for (xa, _), (xb, _) in zip(record, calls):
        torch.testing.assert_close(xa, xb)
    # eta = 1: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma n (Song et al. eq. 12)
    calls.clear()
    got = ddim_reverse(ddim.alphas_cumprod, predict, x_T, [999, 400, 0], 1.0, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    abar32 = ddim.alphas_cumprod.float()
    x = x_T
    for t, s in ((999, 400), (400, 0), (0, None)):
        x0 = predict(x, torch.full((2,), t))
        if s is None:
            break
        a_t, a_s = abar32[t], abar32[s]
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).sqrt() * eps + sigma * torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-6)


def test_method_ddim_x0_starts_from_noise_clamps_x0_and_uses_the_image_context():
    torch.manual_seed(0)
    m = _method(num_classes=3, ddim_steps=3)
    image = torch.randn(2, 1, 32, 32, 32)
    seen = []

    def fake(context, y_t, t):
        seen.append((context, y_t.clone(), t.clone()))
        return 3.0 * torch.tanh(y_t) + context.mean()  # outside [-1, 1] where |y_t| is large

    m.net.denoise_from_context = fake
    torch.manual_seed(9)
    x0 = m.ddim_x0(image)
    torch.manual_seed(9)
    noise = torch.randn(2, 3, 32, 32, 32)
    assert torch.equal(seen[0][1], noise)  # x_T ~ N(0, I), one channel per class
    assert [s[2].tolist() for s in seen] == [[999, 999], [500, 500], [0, 0]]
    with torch.no_grad():
        torch.testing.assert_close(seen[0][0], m.net.diffusion_context(image))
    hand = _hand_ddim(lambda y, t: (3.0 * torch.tanh(y) + seen[0][0].mean()).clamp(-1, 1), noise, [999, 500, 0],
                      _abar())
    torch.testing.assert_close(x0, hand)
    assert x0.abs().max() <= 1.0 and (x0.abs() == 1.0).any()
    m.config.clip_x0 = False
    seen.clear()
    torch.manual_seed(9)
    unclipped = m.ddim_x0(image)
    assert unclipped.abs().max() > 1.5
    assert not x0.requires_grad and not unclipped.requires_grad


def test_sampling_autocast_and_amp_dtype_follow_the_config():
    from backend.methods.genericssl.method import _cpu_bf16_supported

    native = _cpu_bf16_supported()
    m = _method(amp=True, cpu_bf16_sampling=False)
    with m.sampling_autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert m.amp_dtype is None  # cpu_amp is opt-in
    m.config.cpu_bf16_sampling = True
    with m.sampling_autocast():
        assert torch.is_autocast_enabled("cpu") == native
    m.config.cpu_amp = True
    assert m.amp_dtype == (torch.bfloat16 if native else None)
    m.config.amp = False
    assert m.amp_dtype is None
    with m.sampling_autocast():
        assert not torch.is_autocast_enabled("cpu")


# ---- losses ------------------------------------------------------------------------------------------------

def test_dice_ce_by_hand_reduction_weights_and_background():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4) * 2
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    target[1] = (target[1] > 0).long()  # sample 2 lacks class 2: batch Dice differs from a per-sample mean
    w = torch.tensor([0.4, 2.0, 0.7])
    for kwargs in ({}, {"class_weights": w}, {"lambda_dice": 0.3, "lambda_ce": 1.7},
                   {"class_weights": w, "include_background": True}, {"include_background": True}):
        got = dice_ce(logits, target, **kwargs)
        want = _hand_dice_ce(logits, target, kwargs.get("class_weights"), kwargs.get("lambda_dice", 1.0),
                             kwargs.get("lambda_ce", 1.0), kwargs.get("include_background", False))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(kwargs))
    # reduction: a batch Dice (not a mean of per-sample Dice) and a voxel mean of CE (not a sum)
    per_sample = sum(dice_ce(logits[i:i + 1], target[i:i + 1], lambda_ce=0.0) for i in range(2)) / 2
    assert abs(per_sample.item() - dice_ce(logits, target, lambda_ce=0.0).item()) > 1e-3
    ce = dice_ce(logits, target, lambda_dice=0.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target[:, 0]))
    # gradient reaches the logits through both terms
    lg = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dice_ce(lg, target, lambda_ce=0.0), [lg])
    assert g.abs().sum() > 0


def test_hard_dice_by_hand_over_the_whole_batch():
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 1, 5, 5, 5))
    target[0][target[0] == 2] = 1
    logits = torch.randn(2, 4, 5, 5, 5)
    logits[:, 3] = -50  # class 3: absent from prediction and label
    got = hard_dice(logits, target)
    torch.testing.assert_close(got, _hand_hard_dice(logits, target))
    assert got[3] == pytest.approx(0.5)
    torch.testing.assert_close(hard_dice(logits, target, absent=0.2), _hand_hard_dice(logits, target, 0.2))
    logits[1, 3, 0, 0, 0] = 50  # predicted once, absent from the label: 0, clamped to eps
    assert hard_dice(logits, target)[3].item() == pytest.approx(1e-8, rel=1e-3)
    mean_of_samples = (_hand_hard_dice(logits[:1], target[:1]) + _hand_hard_dice(logits[1:], target[1:])) / 2
    assert not torch.allclose(hard_dice(logits, target)[:3], mean_of_samples[:3])


def test_drs_ema_weights_by_hand_over_a_sequence():
    drs = DifficultyWeights(3, tau=4, alpha=0.3, mode="ema")
    hand = _HandDRS(3, 4, 0.3)
    seq = [[0.9, 0.5, 0.2], [0.95, 0.4, 0.3], [0.93, 0.45, 0.1], [0.93, 0.6, 0.05], [0.97, 0.55, 0.4],
           [0.96, 0.7, 0.4]]
    for d in seq:
        torch.testing.assert_close(drs.update(torch.tensor(d)), hand.update(torch.tensor(d)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(drs.weights, hand.reverse * ((hand.unlearn + EPS) / (hand.learn + EPS)) ** 0.3 * 3,
                               rtol=1e-5, atol=1e-7)
    assert drs.count == len(seq)
    other = DifficultyWeights(3, tau=4, alpha=0.3, mode="ema")
    other.load_state_dict(copy.deepcopy(drs.state_dict()))
    torch.testing.assert_close(other.update(torch.tensor([0.5, 0.5, 0.5])), hand.update(torch.tensor([0.5] * 3)),
                               rtol=1e-5, atol=1e-7)
    window = DifficultyWeights(3, tau=4, alpha=0.3, mode="window")
    window.load_state_dict(drs.state_dict())  # another mode: starts afresh
    assert window.count == 0 and torch.equal(window.weights, torch.ones(3))
    with pytest.raises(ValueError):
        DifficultyWeights(3, mode="sum")


def test_drs_window_weights_are_exact_sums_over_the_last_tau_iterations():
    tau, k, alpha = 3, 2, 0.5
    drs = DifficultyWeights(k, tau=tau, alpha=alpha, mode="window")
    seq = [torch.tensor(d) for d in ([0.5, 0.2], [0.6, 0.1], [0.55, 0.3], [0.7, 0.25], [0.65, 0.35], [0.9, 0.2])]
    prev = torch.full((k,), EPS)
    gains, drops, revs = [], [], []
    for i, d in enumerate(seq):
        delta, r = d - prev, torch.log(d / prev)
        gains.append(torch.where(delta > 0, delta * r, torch.zeros(k)))
        drops.append(torch.where(delta < 0, delta * r, torch.zeros(k)))
        revs.append(1 - d)
        prev = d
        lo = max(0, i + 1 - tau)
        dl, du = sum(gains[lo:]), sum(drops[lo:])
        w_lambda = sum(revs[lo:]) / (i + 1 - lo)
        want = w_lambda * ((du + EPS) / (dl + EPS)) ** alpha * k
        torch.testing.assert_close(drs.update(d), want, rtol=1e-5, atol=1e-7, msg=str(i))


# ---- Reparameterize & Smooth (eq. 7) ---------------------------------------------------------------------------

def test_gaussian_smooth_by_hand_kernel_sigma_and_zero_padding():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 7, 6, 5)
    for size, sigma in ((3, 1.0), (3, 0.6), (5, 1.5)):
        torch.testing.assert_close(gaussian_smooth(x, size, sigma), _hand_smooth(x, size, sigma), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(gaussian_smooth(x, 1, 1.0), x)
    ones = gaussian_smooth(torch.ones(1, 1, 5, 5, 5))
    side = (1 + math.exp(-0.5)) / (1 + 2 * math.exp(-0.5))  # one neighbour missing per axis at a face
    assert ones[0, 0, 0, 0, 0].item() == pytest.approx(side ** 3, rel=1e-5)
    assert ones[0, 0, 2, 2, 2].item() == pytest.approx(1.0, rel=1e-6)


def test_rs_terms_scores_and_pseudo_label_by_hand():
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 6, 6, 6) * 2 - 1
    psi = torch.randn(2, 3, 6, 6, 6) * 3
    for tau, size, sigma in ((1.0, 3, 1.0), (0.5, 5, 0.7)):
        torch.manual_seed(5)
        domain, klass = rs_terms(x0, psi, tau, size, sigma)
        torch.manual_seed(5)
        want = _hand_smooth(_hand_gumbel_softmax(x0, tau), size, sigma)
        torch.testing.assert_close(domain, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(klass, torch.softmax(psi, 1))
        torch.manual_seed(5)
        torch.testing.assert_close(rs_scores(x0, psi, tau, size, sigma), want + torch.softmax(psi, 1), rtol=1e-5,
                                   atol=1e-6)
        torch.manual_seed(5)
        label = rs_pseudo_label(x0, psi, tau, size, sigma)
        assert label.shape == (2, 1, 6, 6, 6) and label.dtype == torch.int64
        assert torch.equal(label, (want + torch.softmax(psi, 1)).argmax(1, keepdim=True))
        torch.manual_seed(5)
        torch.testing.assert_close(domain_unbiased_map(x0, tau, size, sigma), want, rtol=1e-5, atol=1e-6)
    # the soft Gumbel-softmax sums to one per voxel and is not one-hot; smoothing keeps the sum inside
    torch.manual_seed(1)
    d = domain_unbiased_map(x0, 1.0, 3, 1.0)
    torch.testing.assert_close(d.sum(1)[:, 1:-1, 1:-1, 1:-1], torch.ones(2, 4, 4, 4), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    soft = _hand_gumbel_softmax(x0, 1.0)
    assert ((soft > 0.01) & (soft < 0.99)).float().mean() > 0.5
    # a confident class-unbiased map outweighs a flat domain map; a confident x0 wins against a flat psi
    cls = torch.randint(0, 3, (2, 6, 6, 6))
    onehot = F.one_hot(cls, 3).movedim(-1, 1).float()
    assert torch.equal(rs_pseudo_label(torch.zeros_like(x0) - 1, onehot * 30)[:, 0], cls)
    big = onehot * 60 - 30  # a strongly peaked x0 (the Gumbel noise cannot overturn it): the smoothed one-hot
    lab = rs_pseudo_label(big, torch.zeros_like(psi))[:, 0]
    assert (lab == _hand_smooth(onehot).argmax(1)).float().mean() > 0.99


# ---- SVDA ---------------------------------------------------------------------------------------------------

def _only(batch, **on):
    ops = {name: torch.zeros(batch, dtype=torch.bool) for name in OPS}
    for name, mask in on.items():
        ops[name] = torch.as_tensor(mask, dtype=torch.bool)
    return ops


def test_svda_scaling_zooms_all_three_axes_about_the_centre():
    d, h, w = 8, 12, 16
    zz, yy, xx = _ramp(d, h, w)
    image = (0.5 * zz + 2.0 * yy + 3.0 * xx + 1.0)[None, None].repeat(2, 1, 1, 1, 1)
    params = SVDAParams(scale_range=(0.5, 0.5))
    out, _ = svda(image, None, params, _only(2, scaling=[True, False]))
    cz, cy, cx = (d - 1) / 2, (h - 1) / 2, (w - 1) / 2  # coordinates times s about the centre: zooming in
    want = 0.5 * (cz + 0.5 * (zz - cz)) + 2.0 * (cy + 0.5 * (yy - cy)) + 3.0 * (cx + 0.5 * (xx - cx)) + 1.0
    torch.testing.assert_close(out[0, 0], want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[1], image[1])  # the sample without the operation is untouched
    # the factor is drawn from scale_range
    torch.manual_seed(0)
    out, _ = svda(image.repeat(8, 1, 1, 1, 1), None, SVDAParams(scale_range=(0.7, 1.0)), _only(16, scaling=[True] * 16))
    slope = (out[:, 0, 4, 6, 9] - out[:, 0, 4, 6, 8]) / 3.0  # d/dx of the ramp = 3 s
    assert slope.min() >= 0.7 - 1e-3 and slope.max() <= 1.0 + 1e-3 and slope.max() - slope.min() > 0.1


def test_svda_rotation_is_rigid_in_the_axial_plane_within_the_range():
    d, h, w = 4, 16, 24  # H != W: rigid in voxels, not in normalised coordinates
    zz, yy, xx = _ramp(d, h, w)
    b = 24
    cx, cy = (w - 1) / 2, (h - 1) / 2
    img_x = xx[None, None].repeat(b, 1, 1, 1, 1)
    img_y = yy[None, None].repeat(b, 1, 1, 1, 1)
    img_z = zz[None, None].repeat(b, 1, 1, 1, 1)
    ops = _only(b, rotation=[True] * b)
    out = []
    for img in (img_x, img_y, img_z):
        torch.manual_seed(7)
        out.append(svda(img, None, SVDAParams(rotation_deg=15.0), ops)[0])
    ox, oy, oz = out
    inner = (slice(None), 0, slice(1, 3), slice(5, 11), slice(7, 17))
    dx, dy = (xx - cx)[inner[2:]], (yy - cy)[inner[2:]]
    angles = []
    for i in range(b):
        ex, ey = ox[i, 0][inner[2:]] - cx, oy[i, 0][inner[2:]] - cy
        # ex = cos a dx - sin a dy, ey = sin a dx + cos a dy
        cos = ((ex * dx + ey * dy).sum() / (dx ** 2 + dy ** 2).sum()).item()
        sin = ((ey * dx - ex * dy).sum() / (dx ** 2 + dy ** 2).sum()).item()
        assert cos ** 2 + sin ** 2 == pytest.approx(1.0, abs=2e-3)  # rigid, no scaling
        a = math.atan2(sin, cos)
        torch.testing.assert_close(ex, math.cos(a) * dx - math.sin(a) * dy, rtol=0, atol=2e-3)
        angles.append(math.degrees(a))
    torch.testing.assert_close(oz[inner], img_z[inner])  # depth untouched
    assert max(abs(a) for a in angles) <= 15.0 + 0.05
    assert min(angles) < -7 and max(angles) > 7  # both directions, over the range


def test_svda_geometry_moves_the_label_by_nearest_neighbour_and_intensity_ops_leave_it():
    torch.manual_seed(0)
    lab = torch.zeros(4, 1, 8, 16, 16, dtype=torch.long)
    lab[:, :, 2:6, 3:9, 4:12] = 2
    lab[:, :, 3:5, 5:7, 6:10] = 4  # classes {0, 2, 4}: a bilinear resampling would make 1s and 3s
    image = lab.float()
    img, out = svda(image, lab, SVDAParams(rotation_deg=15, scale_range=(0.7, 0.8)),
                    _only(4, rotation=[True] * 4, scaling=[True] * 4))
    assert out.dtype == torch.long and set(out.unique().tolist()) <= {0, 2, 4}
    assert not torch.equal(out, lab)
    assert ((img - out.float()).abs() < 1.0).float().mean() > 0.93  # image and label moved together
    for op in ("blur", "brightness", "contrast", "gamma"):
        img2, out2 = svda(image + 1.0, lab, SVDAParams(), _only(4, **{op: [True] * 4}))
        assert torch.equal(out2, lab), op
        assert not torch.allclose(img2, image + 1.0), op
    img3, none = svda(image, None, SVDAParams(), _only(4, rotation=[True] * 4))
    assert none is None


def test_svda_intensity_operations_by_their_definition():
    torch.manual_seed(0)
    b = 12
    base = (torch.rand(b, 1, 6, 6, 6) + 0.5)
    # brightness: x * m, m in the range, per sample
    out, _ = svda(base, None, SVDAParams(brightness_range=(0.7, 1.3)), _only(b, brightness=[True] * b))
    ratio = out / base
    per = ratio.flatten(1)
    torch.testing.assert_close(per, per[:, :1].expand_as(per), rtol=1e-5, atol=1e-6)
    assert per.min() >= 0.7 - 1e-5 and per.max() <= 1.3 + 1e-5 and per[:, 0].std() > 0.05
    # contrast: clip((x - mean) f + mean, min, max)
    out, _ = svda(base, None, SVDAParams(contrast_range=(0.7, 1.3)), _only(b, contrast=[True] * b))
    mean = base.mean(dim=(2, 3, 4), keepdim=True)
    f = ((out - mean) / (base - mean)).flatten(1).median(1).values.view(-1, 1, 1, 1, 1)
    assert f.min() >= 0.7 - 1e-4 and f.max() <= 1.3 + 1e-4
    lo, hi = base.amin(dim=(2, 3, 4), keepdim=True), base.amax(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(out, torch.minimum(torch.maximum((base - mean) * f + mean, lo), hi), rtol=1e-4,
                               atol=1e-5)
    # gamma: ((x - lo) / range) ** g back to the range, then the original mean and std
    out, _ = svda(base, None, SVDAParams(gamma_range=(0.7, 1.3)), _only(b, gamma=[True] * b))
    torch.testing.assert_close(out.mean(dim=(2, 3, 4)), base.mean(dim=(2, 3, 4)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.std(dim=(2, 3, 4)), base.std(dim=(2, 3, 4)), rtol=1e-4, atol=1e-5)
    u = (base - lo) / (hi - lo)
    gammas = torch.linspace(0.5, 1.5, 1001)
    for i in range(b):
        z = ((out[i] - out[i].mean()) / out[i].std()).flatten()
        errs = []
        for g in gammas:
            y = u[i].flatten() ** g
            errs.append(((y - y.mean()) / y.std() - z).abs().max())
        errs = torch.stack(errs)
        g_best = gammas[errs.argmin()].item()
        assert errs.min() < 1e-3 and 0.7 - 2e-3 <= g_best <= 1.3 + 2e-3, (i, g_best, errs.min())
    # blur: a normalised isotropic Gaussian (sigma in range), replicate border
    delta = torch.zeros(b, 1, 17, 17, 17)
    delta[:, :, 8, 8, 8] = 1.0
    out, _ = svda(delta, None, SVDAParams(blur_sigma=(0.7, 1.3)), _only(b, blur=[True] * b))
    torch.testing.assert_close(out.sum(dim=(1, 2, 3, 4)), torch.ones(b), rtol=1e-4, atol=1e-5)
    r = torch.arange(17).float() - 8
    for axis in (2, 3, 4):
        marg = out.sum(dim=[a for a in (1, 2, 3, 4) if a != axis])
        var = (marg * r ** 2).sum(1)
        sig = var.sqrt()
        assert sig.min() >= 0.68 and sig.max() <= 1.31, (axis, sig)
        if axis == 2:
            sig0 = sig
        else:
            torch.testing.assert_close(sig, sig0, rtol=1e-4, atol=1e-4)  # isotropic
    const, _ = svda(torch.full((2, 1, 6, 6, 6), 3.0), None, SVDAParams(), _only(2, blur=[True, True]))
    torch.testing.assert_close(const, torch.full((2, 1, 6, 6, 6), 3.0))  # replicate padding keeps a constant


def test_svda_draws_n_aug_distinct_operations_each_kept_with_probability_p():
    torch.manual_seed(0)
    n = 6000
    ops = draw_ops(n, SVDAParams(n_aug=2, p=0.5), torch.device("cpu"))
    mask = torch.stack([ops[o] for o in OPS], 1).float()
    assert mask.sum(1).max() <= 2
    assert mask.mean().item() == pytest.approx(2 / 6 * 0.5, abs=0.01)
    for j in range(6):  # each operation equally likely
        assert mask[:, j].mean().item() == pytest.approx(1 / 6, abs=0.02)
    full = torch.stack(list(draw_ops(500, SVDAParams(n_aug=3, p=1.0), torch.device("cpu")).values()), 1)
    assert torch.all(full.sum(1) == 3)
    m = _method(svda=False)
    x, y = torch.randn(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    xa, ya = m._augment(x, y)
    assert xa is x and ya is y
    m = _method(aug_prob=1.0, rotation_deg=0.0, scale_range=(0.5, 0.5), blur_sigma=(1.0, 1.0),
                brightness_range=(2.0, 2.0), contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), n_aug=6)
    zz, yy, xx = _ramp(8, 8, 8)
    img = (xx + 1.0)[None, None]
    out, _ = m._augment(img, torch.zeros(1, 1, 8, 8, 8, dtype=torch.long))
    # every op on: x coordinate halved about the centre, a blur (linear ramp unchanged inside), brightness x2
    assert out[0, 0, 4, 4, 3:6].tolist() == pytest.approx([2 * (3.5 + 0.5 * (i - 3.5) + 1) for i in (3, 4, 5)],
                                                          abs=2e-2)


# ---- review views and inference ----------------------------------------------------------------------------

def test_review_maps_are_the_terms_of_eq7_and_their_sum():
    torch.manual_seed(0)
    m = _method(num_classes=3, gumbel_tau=0.6, smooth_sigma=0.9, encoder_dropout=0.0, decoder_dropout=0.0)
    m.train()
    batch = torch.randn(1, 1, 32, 32, 32)
    torch.manual_seed(3)
    with torch.no_grad():
        maps = m._review_maps(batch)
        torch.manual_seed(3)
        x0 = m.ddim_x0(batch)
        klass = torch.softmax(m.net.psi(batch), 1)
        domain = _hand_smooth(_hand_gumbel_softmax(x0, 0.6), 3, 0.9)
    torch.testing.assert_close(maps["diffusion"], domain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["difficulty"], klass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["combined"], domain + klass, rtol=1e-5, atol=1e-5)


def test_pseudo_labels_probabilities_and_prediction_on_one_window():
    torch.manual_seed(0)
    m = _method(num_classes=3, encoder_dropout=0.0, decoder_dropout=0.0)
    m.train_step(*_step_batches_32(), 0)  # running statistics move away from (0, 1): train / eval differ
    volume = torch.randn(1, 32, 32, 32)
    buffers = {n: b.clone() for n, b in m.net.named_buffers()}
    m.eval()
    ref = copy.deepcopy(m.net).train()  # batch statistics, as training makes its targets
    with torch.no_grad():
        torch.manual_seed(5)
        x0 = _hand_ddim(lambda y, t: ref.denoise(volume[None], y, t).clamp(-1, 1), torch.randn(1, 3, 32, 32, 32),
                        [999, 500, 0], _sched_abar(m))
        klass = torch.softmax(ref.psi(volume[None]), 1)
        domain = _hand_smooth(_hand_gumbel_softmax(x0, 1.0))
    torch.manual_seed(5)
    views = m.pseudo_labels(volume)
    assert set(views) == {"diffusion", "difficulty", "combined"}
    for name, want in (("diffusion", domain), ("difficulty", klass), ("combined", domain + klass)):
        assert views[name].dtype == np.uint8
        agree = (views[name] == want[0].argmax(0).numpy()).mean()
        assert agree > 0.999, (name, agree)
    assert not m.net.training  # the caller's mode is restored
    assert all(b.track_running_stats for b in m.net.modules() if isinstance(b, torch.nn.BatchNorm3d))
    for n, b in m.net.named_buffers():
        assert torch.equal(b, buffers[n]), n  # running statistics neither used nor updated
    torch.manual_seed(5)
    prob = m.primary_probabilities(volume)
    torch.testing.assert_close(prob, 0.5 * (domain + klass)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prob.sum(0)[2:-2, 2:-2, 2:-2], torch.ones(28, 28, 28), rtol=1e-4, atol=1e-4)
    # prediction: D(theta) in eval mode (running statistics), not D(psi), not the combined view
    ev = copy.deepcopy(m.net).eval()
    with torch.no_grad():
        theta = ev.theta(volume[None]).argmax(1)[0].numpy()
        psi = ev.psi(volume[None]).argmax(1)[0].numpy()
    m.train()
    pred = m.predict(volume)
    assert pred.dtype == np.uint8 and (pred == theta).all() and (theta != psi).any()
    assert m.net.training
    # review_mode "eval": the networks in eval mode
    m.config.review_mode = "eval"
    with torch.no_grad():
        torch.manual_seed(5)
        x0e = _hand_ddim(lambda y, t: ev.denoise(volume[None], y, t).clamp(-1, 1), torch.randn(1, 3, 32, 32, 32),
                         [999, 500, 0], _sched_abar(m))
        klass_e = torch.softmax(ev.psi(volume[None]), 1)
    torch.manual_seed(5)
    views_e = m.pseudo_labels(volume)
    assert (views_e["difficulty"] == klass_e[0].argmax(0).numpy()).mean() > 0.999
    assert (views_e["difficulty"] != views["difficulty"]).any() or (x0e != x0).any()
    assert m.net.training


def _step_batches_32():
    x_l, y_l = _blobs(1, 3, (32, 32, 32), 1)
    x_u, _ = _blobs(1, 3, (32, 32, 32), 2)
    return {"image": x_l, "label": y_l}, {"image": x_u}


def test_checkpoint_state_keeps_the_drs_statistics():
    m = _method(num_classes=3)
    m.drs.update(torch.tensor([0.9, 0.4, 0.2]))
    m.drs.update(torch.tensor([0.8, 0.5, 0.1]))
    state = copy.deepcopy(m.state_dict())
    fresh = _method(num_classes=3)
    fresh.load_state_dict(state)
    for key in ("learn", "unlearn", "reverse", "weights", "last_dice"):
        assert torch.equal(getattr(fresh.drs, key), getattr(m.drs, key)), key
    assert fresh.drs.count == 2
    torch.testing.assert_close(fresh.drs.update(torch.tensor([0.7, 0.7, 0.7])),
                               m.drs.update(torch.tensor([0.7, 0.7, 0.7])))


# ---- the shared scoring / review path A&D's views go through ---------------------------------------------------

def _views_of_known_overlap():
    """Three views of a 4 x 6 x 6 volume with known per-class overlaps (class 1: 8 vs 8 / 4 shared, ...)."""
    a = np.zeros((4, 6, 6), np.uint8)
    b = np.zeros_like(a)
    c = np.zeros_like(a)
    a[0, :2, :4] = 1  # 8 voxels of class 1
    b[0, :2, 2:6] = 1  # 8 voxels, 4 shared with a
    c[0, :2, :4] = 1  # = a
    a[2, :3, :3] = 2  # 9 voxels of class 2
    b[2, :3, :3] = 2  # = a
    c[3, :1, :1] = 2  # 1 voxel, none shared
    return {"diffusion": a, "difficulty": b, "combined": c}


def test_agreement_dice_per_class_and_scores_by_hand():
    from backend.engine.metrics import agreement, dice_per_class
    from backend.engine.scores import (case_scores, confidence, cross_agreement, mean_dice, normalised_entropy,
                                       slab_scores, slabs)

    v = _views_of_known_overlap()
    a, b, c = v["diffusion"], v["difficulty"], v["combined"]
    np.testing.assert_allclose(dice_per_class(a, b, 3), [2 * 4 / 16, 1.0])
    np.testing.assert_allclose(dice_per_class(a, c, 3), [1.0, 0.0])
    np.testing.assert_allclose(dice_per_class(np.zeros_like(a), np.zeros_like(a), 3), [1.0, 1.0])  # both empty
    np.testing.assert_allclose(dice_per_class(a, np.zeros_like(a), 3), [0.0, 0.0])  # empty in one
    out = agreement(v, 3, {1: "lv", 2: "rv"})
    pairs = out["agreement"]
    assert list(pairs) == ["diffusion|difficulty", "diffusion|combined", "difficulty|combined"]
    assert pairs["diffusion|difficulty"] == {"per_class": {"lv": 0.5, "rv": 1.0}, "mean": 0.75}
    assert pairs["diffusion|combined"] == {"per_class": {"lv": 1.0, "rv": 0.0}, "mean": 0.5}
    assert pairs["difficulty|combined"]["mean"] == pytest.approx(0.25)
    assert out["agreement_mean"] == pytest.approx((0.75 + 0.5 + 0.25) / 3, abs=1e-6)
    assert out["agreement_worst"] == 0.0
    single = agreement({"combined": c}, 3)
    assert single["agreement_mean"] is None and single["agreement_worst"] is None
    assert mean_dice(a, b, 3) == pytest.approx(0.75) and mean_dice(a, a, 1) == 1.0
    p = torch.tensor([[1.0, 0.5, 0.25], [0.0, 0.5, 0.25], [0.0, 0.0, 0.25], [0.0, 0.0, 0.25]])
    torch.testing.assert_close(normalised_entropy(p), torch.tensor([0.0, 0.5, 1.0]), rtol=1e-5, atol=1e-6)
    assert confidence(np.array([0.2, 0.4, 0.9]), np.array([1, 2, 0])) == pytest.approx(0.7)
    assert confidence(np.ones(3), np.zeros(3)) is None
    assert cross_agreement(a, [b, c], 3) == pytest.approx((0.75 + 0.5) / 2) and cross_agreement(a, [], 3) is None
    entropy = np.full(a.shape, 0.25, np.float32)
    s = case_scores(v, "combined", 3, entropy=entropy, tta_label=a)
    assert s["tta_agreement"] == pytest.approx(0.5) and s["confidence"] == pytest.approx(0.75)
    assert s["agreement_mean"] == out["agreement_mean"]
    assert case_scores(v, "combined", 3)["tta_agreement"] is None
    assert slabs(10, 3) == [(0, 3), (3, 7), (7, 10)] and slabs(2, 4) == [(0, 1), (1, 2)]
    part = slab_scores(v, "combined", 3, 0, 1, entropy=entropy, tta_label=a, others=[b])
    assert part["mean"] == pytest.approx((0.75 + 1.0 + 0.75) / 3, abs=1e-6)  # class 2 empty in slice 0: 1
    assert part["cross"] == pytest.approx(0.75) and part["tta"] == pytest.approx(1.0)


def test_majority_disagreement_and_worst_slice_by_hand():
    from backend.review.views import (ALL_METHODS, disagreement, disagreement_by_method, majority_vote,
                                      slice_profile, worst_slice)

    v = _views_of_known_overlap()
    a, b, c = v["diffusion"], v["difficulty"], v["combined"]
    mv = majority_vote([a, b, c], 3)
    assert mv[0, 0, 0] == 1 and mv[0, 0, 5] == 0 and mv[2, 0, 0] == 2 and mv[3, 0, 0] == 0
    tie = majority_vote([np.array([[[1]]], np.uint8), np.array([[[2]]], np.uint8)], 3)
    assert tie[0, 0, 0] == 1  # ties go to the lower class
    assert majority_vote([np.array([[[2]]], np.uint8), np.array([[[0]]], np.uint8)], 3)[0, 0, 0] == 0
    d = disagreement([a, b, c])
    assert d.dtype == np.uint8
    want = ((a != b) | (a != c)).astype(np.uint8)
    np.testing.assert_array_equal(d, want)
    np.testing.assert_array_equal(disagreement([a, a, b]), (a != b).astype(np.uint8))
    prof = slice_profile(d)
    np.testing.assert_array_equal(prof, [int(want[z].sum()) for z in range(4)])
    assert prof.tolist() == [8, 0, 9, 1]
    assert worst_slice(prof) == 2 and worst_slice([0, 3, 3]) == 1 and worst_slice([0, 0]) is None
    by = disagreement_by_method({"genericssl:diffusion": a, "genericssl:combined": c, "diffcl:x": b})
    np.testing.assert_array_equal(by["genericssl"], (a != c).astype(np.uint8))
    assert "diffcl" not in by
    np.testing.assert_array_equal(by[ALL_METHODS], want)


def test_review_queue_order_and_default_runs(tmp_path):
    import json

    from backend.project import Project
    from backend.review.queue import default_runs, sort_review_queue

    rows = [{"case": "a", "labeled": False, "scores": {"genericssl": {"cross": 0.9}, "diffcl": {"cross": 0.4}}},
            {"case": "b", "labeled": False, "scores": {"genericssl": {"cross": 0.6}}},
            {"case": "c", "labeled": True, "scores": {"genericssl": {"cross": 0.1}}},
            {"case": "d", "labeled": False, "scores": {}},
            {"case": "e", "labeled": False, "scores": {"genericssl": {"cross": 0.4}}}]
    assert [r["case"] for r in sort_review_queue(rows, "cross")] == ["a", "e", "b", "d", "c"]
    with pytest.raises(KeyError):
        sort_review_queue(rows, "nope")
    project = Project.create(tmp_path / "p", labels={0: "background", 1: "lv"})

    def run(name, dice, pseudo):
        model = project.semiseg / "models" / "genericssl" / name
        model.mkdir(parents=True)
        (model / "checkpoint.pt").write_bytes(b"")
        (model / "run.json").write_text(json.dumps({"best": {"dice": dice}}))
        if pseudo:
            out = project.semiseg / "pseudo" / "genericssl" / name
            out.mkdir(parents=True)
            (out / "scores.json").write_text(json.dumps({"cases": {}}))

    run("20260101T000000Z", 0.8, True)
    run("20260102T000000Z", 0.5, True)
    assert default_runs(project) == {"genericssl": "20260101T000000Z"}  # the best, not the newest
    run("20260103T000000Z", 0.9, False)  # a better model without pseudo labels: the newest with them
    assert default_runs(project) == {"genericssl": "20260102T000000Z"}
