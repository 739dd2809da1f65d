"""Behaviour tests of DiffRect: values checked on constructed inputs whose answer is known (issue 23).

Every expected value is computed here, independently of the method's code (numpy / explicit torch arithmetic):
the loss terms (CE + Dice with its softmax, one-hot, reduction and mask), the confidence rule, the calibration
guidance and its running mean, the schedules, the latent diffusion pieces, the perturbations, dropout, the
BatchNorm folding, one whole training step (each term, its weight in the total, and the gradients it sends to
each network) and the review views (weak / strong / rectified) with predict / inference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backend.methods.diffrect.method as method_module
from backend.methods.diffrect import aug
from backend.methods.diffrect.config import DiffRectConfig
from backend.methods.diffrect.dropout import FastDropout, ssl4mis_dropout, use_fast_dropout
from backend.methods.diffrect.fuse import fused_for_inference
from backend.methods.diffrect.lcc import (ConvBlock, SemanticColoring, calibration_guidance, label_overlap,
                                          semantic_palette)
from backend.methods.diffrect.lfr import latent_loss
from backend.methods.diffrect.method import DiffRect, confident_labels, pad_to_multiple
from backend.methods.diffrect.model import Rectifier
from backend.methods.layers.diffusion import ddim_reverse, ddim_timesteps, q_sample, sample_timesteps
from backend.methods.layers.embeddings import SinusoidalEmbedding
from backend.methods.layers.unet2d import UNET2D_FEATURES, unet2d
from backend.methods.schedules import gaussian_warmup, sigmoid_rampup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3  # classes of every constructed example


# ---- independent references ---------------------------------------------------------------------------------------

def np_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_ce_dice(logits, target, mask=None) -> float:
    """CE (mean over every pixel) + the V-Net Dice loss over the whole batch, background included, squared
    terms, smooth 1e-5 (the published DiceLoss); masked-out pixels add nothing."""
    logits = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    k = logits.shape[1]
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -np.take_along_axis(logp, target[:, None], 1)[:, 0]
    p = np.exp(logp)
    onehot = np.eye(k)[target].transpose(0, 3, 1, 2)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64)
        ce, p, onehot = ce * m, p * m[:, None], onehot * m[:, None]
    inter = (p * onehot).sum((0, 2, 3))
    den = (p ** 2).sum((0, 2, 3)) + (onehot ** 2).sum((0, 2, 3))
    return float(ce.mean() + np.mean(1.0 - (2 * inter + 1e-5) / (den + 1e-5)))


def torch_ce_dice(logits: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    """The same formula in float64 torch arithmetic (for gradients)."""
    logits = logits.double()
    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
    ce = -logp.gather(1, target[:, None])[:, 0]
    p = logp.exp()
    onehot = torch.eye(logits.shape[1], dtype=torch.float64)[target].permute(0, 3, 1, 2)
    if mask is not None:
        m = mask.double()
        ce, p, onehot = ce * m, p * m[:, None], onehot * m[:, None]
    inter = (p * onehot).sum((0, 2, 3))
    den = (p ** 2).sum((0, 2, 3)) + (onehot ** 2).sum((0, 2, 3))
    return ce.mean() + (1.0 - (2 * inter + 1e-5) / (den + 1e-5)).mean()


def np_rule(prob: np.ndarray, thresh: float, rule: str):
    if rule == "official":
        passing = (prob - prob.min(1, keepdims=True)) / prob.max(1, keepdims=True) > thresh
        return (prob * passing).argmax(1), passing.any(1)
    return prob.argmax(1), prob.max(1) >= thresh


def np_dice(a: np.ndarray, b: np.ndarray, k: int = K) -> np.ndarray:
    """Per-sample mean over all classes of (2|A&B| + s) / (|A| + |B| + s)."""
    out = []
    for x, y in zip(a, b):
        out.append(np.mean([(2 * ((x == c) & (y == c)).sum() + 1e-5) / ((x == c).sum() + (y == c).sum() + 1e-5)
                            for c in range(k)]))
    return np.array(out)


def np_cosine_abar(steps: int, s: float = 0.008) -> np.ndarray:
    x = np.linspace(0, steps, steps + 1)
    f = np.cos((x / steps + s) / (1 + s) * np.pi / 2) ** 2
    f = f / f[0]
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


def np_sinusoid(values: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = values[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], 1)


# Logit prototypes (class order permuted per pixel) whose confidence values lie far from every threshold:
# official rule (p - min) / max: 0.98, 0.5, 0.98 (max p 0.68), 0.98, 0.2, 0.865 (max p 0.71), 0.918 (max p 0.846).
_PROTOS = np.array([[3.0, 0.0, -1.0], [0.5, 0.0, -0.2], [2.0, 1.2, -2.0], [4.0, 0.0, 0.0], [1.0, 0.9, 0.8],
                    [1.5, 0.2, -0.5], [2.5, 0.2, 0.0]])
_PERMS = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1], [1, 2, 0], [2, 0, 1]])


def proto_logits(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    proto = _PROTOS[rng.integers(0, len(_PROTOS), (n, h, w))]  # [n, h, w, 3]
    perm = _PERMS[rng.integers(0, len(_PERMS), (n, h, w))]
    logits = np.take_along_axis(proto, perm, -1)
    return torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).float()


class ProbeSeg(torch.nn.Module):
    """A segmentation net with prescribed logits (times one parameter, so the losses have a gradient)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.logits[: x.shape[0]] * self.scale


class Recorder(torch.nn.Module):
    """Wraps a network; keeps every call's arguments and output."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args):
        out = self.inner(*args)
        self.calls.append((args, out))
        return out


def spy(monkeypatch, obj, name: str) -> list:
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def tiny(**overrides) -> DiffRect:
    torch.manual_seed(0)
    return DiffRect(DiffRect.make_config("tiny", **{"num_classes": K, **overrides}))


def batch(bl=2, bu=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (bl, 1, size, size), generator=g)
    return ({"image": torch.randn(bl, 1, size, size, generator=g) + labels.float(), "label": labels},
            {"image": torch.randn(bu, 1, size, size, generator=g)})


# ---- losses ---------------------------------------------------------------------------------------------------------

def test_ce_dice_equals_the_hand_computed_value_with_and_without_mask():
    torch.manual_seed(3)
    method = tiny()
    logits = torch.randn(2, K, 3, 5) * 2  # B != K, H != W: a wrong softmax axis or permutation shows
    target = torch.randint(0, K, (2, 3, 5))
    mask = torch.rand(2, 3, 5) > 0.4
    assert float(method.ce_dice(logits, target)) == pytest.approx(np_ce_dice(logits.numpy(), target.numpy()),
                                                                  rel=1e-5)
    assert float(method.ce_dice(logits, target, mask)) == pytest.approx(
        np_ce_dice(logits.numpy(), target.numpy(), mask.numpy()), rel=1e-5)
    # masked pixels send no gradient; unmasked ones do
    leaf = logits.clone().requires_grad_(True)
    method.ce_dice(leaf, target, mask).backward()
    grad = leaf.grad.abs().sum(1)
    assert float(grad[~mask].max()) == 0.0 and bool((grad[mask] > 0).all())
    # the gradient is that of the formula
    ref = logits.clone().double().requires_grad_(True)
    torch_ce_dice(ref, target, mask).backward()
    assert torch.allclose(leaf.grad.double(), ref.grad, atol=1e-6)
    # a perfect confident prediction costs (almost) nothing; CE is averaged over all pixels
    perfect = 30.0 * F.one_hot(target, K).permute(0, 3, 1, 2).float()
    assert float(method.ce_dice(perfect, target)) < 1e-6
    assert float(method.dice.batch) and method.dice.include_background and method.dice.squared_pred


def test_latent_loss_is_the_mean_squared_error():
    a, b = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    assert float(latent_loss(a, b)) == pytest.approx(float(((a.double() - b.double()) ** 2).mean()), rel=1e-6)


def test_confidence_rule_boundaries_and_background():
    # thresh 0.5: (p - min) / max exactly 0.5 does not pass (strict); max p exactly 0.5 passes fixmatch (>=)
    prob = torch.tensor([[0.25, 0.25, 0.5], [0.125, 0.125, 0.75], [0.5, 0.25, 0.25], [0.375, 0.5, 0.125]])
    prob = prob.T[None, :, :, None]
    labels, conf = confident_labels(prob, 0.5, "official")
    # pixel 3: (0.375 - 0.125) / 0.5 = 0.5 fails, (0.5 - 0.125) / 0.5 = 0.75 passes
    assert labels[0, :, 0].tolist() == [0, 2, 0, 1] and conf[0, :, 0].tolist() == [False, True, False, True]
    labels, conf = confident_labels(prob, 0.5, "fixmatch")
    assert labels[0, :, 0].tolist() == [2, 2, 0, 1] and conf[0, :, 0].tolist() == [True, True, True, True]
    labels, conf = confident_labels(prob, 0.6, "fixmatch")
    assert conf[0, :, 0].tolist() == [False, True, False, False]
    # random prototypes against the numpy rule
    p = torch.softmax(proto_logits(3, 5, 7, 1), 1)
    for rule in ("official", "fixmatch"):
        lab, cf = confident_labels(p, 0.8, rule)
        nl, nc = np_rule(p.double().numpy(), 0.8, rule)
        assert np.array_equal(lab.numpy(), nl) and np.array_equal(cf.numpy(), nc)


# ---- schedules, guidance, EMA ----------------------------------------------------------------------------------------

def test_ramp_ups_and_learning_rate_at_given_steps():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(30, 100) == pytest.approx(math.exp(-5.0 * 0.49))
    assert sigmoid_rampup(250, 100) == 1.0 and sigmoid_rampup(-5, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(3, 0) == 1.0
    assert gaussian_warmup(25, 100, 2.0) == pytest.approx(2.0 * math.exp(-5.0 * 0.5625))
    method = tiny(consistency=0.3, consistency_rampup=40.0)
    assert method.consistency_weight(10) == pytest.approx(0.3 * math.exp(-5.0 * 0.75 ** 2))
    assert method.consistency_weight(40) == pytest.approx(0.3)
    m = tiny(lr=0.02, max_steps=200)
    assert m.lr_at(0) == pytest.approx(0.02)
    assert m.lr_at(50) == pytest.approx(0.02 * 0.75 ** 0.9)
    assert m.lr_at(500) == pytest.approx(0.02 * (1 / 200) ** 0.9)


def test_calibration_guidance_by_hand():
    a = torch.tensor([[[0, 0, 1, 1], [2, 2, 1, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]]])
    b = torch.tensor([[[0, 1, 1, 1], [2, 0, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 0]]])
    dice = np_dice(a.numpy(), b.numpy())  # sample 2 has no class 2 in either map: that class scores 1
    jac = []
    for x, y in zip(a.numpy(), b.numpy()):
        jac.append(np.mean([(((x == c) & (y == c)).sum() + 1e-5) / (((x == c) | (y == c)).sum() + 1e-5)
                            for c in range(K)]))
    assert np.allclose(calibration_guidance(a, b, K, "dice").numpy(), dice, atol=1e-6)
    assert np.allclose(calibration_guidance(a, b, K, "jaccard").numpy(), jac, atol=1e-6)
    assert np.allclose(calibration_guidance(a, b, K, "both").numpy(), dice + np.array(jac), atol=1e-6)
    assert calibration_guidance(a, b, K, "fixed").tolist() == [0.5, 0.5]
    assert calibration_guidance(a, b, K, "none").tolist() == [0.0, 0.0]
    r = calibration_guidance(a.repeat(200, 1, 1), b.repeat(200, 1, 1), K, "random")
    assert 0.0 <= float(r.min()) and float(r.max()) < 1.0 and abs(float(r.mean()) - 0.5) < 0.1
    assert np.allclose(label_overlap(a, a, K)[0].numpy(), 1.0)
    with pytest.raises(ValueError):
        calibration_guidance(a, b, K, "dicey")


def test_tau_running_mean_and_inference_guidance():
    rect = Rectifier(K, 1, bsem_channels=(4, 4, 4, 4, 8), bsem_dropout=0.0, denoiser_channels=(8, 8), emb_dim=8,
                     emb_hidden=8)
    assert float(rect.inference_tau(2, torch.device("cpu"))[0]) == 0.5  # before any labeled batch
    rect.update_tau_ema(torch.tensor([0.1, 0.3]), 0.9)  # first: the value itself (the mean of the batch)
    assert float(rect.tau_ema) == pytest.approx(0.2)
    rect.update_tau_ema(torch.tensor([0.7, 0.7]), 0.9)
    assert float(rect.tau_ema) == pytest.approx(0.9 * 0.2 + 0.1 * 0.7)
    assert rect.inference_tau(3, torch.device("cpu")).tolist() == pytest.approx([0.25] * 3)


def test_tau_embedding_is_the_scaled_sinusoid():
    emb = SinusoidalEmbedding(8, 6, scale=999.0)
    values = torch.tensor([0.0, 0.25, 0.9])
    with torch.no_grad():
        expected = emb.mlp(torch.from_numpy(np_sinusoid(values.double().numpy() * 999.0, 8)).float())
        assert torch.allclose(emb(values), expected, atol=1e-4)
    method = tiny()
    assert method.rect.tau_embed.scale == 999.0 and method.rect.use_guidance
    assert tiny(guidance="none").rect.embed_tau(torch.tensor([0.5])) is None


# ---- diffusion pieces ------------------------------------------------------------------------------------------------

def test_schedule_timesteps_and_q_sample():
    method = tiny()
    abar = np_cosine_abar(10)
    assert np.allclose(method.alphas_cumprod.double().numpy(), abar, atol=1e-6)
    assert method.timesteps == [9, 0]
    assert ddim_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(10, 1) == [9] and ddim_timesteps(10, 3) == [9, 4, 0]
    for bad in (0, 11):
        with pytest.raises(ValueError):
            ddim_timesteps(10, bad)
    torch.manual_seed(0)
    t = sample_timesteps(method.ddpm, 3000, torch.device("cpu"))
    assert set(t.tolist()) == set(range(10))  # uniform over [0, T): both ends reached, nothing outside
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    tt = torch.tensor([0, 4, 9])
    out = q_sample(method.ddpm, x0, tt, noise)
    for i, ti in enumerate(tt.tolist()):
        assert torch.allclose(out[i], math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * noise[i], atol=1e-5)
    torch.manual_seed(5)
    drawn = q_sample(method.ddpm, x0, tt)
    torch.manual_seed(5)
    assert torch.allclose(drawn, q_sample(method.ddpm, x0, tt, torch.randn_like(x0)))


def test_ddim_reverse_three_steps_by_hand():
    abar = np_cosine_abar(10)
    ac = torch.tensor(abar, dtype=torch.float32)
    seen = []

    def predict(x, t):
        seen.append(t.tolist())
        return 0.5 * x - 0.05 * t.float().view(-1, 1, 1, 1)

    x_T = torch.randn(2, 2, 3, 3)
    steps = [9, 5, 0]
    for eta in (0.0, 1.0):
        seen.clear()
        gen, gen2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        out = ddim_reverse(ac, predict, x_T, steps, eta, gen)
        assert seen == [[9, 9], [5, 5], [0, 0]]
        x = x_T.double()
        for i, t in enumerate(steps):
            x0 = 0.5 * x - 0.05 * t
            if i == len(steps) - 1:
                break
            a_t, a_s = abar[t], abar[steps[i + 1]]
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0)) * eps
            if eta > 0:
                x = x + sigma * torch.randn(x_T.shape, generator=gen2).double()
        assert torch.allclose(out.double(), x0, atol=1e-5)


def _small_rect(**kw) -> Rectifier:
    torch.manual_seed(0)
    return Rectifier(K, 1, bsem_channels=(4, 4, 8, 8, 8), bsem_dropout=0.0, denoiser_channels=(8, 8), emb_dim=8,
                     emb_hidden=8, **kw).eval()


def test_rectify_starts_from_seeded_noise_and_clamps_every_prediction(monkeypatch):
    rect = _small_rect()
    abar = np_cosine_abar(10)
    ac = torch.tensor(abar, dtype=torch.float32)
    z = torch.randn(2, 8, 4, 4)
    skips = [torch.randn(2, c, s, s) for c, s in ((4, 64), (4, 32), (8, 16), (8, 8))]
    emb = torch.randn(2, 8)
    inputs = []

    def denoiser(z_t, t, cond):
        inputs.append((z_t.clone(), t.tolist(), cond))
        return 4.0 * z_t + cond

    monkeypatch.setattr(rect.denoiser, "forward", denoiser)
    decoded = []
    monkeypatch.setattr(rect.decoder, "forward", lambda latent, s, e: decoded.append((latent, s, e)) or latent[:, :K])
    for clamp in (0.5, None):
        inputs.clear()
        out = rect.rectify(z, skips, emb, ac, [9, 4, 0], 0.0, torch.Generator().manual_seed(7), clamp)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        assert torch.equal(inputs[0][0], noise)  # r^T ~ N(0, I), from the given generator
        assert [i[1] for i in inputs] == [[9, 9], [4, 4], [0, 0]] and all(i[2] is z for i in inputs)
        x = noise.double()
        steps = [9, 4, 0]
        for i, t in enumerate(steps):
            x0 = 4.0 * x + z.double()
            if clamp is not None:
                x0 = x0.clamp(-clamp, clamp)
            if i == 2:
                break
            a_t, a_s = abar[t], abar[steps[i + 1]]
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
            assert torch.allclose(inputs[i + 1][0].double(), x, atol=1e-4)
        latent, s, e = decoded[-1]
        assert torch.allclose(latent.double(), x0, atol=1e-4) and s is skips and e is emb
        assert torch.equal(out, latent[:, :K])
        assert (float(latent.abs().max()) <= 0.5 + 1e-6) == (clamp is not None)


# ---- networks: each forward against its definition -------------------------------------------------------------------

def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _block(b: ConvBlock, x, emb=None):
    h = b.conv0(x)
    if emb is not None and b.emb is not None:
        h = h + b.emb[1](F.silu(emb))[:, :, None, None]
    return b.conv1(h)


@torch.no_grad()
def test_lcc_and_lfr_networks_follow_their_definitions():
    rect = _small_rect()
    _randomise_bn(rect)
    rect.eval()
    x = torch.randn(2, 1, 64, 64)
    labels = torch.randint(0, K, (2, 64, 64))
    # colouring: pixel (b, h, w) gets palette[label], channels first; [B, 1, H, W] labels too
    colored = rect.coloring(labels)
    assert torch.equal(colored.permute(0, 2, 3, 1), semantic_palette(K)[labels])
    assert torch.equal(SemanticColoring(K)(labels[:, None]), colored)
    # image encoder: block 0 on the image, then max-pool and block k
    feats = rect.image_encoder(x)
    h = x
    for k, blk in enumerate(rect.image_encoder.blocks):
        h = _block(blk, h if k == 0 else F.max_pool2d(h, 2))
        assert torch.allclose(feats[k], h, atol=1e-5)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4]
    # B_sem: [image, colours] concatenated, tau embedding in every block, image features added stage by stage
    emb = rect.embed_tau(torch.tensor([0.2, 0.9]))
    z, skips = rect.encode(labels, x, feats, emb)
    h = torch.cat([x, colored], 1)
    ref_skips = []
    for k, blk in enumerate(rect.bsem.blocks):
        h = _block(blk, h if k == 0 else F.max_pool2d(h, 2), emb) + feats[k]
        ref_skips.append(h)
    assert torch.allclose(z, h, atol=1e-5) and len(skips) == 4
    assert all(torch.allclose(s, r, atol=1e-5) for s, r in zip(skips, ref_skips[:4]))
    # the tau embedding reaches the latent
    z2, _ = rect.encode(labels, x, feats, rect.embed_tau(torch.tensor([0.7, 0.1])))
    assert not torch.allclose(z, z2, atol=1e-4)
    # denoiser: fuse [z_t, cond], two downs, two ups with skips, 1x1 out; time embedding in every block
    d = rect.denoiser
    z_t, cond, t = torch.randn_like(z), torch.randn_like(z), torch.tensor([2, 8])
    te = d.time_embed(t)
    h0 = d.fuse(torch.cat([z_t, cond], 1))
    h1 = _block(d.down1, F.max_pool2d(h0, 2), te)
    h2 = _block(d.down2, F.max_pool2d(h1, 2), te)
    u1 = _block(d.dec1, torch.cat([h1, d.up2(h2)], 1), te)
    u0 = _block(d.dec0, torch.cat([h0, d.up1(u1)], 1), te)
    assert torch.allclose(d(z_t, t, cond), d.out(u0), atol=1e-5)
    assert not torch.allclose(d(z_t, torch.tensor([0, 0]), cond), d.out(u0), atol=1e-4)  # t matters
    # decoder: the deepest skip first, [skip, up(x)], the tau embedding, a 3x3 output conv
    dec = rect.decoder
    h = z
    for up, blk, skip in zip(dec.ups, dec.blocks, reversed(skips)):
        h = _block(blk, torch.cat([skip, up(h)], 1), emb)
    assert torch.allclose(dec(z, skips, emb), dec.out(h), atol=1e-5)
    assert dec.out.kernel_size == (3, 3) and dec.out.out_channels == K


def test_rectifier_wiring():
    rect = Rectifier(4, 2, bsem_channels=(4, 4, 8, 8, 12), bsem_dropout=(0.0, 0.1, 0.0, 0.0, 0.2),
                     denoiser_channels=(16, 20), emb_dim=6, emb_hidden=10, guidance_scale=50.0)
    assert rect.tau_embed.scale == 50.0 and rect.tau_embed.out_dim == 10 and rect.tau_embed.dim == 6
    assert rect.denoiser.fuse.in_channels == 24 and rect.denoiser.out.out_channels == 12
    assert rect.bsem.blocks[0].conv0[0].in_channels == 3 + 2 and rect.image_encoder.blocks[0].conv0[0].in_channels == 2
    assert rect.decoder.out.out_channels == 4 and rect.coloring.palette.shape == (4, 3)
    drops = [[m.p for m in blk.modules() if isinstance(m, FastDropout)] for blk in rect.bsem.blocks]
    assert drops == [[], [0.1], [], [], [0.2]]
    assert float(rect.tau_ema) == -1.0


# ---- dropout and BatchNorm folding -----------------------------------------------------------------------------------

def test_fast_dropout_threshold_and_scale_exactly(monkeypatch):
    drop = FastDropout(0.25)
    assert drop.threshold == 16384 and drop.scale == pytest.approx(1 / 0.75)
    cut = -32768 + 16384
    bits = torch.tensor([cut - 1, cut, cut + 1, -32768, 32767, 0, cut - 2, 100], dtype=torch.int16)
    words = bits.view(torch.int64)  # 8 int16 -> 2 int64
    monkeypatch.setattr(torch, "randint", lambda *a, **k: words.clone())
    x = torch.arange(1.0, 9.0)
    out = drop.train()(x)
    keep = (bits >= cut).numpy()
    assert np.allclose(out.numpy(), np.where(keep, x.numpy() / 0.75, 0.0))
    monkeypatch.undo()
    assert torch.equal(drop.eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    torch.manual_seed(0)
    big = torch.ones(4, 8, 64, 64).to(memory_format=torch.channels_last)
    out = FastDropout(0.3).train()(big)
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.005
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - round(0.3 * 65536) / 65536)))
    with pytest.raises(ValueError):
        FastDropout(1.0)
    net = use_fast_dropout(torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Sequential(torch.nn.Dropout(0.4))))
    assert [m.p for m in net.modules() if isinstance(m, FastDropout)] == [0.2, 0.4]


def test_ssl4mis_dropout_one_per_encoder_level():
    net = ssl4mis_dropout(unet2d(1, K, dropout=0.1), (0.01, 0.02, 0.03, 0.04, 0.06))
    drops = {n: m.p for n, m in net.named_modules() if isinstance(m, (FastDropout, torch.nn.Dropout))}
    assert drops == {"conv_0.conv_0.adn.D": 0.01, "down_1.convs.conv_0.adn.D": 0.02, "down_2.convs.conv_0.adn.D": 0.03,
                     "down_3.convs.conv_0.adn.D": 0.04, "down_4.convs.conv_0.adn.D": 0.06}
    uniform = ssl4mis_dropout(unet2d(1, K, dropout=0.1), 0.2)
    assert sorted(m.p for m in uniform.modules() if isinstance(m, FastDropout)) == [0.2] * 5
    with pytest.raises(ValueError):
        ssl4mis_dropout(unet2d(1, K, dropout=0.1), (0.1, 0.2))


@torch.no_grad()
def test_batchnorm_folding_keeps_each_network_and_leaves_it_alone():
    method = tiny()
    for net in (method.seg, method.rect):
        _randomise_bn(net, 1)
    method.seg.train()
    fused = fused_for_inference(method.seg)
    assert method.seg.training and not fused.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in method.seg.modules())
    assert n_bn > 10
    x = torch.randn(2, 1, 64, 64)
    method.seg.eval()
    assert torch.allclose(fused(x), method.seg(x), atol=1e-4)
    rect = method.rect.eval()
    frect = fused_for_inference(rect)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frect.modules())
    feats, ffeats = rect.image_encoder(x), frect.image_encoder(x)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(feats, ffeats))
    lab = torch.randint(0, K, (2, 64, 64))
    emb = rect.embed_tau(torch.tensor([0.3, 0.6]))
    z, skips = rect.encode(lab, x, feats, emb)
    assert torch.allclose(z, frect.encode(lab, x, ffeats, emb)[0], atol=1e-4)
    t = torch.tensor([1, 6])
    assert torch.allclose(rect.denoiser(z, t, z), frect.denoiser(z, t, z), atol=1e-4)
    assert torch.allclose(rect.decoder(z, skips, emb), frect.decoder(z, skips, emb), atol=1e-4)


# ---- perturbations --------------------------------------------------------------------------------------------------

def _pixel_matrix(grid: torch.Tensor, h: int, w: int) -> np.ndarray:
    """The 2x2 linear part of a grid in pixel units (output pixel -> input pixel)."""
    g = grid.double().numpy()
    gx = (g[..., 0] + 1) * w / 2  # input pixel coordinates
    gy = (g[..., 1] + 1) * h / 2
    dxdj = gx[:, 0, 1] - gx[:, 0, 0]
    dydj = gy[:, 0, 1] - gy[:, 0, 0]
    dxdi = gx[:, 1, 0] - gx[:, 0, 0]
    dydi = gy[:, 1, 0] - gy[:, 0, 0]
    return np.stack([np.stack([dxdj, dxdi], -1), np.stack([dydj, dydi], -1)], -2)  # [B, 2, 2]


def test_weak_grid_is_a_pixel_rotation_with_integer_degrees_and_the_given_rates():
    torch.manual_seed(0)
    n = 4000
    grid = aug.weak_grid(n, 6, 10, torch.device("cpu"), flip_p=0.3, rotate_p=0.6, max_angle=90.0)
    m = _pixel_matrix(grid, 6, 10)
    assert np.allclose(m @ m.transpose(0, 2, 1), np.eye(2), atol=1e-4)  # a rotation in pixels (non-square image)
    det = np.linalg.det(m)
    assert abs(float((det < 0).mean()) - 2 * 0.3 * 0.7) < 0.03
    # the grid's centre stays the centre
    assert np.allclose(grid.mean((1, 2)).numpy(), 0.0, atol=1e-5)
    # without flips: angles in whole degrees in [0, 90), rotated with rate 0.6
    grid = aug.weak_grid(n, 6, 10, torch.device("cpu"), flip_p=0.0, rotate_p=0.6, max_angle=90.0)
    m = _pixel_matrix(grid, 6, 10)
    assert np.allclose(np.linalg.det(m), 1.0, atol=1e-4)
    angle = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
    assert np.allclose(angle, np.round(angle), atol=1e-3)
    deg = np.round(angle) % 360
    assert deg.max() <= 89 and deg.min() == 0
    assert abs(float((deg != 0).mean()) - 0.6) < 0.03
    assert abs(float(deg[deg != 0].mean()) - 45.5) < 2.5
    # both flips: the half turn, exactly; the x flip and the y flip have the same rate and are independent
    grid = aug.weak_grid(n, 6, 10, torch.device("cpu"), flip_p=0.5, rotate_p=0.0)
    m = _pixel_matrix(grid, 6, 10)
    fx, fy = m[:, 0, 0] < 0, m[:, 1, 1] < 0
    assert abs(fx.mean() - 0.5) < 0.03 and abs(fy.mean() - 0.5) < 0.03 and abs((fx & fy).mean() - 0.25) < 0.03
    img = torch.randn(1, 1, 6, 10)
    half = aug.weak_grid(1, 6, 10, torch.device("cpu"), flip_p=1.0, rotate_p=0.0)
    assert torch.allclose(aug.warp_image(img, half), img.flip(-1).flip(-2), atol=1e-5)


def _rotation_grid(angles_deg, h: int, w: int) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    theta = torch.zeros(len(angles_deg), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * h / w
    theta[:, 1, 0], theta[:, 1, 1] = a.sin() * w / h, a.cos()
    return F.affine_grid(theta, [len(angles_deg), 1, h, w], align_corners=False)


def test_labels_are_warped_nearest_and_a_rotated_square_stays_on_its_label():
    h = w = 24
    label = torch.zeros(2, h, w, dtype=torch.long)
    label[:, 6:18, 6:18] = 3
    label[:, 9:15, 9:15] = 0  # a ring of class 3 around background: bilinear would invent class 1 / 2
    label[:, :, :2] = 2  # a class at the edge: pixels from outside must still be background
    grid = _rotation_grid([30.0, 45.0], h, w)
    out = aug.warp_label(label, grid)
    # by hand: the nearest source pixel (align_corners=False), background outside
    g = grid.double().numpy()
    ix = np.rint(((g[..., 0] + 1) * w - 1) / 2).astype(int)
    iy = np.rint(((g[..., 1] + 1) * h - 1) / 2).astype(int)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    lab = label.numpy()
    ref = np.zeros_like(lab)
    for b in range(2):
        ref[b][inside[b]] = lab[b][iy[b][inside[b]], ix[b][inside[b]]]
    assert np.mean(out.numpy() == ref) > 0.99 and set(out.unique().tolist()) == {0, 2, 3}
    assert not inside.all() and (out.numpy()[~inside] == 0).all()
    assert aug.warp_label(label[:, None], grid).shape == (2, 1, h, w)
    # the image, warped bilinearly with the same grid, stays on its label
    image = label[:, None].float() * 2.0 - 4.0  # min -4
    image[1] -= 1.0  # a different minimum per image
    warped = aug.warp_image(image, grid)
    high = warped[:, 0] > (image.amin((1, 2, 3)) + 5.0).view(-1, 1, 1)
    assert float((high == (out == 3)).float().mean()) > 0.97
    # pixels from outside take each image's own minimum; the image keeps its range
    corner = warped[:, 0, 0, 0]
    assert corner.tolist() == pytest.approx([-4.0, -5.0], abs=1e-5)
    imgs, labs = aug.weak_perturb(image, label[:1], flip_p=0.0, rotate_p=0.0)
    assert torch.allclose(imgs, image, atol=1e-5) and torch.equal(labs, label[:1])


def _np_strong(x: np.ndarray, f: float, sigma: float) -> np.ndarray:
    x = x.astype(np.float64)
    x = x.mean((1, 2, 3), keepdims=True) + f * (x - x.mean((1, 2, 3), keepdims=True))  # contrast
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    s = sum(k[i, j] * p[..., i:i + x.shape[2], j:j + x.shape[3]] for i in range(3) for j in range(3))
    x = s + f * (x - s)  # sharpness
    mn = x.min((1, 2, 3), keepdims=True)
    x = mn + f * (x - mn)  # brightness
    r = max(1, math.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g = g / g.sum()
    p = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    v = sum(g[i] * p[..., i:i + x.shape[2], :] for i in range(2 * r + 1))
    return sum(g[j] * v[..., :, j:j + x.shape[3]] for j in range(2 * r + 1))


def test_strong_perturbation_values(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 9) * 2 + 1
    out = aug.strong_perturb(x, enhance_max=0.2, blur_sigma_max=0.8, deterministic=True)
    assert np.allclose(out.double().numpy(), _np_strong(x.numpy(), 1.2, 0.8), atol=1e-5)
    # off: unchanged
    assert torch.allclose(aug.strong_perturb(x, enhance_p=0.0, blur_p=0.0), x, atol=1e-6)
    # per-sample blur sigma
    sig = torch.tensor([0.0, 1.5])
    blurred = aug.gaussian_blur(x, sig, 5)
    assert torch.allclose(blurred[0], x[0], atol=1e-6)
    assert np.allclose(blurred[1:].double().numpy(), _np_blur(x[1:].numpy(), 1.5, 5), atol=1e-5)
    # random factors: each enhancement in [1, 1 + max] with rate p; sigma in [0, max] with rate p
    factors, sigmas, radii = [], [], []
    monkeypatch.setattr(aug, "_blend", lambda a, base, f:
                        factors.append(f.clone()) or base + f.view(-1, 1, 1, 1) * (a - base))
    real_blur = aug.gaussian_blur
    monkeypatch.setattr(aug, "gaussian_blur", lambda a, s, r: sigmas.append(s.clone()) or radii.append(r)
                        or real_blur(a, s, r))
    big = torch.randn(3000, 1, 16, 16)
    aug.strong_perturb(big, enhance_p=0.3, enhance_max=0.1, blur_p=0.7, blur_sigma_max=2.0)
    assert len(factors) == 3 and radii == [6]
    for f in factors:
        on = f != 1.0
        assert abs(float(on.float().mean()) - 0.3) < 0.04
        assert float(f.min()) >= 1.0 and float(f.max()) <= 1.1 and abs(float(f[on].mean()) - 1.05) < 0.005
    s = sigmas[0]
    assert abs(float((s > 0).float().mean()) - 0.7) < 0.04 and float(s.max()) <= 2.0
    assert abs(float(s[s > 0].mean()) - 1.0) < 0.1


def _np_blur(x: np.ndarray, sigma: float, r: int) -> np.ndarray:
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g = g / g.sum()
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    v = sum(g[i] * p[..., i:i + x.shape[2], :] for i in range(2 * r + 1))
    return sum(g[j] * v[..., :, j:j + x.shape[3]] for j in range(2 * r + 1))


# ---- config, construction -----------------------------------------------------------------------------------------

def test_config_defaults_are_the_papers_and_the_published_codes():
    c = DiffRectConfig()
    expected = dict(patch_size=(256, 256), batch_labeled=3, batch_unlabeled=3, max_steps=30000, sw_batch_size=4,
                    seg_features=(16, 32, 64, 128, 256, 16), seg_dropout=(0.05, 0.1, 0.2, 0.3, 0.5), conf_thresh=0.8,
                    conf_rule="official", consistency=0.1, consistency_rampup=30000.0, weak_flip_p=0.5,
                    weak_rotate_p=0.5, weak_max_angle=359.0, strong_enhance_p=0.5, strong_enhance_max=0.1,
                    strong_blur_p=0.5, strong_blur_sigma_max=1.0, bsem_channels=(16, 32, 64, 128, 256),
                    bsem_dropout=(0.05, 0.1, 0.2, 0.3, 0.5), emb_dim=128, emb_hidden=512, guidance="dice",
                    guidance_scale=999.0, tau_ema_decay=0.99, diffusion_steps=10, schedule="cosine", sample_steps=2,
                    sample_eta=0.0, latent_clamp=1.0, denoiser_channels=(384, 512), lambda_lat_u=1.0,
                    lambda_lat_l=1.0, lambda_rect=1.0, lambda_decoder=1.0, rect_start=1000, predict_view="weak",
                    lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=False, poly_power=0.9, num_classes=2,
                    in_channels=1)
    assert {k: getattr(c, k) for k in expected} == expected
    assert UNET2D_FEATURES == (16, 32, 64, 128, 256, 16)
    assert DiffRectConfig.run_length_fields == ("consistency_rampup", "rect_start")
    short = DiffRect.make_config("acdc").with_steps(6000)
    assert (short.consistency_rampup, short.rect_start, short.max_steps) == (6000.0, 200, 6000)
    acdc = DiffRect.presets["acdc"]
    assert (acdc["num_classes"], acdc["patch_size"], acdc["lr"], acdc["rect_start"]) == (4, (256, 256), 0.01, 1000)
    # the segmentation net: about 1.8 M parameters (the SSL4MIS U-Net the paper uses), LeakyReLU 0.01, BatchNorm
    seg = unet2d(1, 4)
    n = sum(p.numel() for p in seg.parameters())
    assert 1.7e6 < n < 2.0e6
    acts = [m for m in seg.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in seg.modules()) == 4


def test_method_construction_one_sgd_over_both_networks():
    method = tiny(lr=0.03, momentum=0.8, weight_decay=2e-4, nesterov=True, diffusion_steps=20, sample_steps=3,
                  guidance_scale=500.0)
    r = method.rect
    assert (r.tau_embed.scale, r.tau_embed.dim, r.tau_embed.out_dim) == (500.0, 32, 64)
    assert r.denoiser.down1.conv0[0].out_channels == 48 and r.denoiser.down2.conv0[0].out_channels == 64
    assert [b.conv0[0].out_channels for b in r.bsem.blocks] == [8, 8, 16, 16, 32]
    assert r.decoder.out.out_channels == K and r.coloring.palette.shape == (K, 3)
    assert method.seg.conv_0.conv_0.conv.out_channels == 8  # the preset's seg_features
    conv = method.seg.conv_0.conv_0.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # channels-last on CPU (speed)
    params = {id(p) for net in (method.seg, method.rect) for p in net.parameters()}
    group = method.optimizer.param_groups[0]
    assert len(method.optimizer.param_groups) == 1 and {id(p) for p in group["params"]} == params
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.03, 0.8, 2e-4, True)
    assert method.timesteps == ddim_timesteps(20, 3) and method.timesteps[0] == 19 and method.timesteps[-1] == 0
    assert np.allclose(method.alphas_cumprod.numpy(), np_cosine_abar(20), atol=1e-6)
    assert all(not m.is_pad for m in method.seg.modules() if hasattr(m, "is_pad"))
    assert method.optimizers() == [method.optimizer] and set(method.modules()) == {"seg", "rect"}
    assert method.seg.final_conv.out_channels == K and method.seg.final_conv.kernel_size == (1, 1)
    with pytest.raises(ValueError):
        tiny(predict_view="sharp")
    assert pad_to_multiple(torch.ones(1, 1, 64, 64), 64)[1] == (0, 0)
    padded, (top, left) = pad_to_multiple(torch.ones(1, 1, 10, 70), 64)
    assert padded.shape[-2:] == (64, 128) and (top, left) == (27, 29)
    assert float(padded.sum()) == 700.0 and float(padded[..., 27:37, 29:99].sum()) == 700.0


# ---- one training step -------------------------------------------------------------------------------------------

BL, BU = 2, 3  # unequal, so that a labeled / unlabeled slice mix-up shows
THRESH = 0.9  # not the default: the prototypes' confidence values lie on both sides of 0.8 and 0.9


def _probe_step(monkeypatch, rule: str, step: int = 50, **overrides):
    """A step with a prescribed segmentation net, a recorded rectification model and prescribed rectified
    logits; weak warps off (identity) so the labels' places are known."""
    cfg = dict(rect_start=0, weak_flip_p=0.0, weak_rotate_p=0.0, conf_rule=rule, conf_thresh=THRESH, consistency=0.3,
               consistency_rampup=100.0, lambda_rect=0.7, lambda_lat_u=1.3, lambda_lat_l=0.6, lambda_decoder=0.4,
               sample_eta=0.5, latent_clamp=0.8, tau_ema_decay=0.95)
    cfg.update(overrides)
    method = tiny(**cfg)
    labeled, unlabeled = batch(BL, BU)
    logits = proto_logits(BL + 2 * BU, 64, 64, seed=11)
    probe = ProbeSeg(logits)
    method.seg = probe
    rect = method.rect
    rect_logits = proto_logits(BU, 64, 64, seed=12)
    rectified = []

    def fake_rectify(z, skips, emb, abar, timesteps, eta=0.0, generator=None, clamp=1.0):
        rectified.append(dict(z=z, skips=skips, emb=emb, abar=abar, timesteps=timesteps, eta=eta, clamp=clamp))
        return rect_logits.clone()

    monkeypatch.setattr(rect, "rectify", fake_rectify)
    rec = {"denoiser": Recorder(rect.denoiser), "decoder": Recorder(rect.decoder),
           "image_encoder": Recorder(rect.image_encoder)}
    for name, r in rec.items():
        monkeypatch.setattr(rect, name, r)
    rec["encode"] = spy(monkeypatch, rect, "encode")
    rec["q_sample"] = spy(monkeypatch, method_module, "q_sample")
    rec["t"] = spy(monkeypatch, method_module, "sample_timesteps")
    rec["ema"] = spy(monkeypatch, rect, "update_tau_ema")
    rec["rectified"] = rectified
    out = method.train_step(labeled, unlabeled, step)
    return method, probe, labeled, unlabeled, logits, rect_logits, out, rec


@pytest.mark.parametrize("rule", ["official", "fixmatch"])
def test_training_step_terms_weights_and_seg_gradient_by_hand(monkeypatch, rule):
    method, probe, labeled, unlabeled, logits, rect_logits, out, rec = _probe_step(monkeypatch, rule)
    bl, bu = BL, BU
    n = bl + bu
    y_l = labeled["label"][:, 0]
    L = logits.numpy()
    prob = np_softmax(L.astype(np.float64))
    labels, conf = np_rule(prob, THRESH, rule)
    assert 0.1 < conf.mean() < 0.9 and labels.min() == 0 and labels.max() == 2
    # the non-default threshold decides some pixels (a threshold of 0.8 would not give the same labels)
    assert not np.array_equal(np_rule(prob, 0.8, rule)[1], conf)
    yw_l, yw_u, ys_u = labels[:bl], labels[bl:n], labels[n:]
    conf_u = conf[bl:n]
    mask_u = conf_u if rule == "fixmatch" else None
    y_r, conf_r = np_rule(np_softmax(rect_logits.numpy().astype(np.float64)), THRESH, rule)
    mask_r = conf_r if rule == "fixmatch" else None
    w = 0.3 * math.exp(-5 * 0.5 ** 2)
    assert out["consistency_weight"] == pytest.approx(w)
    # the segmentation net saw [weak labeled, weak unlabeled, strong unlabeled]
    x_in = probe.inputs[0]
    assert x_in.shape[0] == bl + 2 * bu
    assert torch.allclose(x_in[:bl], labeled["image"], atol=1e-4)
    assert torch.allclose(x_in[bl:n], unlabeled["image"], atol=1e-4)
    assert not torch.allclose(x_in[n:], x_in[bl:n], atol=1e-3)
    exp = {"loss_sup": np_ce_dice(L[:bl], y_l.numpy()), "loss_semi": np_ce_dice(L[n:], yw_u, mask_u),
           "loss_rect": np_ce_dice(L[bl:n], y_r, mask_r)}
    dec = rec["decoder"].calls[0][1].detach().numpy()
    assert dec.shape[0] == n
    exp["loss_dec_l"] = np_ce_dice(dec[bu:], y_l.numpy())
    exp["loss_dec_u"] = np_ce_dice(dec[:bu], yw_u, mask_u)
    # targets z_w (u), z_l (l), then rectification's condition z_w; conditions z_s (u), z_w (l)
    (t_labels, t_images, t_feats, t_emb), _, (z_all, t_skips) = rec["encode"][0]
    (c_labels, c_images, c_feats, c_emb), _, (z_cond, c_skips) = rec["encode"][1]
    assert np.array_equal(t_labels.numpy(), np.concatenate([yw_u, y_l.numpy(), yw_u]))
    assert np.array_equal(c_labels.numpy(), np.concatenate([ys_u, yw_l]))
    assert torch.equal(t_images, torch.cat([x_in[n:], x_in[:bl], x_in[bl:n]]))
    assert torch.equal(c_images, torch.cat([x_in[n:], x_in[:bl]]))
    (enc_in,), ref_feats = rec["image_encoder"].calls[0]  # one encoder pass over [strong u, weak l, weak u]
    assert len(rec["image_encoder"].calls) == 1 and torch.equal(enc_in, t_images)
    assert all(torch.equal(a, b) for a, b in zip(t_feats, ref_feats))
    assert all(torch.equal(a, b[:n]) for a, b in zip(c_feats, ref_feats))
    assert all(a.grad_fn is not None for a in c_feats)  # the conditions train the image encoder
    # LFR: z_t = q_sample(z_target, t), denoised with the condition; decoded with the condition's skips
    (ddpm, q_x0, q_t), _, z_t = rec["q_sample"][0]
    assert ddpm is method.ddpm and torch.equal(q_x0, z_all[:n].float())
    assert torch.equal(q_t, rec["t"][0][2]) and rec["t"][0][0][1] == n and q_t.shape == (n,)
    (d_zt, d_t, d_cond), r = rec["denoiser"].calls[0]
    assert torch.equal(d_zt, z_t) and torch.equal(d_t, q_t) and torch.equal(d_cond, z_cond)
    (dec_in, dec_skips, dec_emb), _ = rec["decoder"].calls[0]
    assert dec_in is r and all(a is b for a, b in zip(dec_skips, c_skips)) and torch.equal(dec_emb, c_emb)
    z_t_np, r_np = z_all[:n].double().numpy(), r.detach().double().numpy()
    exp["loss_lat_u"] = float(((r_np[:bu] - z_t_np[:bu]) ** 2).mean())
    exp["loss_lat_l"] = float(((r_np[bu:] - z_t_np[bu:]) ** 2).mean())
    # calibration guidance (eq. 6) and its embedding; rectification guided by the mean tau_l
    tau_u, tau_l = np_dice(ys_u, yw_u), np_dice(yw_l, y_l.numpy())
    assert out["tau_u"] == pytest.approx(tau_u.mean(), rel=1e-5)
    assert out["tau_l"] == pytest.approx(tau_l.mean(), rel=1e-5)
    with torch.no_grad():
        tau = torch.tensor(np.concatenate([tau_u, tau_l]), dtype=torch.float32)
        assert torch.allclose(c_emb, method.rect.embed_tau(tau), atol=2e-3)
        t_tau = torch.tensor(np.concatenate([tau_u, tau_l, [tau_l.mean()] * bu]), dtype=torch.float32)
        assert torch.allclose(t_emb, method.rect.embed_tau(t_tau), atol=2e-3)
    (ema_tau, ema_decay), _, _ = rec["ema"][0]
    assert np.allclose(ema_tau.numpy(), tau_l, atol=1e-6) and ema_decay == 0.95
    assert float(method.rect.tau_ema) == pytest.approx(tau_l.mean(), rel=1e-5)
    # the rectification call: conditioned on z_w of the unlabeled weak views, their skips and tau_rect
    call = rec["rectified"][0]
    assert torch.equal(call["z"], z_all[n:]) and all(torch.equal(a, b[n:]) for a, b in zip(call["skips"], t_skips))
    assert torch.equal(call["emb"], t_emb[n:]) and call["abar"] is method.alphas_cumprod
    assert call["timesteps"] == [9, 0] and call["eta"] == 0.5 and call["clamp"] == 0.8
    for key, value in exp.items():
        assert out[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert out["confident"] == pytest.approx(conf_u.mean())
    total = (exp["loss_sup"] + w * exp["loss_semi"] + 0.7 * exp["loss_rect"] + 1.3 * w * exp["loss_lat_u"]
             + 0.6 * exp["loss_lat_l"] + 0.4 * (exp["loss_dec_l"] + w * exp["loss_dec_u"]))
    assert out["loss"] == pytest.approx(total, rel=1e-4)
    # the segmentation net's gradient is that of L_sup + w L_semi + lambda_rect L_rect (nothing else reaches it)
    s = torch.ones((), dtype=torch.float64, requires_grad=True)
    lt = logits.double() * s
    yt = torch.from_numpy
    seg_loss = (torch_ce_dice(lt[:bl], y_l) + w * torch_ce_dice(lt[n:], yt(yw_u), None if mask_u is None
                                                                else yt(mask_u))
                + 0.7 * torch_ce_dice(lt[bl:n], yt(y_r), None if mask_r is None else yt(mask_r)))
    seg_loss.backward()
    assert float(probe.scale.grad) == pytest.approx(float(s.grad), rel=1e-4)


def test_training_step_is_one_sgd_step_over_both_networks():
    """After the step every parameter moved by SGD's first step: p - lr (g + wd p) (momentum buffer = g), with
    the gradients of both backward passes (none zeroed in between)."""
    method = tiny(rect_start=0, weight_decay=1e-3, lr=0.05)
    labeled, unlabeled = batch(BL, BU)
    before = {f"{k}.{n}": p.detach().clone() for k, net in method.modules().items()
              for n, p in net.named_parameters()}
    method.train_step(labeled, unlabeled, 3)
    moved = {"seg": 0, "rect": 0}
    for k, net in method.modules().items():
        for n, p in net.named_parameters():
            old = before[f"{k}.{n}"]
            g = p.grad
            if g is None or float(g.abs().sum()) == 0.0:
                continue
            moved[k] += 1
            assert torch.allclose(p.detach(), old - 0.05 * (g + 1e-3 * old), atol=1e-6), (k, n)
    assert moved["seg"] > 10 and moved["rect"] > 10
    assert method.seg.conv_0.conv_0.conv.weight.grad.abs().sum() > 0


def _rect_grads(monkeypatch, **weights) -> dict[str, float]:
    method = tiny(rect_start=0, consistency=1.0, consistency_rampup=0.0, **weights)
    method.seg = ProbeSeg(proto_logits(BL + 2 * BU, 64, 64, seed=3))
    monkeypatch.setattr(method.optimizer, "step", lambda *a, **k: None)
    labeled, unlabeled = batch(BL, BU)
    torch.manual_seed(1)
    method.train_step(labeled, unlabeled, 5)
    out = {}
    for part in ("image_encoder", "bsem", "denoiser", "decoder", "tau_embed"):
        grads = [p.grad.abs().sum() for p in getattr(method.rect, part).parameters() if p.grad is not None]
        out[part] = float(sum(grads)) if grads else 0.0
    out["seg"] = float(method.seg.scale.grad.abs())
    return out


def test_gradient_flow_of_each_rectification_term(monkeypatch):
    off = dict(lambda_lat_u=0.0, lambda_lat_l=0.0, lambda_decoder=0.0)
    none = _rect_grads(monkeypatch, **off)
    assert all(v == 0.0 for k, v in none.items() if k != "seg") and none["seg"] > 0  # L_Rect etc. stay in seg
    for lat in ("lambda_lat_u", "lambda_lat_l"):
        g = _rect_grads(monkeypatch, **{**off, lat: 1.0})
        assert g["decoder"] == 0.0, lat  # the latent losses do not reach the decoder
        assert all(g[k] > 0 for k in ("image_encoder", "bsem", "denoiser", "tau_embed")), (lat, g)
        assert g["seg"] == pytest.approx(none["seg"], rel=1e-6)  # nor the segmentation net
    g = _rect_grads(monkeypatch, **{**off, "lambda_decoder": 1.0})
    assert all(g[k] > 0 for k in ("image_encoder", "bsem", "denoiser", "decoder", "tau_embed")), g
    assert g["seg"] == pytest.approx(none["seg"], rel=1e-6)


def test_training_step_warps_and_perturbs_as_configured(monkeypatch):
    method = tiny(rect_start=100, weak_flip_p=0.5, weak_rotate_p=1.0, weak_max_angle=180.0, strong_enhance_p=0.8,
                  strong_enhance_max=0.2, strong_blur_p=0.6, strong_blur_sigma_max=0.9)
    bl, bu = BL, BU
    n = bl + bu
    probe = ProbeSeg(proto_logits(bl + 2 * bu, 64, 64, seed=5))
    method.seg = probe
    grids = spy(monkeypatch, method_module, "weak_grid")
    strong = spy(monkeypatch, method_module, "strong_perturb")
    encodes = spy(monkeypatch, method.rect, "encode")
    rectify = spy(monkeypatch, method.rect, "rectify")
    labeled, unlabeled = batch(bl, bu)
    labeled["label"] = labeled["label"][:, 0]  # [B, H, W] labels are accepted too
    torch.manual_seed(4)
    out = method.train_step(labeled, unlabeled, 99)
    (gn, h, w, _), kw, grid = grids[0]
    assert (gn, h, w) == (n, 64, 64) and kw == dict(flip_p=0.5, rotate_p=1.0, max_angle=180.0)
    x_in = probe.inputs[0]
    xw = aug.warp_image(torch.cat([labeled["image"], unlabeled["image"]]), grid)
    assert torch.allclose(x_in[:n], xw, atol=1e-6)
    y_w = aug.warp_label(labeled["label"], grid[:bl])
    assert not torch.equal(y_w, labeled["label"])
    assert torch.equal(encodes[0][0][0][bu:n], y_w)  # W2G's target: the warped ground truth
    (s_in,), s_kw, s_out = strong[0]
    assert torch.allclose(s_in, x_in[bl:n]) and torch.equal(s_out, x_in[n:])
    assert s_kw == dict(enhance_p=0.8, enhance_max=0.2, blur_p=0.6, blur_sigma_max=0.9)
    # before rect_start: no rectification, L_rect = 0, and the image batch has no rectification part
    assert not rectify and out["loss_rect"] == 0.0 and encodes[0][0][1].shape[0] == n
    sup = np_ce_dice(probe.logits[:bl].numpy(), y_w.numpy())
    assert out["loss_sup"] == pytest.approx(sup, rel=1e-4)  # L_sup against the warped label
    method.train_step(labeled, unlabeled, 100)
    assert len(rectify) == 1 and encodes[2][0][1].shape[0] == n + bu


# ---- review views, predict, inference --------------------------------------------------------------------------------

class PointwiseSeg(torch.nn.Module):
    """logits = [x, -x, 0.3 x^2 - 0.5] per pixel: the arg-max is known for every intensity."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.cat([x, -x, 0.3 * x ** 2 - 0.5], 1)


def np_pointwise(x: np.ndarray) -> np.ndarray:
    return np.stack([x, -x, 0.3 * x ** 2 - 0.5], 1)


def test_review_views_by_hand(monkeypatch):
    method = tiny(seed=7, latent_clamp=0.5, strong_enhance_max=0.15, strong_blur_sigma_max=0.7)
    seg = PointwiseSeg()
    rect = method.rect.eval()
    rect.tau_ema.fill_(0.3)
    monkeypatch.setattr(method, "_inference_nets", lambda: (seg, rect))
    calls = []
    rect_logits = proto_logits(3, 64, 64, seed=9)

    def fake_rectify(z, skips, emb, abar, timesteps, eta=0.0, generator=None, clamp=1.0):
        calls.append(dict(z=z, emb=emb, abar=abar, timesteps=timesteps, eta=eta, gen=generator, clamp=clamp))
        return rect_logits[: z.shape[0]]

    monkeypatch.setattr(rect, "rectify", fake_rectify)
    encodes = spy(monkeypatch, rect, "encode")
    torch.manual_seed(2)
    volume = torch.randn(1, 3, 64, 64) * 1.5
    views = method.pseudo_labels(volume)
    x = volume[0][:, None].numpy()
    weak = np_pointwise(x[:, 0]).argmax(1)
    assert views["weak"].dtype == np.uint8 and np.array_equal(views["weak"], weak)
    strong_x = _np_strong(x, 1.15, 0.7)
    strong = np_pointwise(strong_x[:, 0]).argmax(1)
    assert np.mean(views["strong"] == strong) > 0.999 and not np.array_equal(views["strong"], weak)
    assert np.array_equal(views["rectified"], rect_logits.argmax(1).numpy())
    (e_labels, e_image, e_feats, e_emb), _, (z, _) = encodes[0]
    assert np.array_equal(e_labels.numpy(), weak) and torch.equal(e_image, volume[0][:, None])
    with torch.no_grad():
        assert torch.allclose(e_emb, rect.embed_tau(torch.full((3,), 0.3)), atol=1e-5)  # the running mean of tau_l
        assert torch.allclose(e_feats[0], rect.image_encoder(volume[0][:, None])[0], atol=1e-5)
    call = calls[0]
    assert call["z"] is z and call["emb"] is e_emb and call["abar"] is method.alphas_cumprod
    assert call["timesteps"] == [9, 0] and call["eta"] == 0.0 and call["clamp"] == 0.5
    assert call["gen"].initial_seed() == 7
    # predict: the segmentation net only (the paper's inference), unless predict_view says otherwise
    calls.clear()
    seg.inputs.clear()
    assert np.array_equal(method.predict(volume), weak) and not calls and len(seg.inputs) == 1
    method.config.predict_view = "strong"
    assert np.array_equal(method.predict(volume), views["strong"])
    method.config.predict_view = "rectified"
    assert np.array_equal(method.predict(volume), views["rectified"])
    # probabilities: the softmax over the classes, its arg-max the weak view
    probs = method.primary_probabilities(volume)
    ref = np_softmax(np_pointwise(x[:, 0]))
    assert probs.shape == (3, 3, 64, 64) and np.allclose(probs.numpy(), ref.transpose(1, 0, 2, 3), atol=1e-5)


def test_views_of_an_odd_size_volume_are_cropped_back_in_place(monkeypatch):
    method = tiny()
    seg = PointwiseSeg()
    monkeypatch.setattr(method, "_inference_nets", lambda: (seg, method.rect))
    torch.manual_seed(4)
    volume = torch.randn(1, 2, 50, 70) + 0.3
    weak = method.predict(volume)
    assert weak.shape == (2, 50, 70) and np.array_equal(weak, np_pointwise(volume[0].numpy()).argmax(1))
    assert seg.inputs[0].shape[-2:] == (64, 128)
    probs = method.primary_probabilities(volume)
    assert probs.shape == (3, 2, 50, 70) and torch.allclose(probs.sum(0), torch.ones(2, 50, 70), atol=1e-5)
    assert np.allclose(probs.numpy(), np_softmax(np_pointwise(volume[0].numpy())).transpose(1, 0, 2, 3), atol=1e-5)
    views = method.pseudo_labels(volume)
    assert all(v.shape == (2, 50, 70) for v in views.values()) and np.array_equal(views["weak"], weak)


def test_inference_copies_follow_training_and_state_loads():
    method = tiny(rect_start=0)
    labeled, unlabeled = batch()
    method.train_step(labeled, unlabeled, 0)
    first = method._inference_nets()
    assert method._inference_nets() is first  # cached between reviews
    volume = torch.randn(1, 2, 64, 64)
    before = method.predict(volume)
    with torch.no_grad():
        for p in method.seg.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    method.load_state_dict(method.state_dict())
    assert method._inference_nets() is not first  # rebuilt after a load
    after = method.predict(volume)
    with torch.no_grad():
        ref = method.seg.eval()(volume[0][:, None]).argmax(1).numpy()
    assert np.array_equal(after, ref) and not np.array_equal(after, before)
    assert not method.seg.training and not method.rect.training  # review runs in eval mode
    method.train_step(labeled, unlabeled, 1)
    assert method._fused is None and method.seg.training and method.rect.training


def test_diffrect_views_through_the_review_scores(monkeypatch):
    """DiffRect's three views and its probabilities, through the shared review path: majority vote (ties to
    the lower class), disagreement (per method and across methods), the per-slice profile and the worst slice,
    the normalised entropy and the confidence inside the label, all by hand."""
    from backend.engine.scores import confidence, normalised_entropy
    from backend.review.views import (ALL_METHODS, disagreement, disagreement_by_method, majority_vote,
                                      slice_profile, worst_slice)

    method = tiny()
    seg = PointwiseSeg()
    monkeypatch.setattr(method, "_inference_nets", lambda: (seg, method.rect.eval()))
    torch.manual_seed(6)
    volume = torch.randn(1, 3, 64, 64)
    views = method.pseudo_labels(volume)
    arrays = [views[v] for v in ("weak", "strong", "rectified")]
    counts = np.stack([sum((a == k).astype(int) for a in arrays) for k in range(K)])
    vote = np.zeros(arrays[0].shape, dtype=int)
    best = counts[0].copy()
    for k in range(1, K):  # strictly more votes needed to beat a lower class
        vote = np.where(counts[k] > best, k, vote)
        best = np.maximum(best, counts[k])
    assert np.array_equal(majority_vote(arrays, K), vote)
    assert np.array_equal(majority_vote([np.array([1, 2]), np.array([2, 1])], 3), [1, 1])  # ties: the lower class
    differ = (arrays[0] != arrays[1]) | (arrays[0] != arrays[2])
    assert np.array_equal(disagreement(arrays), differ.astype(np.uint8)) and differ.any()
    profile = differ.reshape(3, -1).sum(1)
    assert np.array_equal(slice_profile(differ), profile) and worst_slice(profile) == int(np.argmax(profile))
    assert worst_slice([0, 0]) is None and worst_slice([1, 3, 3]) == 1
    named = {f"diffrect:{v}": a for v, a in views.items()}
    by_method = disagreement_by_method(named)
    assert set(by_method) == {"diffrect"} and np.array_equal(by_method["diffrect"], differ.astype(np.uint8))
    other = {**named, "diffcl:weak": np.zeros_like(arrays[0])}
    both = disagreement_by_method(other)
    assert set(both) == {"diffrect", ALL_METHODS}
    assert np.array_equal(both[ALL_METHODS], (differ | (arrays[0] != 0)).astype(np.uint8))
    prob = method.primary_probabilities(volume)
    p = np.clip(prob.double().numpy(), 1e-12, None)
    ent = -(p * np.log(p)).sum(0) / np.log(K)
    assert np.allclose(normalised_entropy(prob).numpy(), ent, atol=1e-5)
    label = views["weak"]
    assert confidence(ent, label) == pytest.approx(1 - ent[label > 0].mean(), rel=1e-6)
    assert confidence(ent, np.zeros_like(label)) is None


def test_diffrect_views_scored_and_queued_by_hand(monkeypatch):
    """The agreement of DiffRect's views (Dice per foreground class, background left out), the review queue's
    order by it (unlabeled first, the least agreeing first, ties by name) and inference's default checkpoint."""
    import inspect

    from backend.engine.inference import load_trained
    from backend.engine.metrics import agreement, dice_per_class
    from backend.review.queue import sort_review_queue

    method = tiny()
    seg = PointwiseSeg()
    monkeypatch.setattr(method, "_inference_nets", lambda: (seg, method.rect.eval()))
    torch.manual_seed(8)
    views = method.pseudo_labels(torch.randn(1, 2, 64, 64))

    def fg_dice(a, b):
        sizes = [((a == k).sum() + (b == k).sum()) for k in range(1, K)]  # a class in neither view scores 1
        return [2 * ((a == k) & (b == k)).sum() / n if n else 1.0 for k, n in zip(range(1, K), sizes)]

    assert np.allclose(dice_per_class(views["weak"], views["strong"], K), fg_dice(views["weak"], views["strong"]))
    assert np.allclose(dice_per_class(views["weak"], views["weak"], K), [1.0, 1.0])
    score = agreement(views, K)
    pairs = [("weak", "strong"), ("weak", "rectified"), ("strong", "rectified")]
    means = [np.mean(fg_dice(views[a], views[b])) for a, b in pairs]
    assert score["agreement_mean"] == pytest.approx(np.mean(means), abs=1e-5)
    assert score["agreement_worst"] == pytest.approx(min(min(fg_dice(views[a], views[b])) for a, b in pairs),
                                                     abs=1e-5)
    rows = [{"case": "c", "labeled": False, "scores": {"diffrect": {"mean": score["agreement_mean"]}}},
            {"case": "a", "labeled": False, "scores": {"diffrect": {"mean": 1.0}}},
            {"case": "b", "labeled": True, "scores": {"diffrect": {"mean": 0.01}}},
            {"case": "d", "labeled": False, "scores": {"diffrect": {"mean": score["agreement_mean"]}}},
            {"case": "e", "labeled": False, "scores": {"diffrect": {}}}]
    assert [r["case"] for r in sort_review_queue(rows, "mean")] == ["c", "d", "a", "e", "b"]
    assert inspect.signature(load_trained).parameters["checkpoint"].default == "best"
