"""Behaviour tests of Diff-CL: values checked on constructed inputs whose answer is known (issue 23).

Every value here is computed independently in the test (plain loops, numpy, or the paper's formula written out)
and compared with the method's: the Dice + CE terms with their weights and reductions (eq. 6-9, 16-22), which
tensor each term reads and which parameters it reaches, the wiring of one training step (Algorithm 1), the
warm-up lambda(t) and the optimizers, the augmentation on a known image and label, the diffusion pieces (q_sample,
timestep range, DDIM step list and update, noise start, label conditioning), contrastive label propagation
(eq. 11-15, memory bank, sampling), the HFM module (eq. 10: high-pass filter, SA, selective scan against a naive
loop, scan orders), the config against the paper, the review views, predict, and the review path they go through.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backend.methods.diffcl.method as dm
from helpers.spy import record_calls
from helpers.symmetry import which_symmetry
from backend.methods.diffcl.config import DiffCLConfig
from backend.methods.diffcl.contrast import ClassMemoryBank, label_propagation_loss, sample_voxels, select_pairs
from backend.methods.diffcl.mamba import (GatedSpatialAttention, HighFrequencyMamba, SpaceMamba, _ScanPath,
                                          high_pass_filter, high_pass_mask, scan_order, selective_scan,
                                          selective_scan_ref, selective_scan_torch)
from backend.methods.diffcl.method import DiffCL, random_rot_flip
from backend.methods.layers.diffusion import (ddim_reverse, ddim_sample, ddim_timesteps, from_signed, make_schedulers,
                                              q_sample, sample_timesteps, to_signed)
from backend.methods.layers.embeddings import SinusoidalEmbedding
from backend.methods.layers.vnet import ConvStage
from backend.methods.schedules import gaussian_warmup, sigmoid_rampup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = 16  # the smallest patch the V-Nets take


def _method(**overrides) -> DiffCL:
    torch.manual_seed(0)
    cfg = {"patch_size": (S, S, S), **overrides}
    return DiffCL(DiffCL.make_config("tiny", **cfg))


def _batch(n_l: int, n_u: int, size: int = S, seed: int = 0, classes: int = 2):
    """Balls on noise: class 1 a ball, class 2 (with 3 classes) its core."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"))
    imgs, labs = [], []
    for _ in range(n_l + n_u):
        c = torch.randint(size // 3, 2 * size // 3, (3, 1, 1, 1), generator=g).float()
        r = ((grid - c) ** 2).sum(0).sqrt()
        lab = (r < size / 4).long() + ((r < size / 8).long() if classes > 2 else 0)
        imgs.append(lab.float() + 0.3 * torch.randn(size, size, size, generator=g))
        labs.append(lab)
    img, lab = torch.stack(imgs)[:, None], torch.stack(labs)[:, None]
    return {"image": img[:n_l], "label": lab[:n_l]}, {"image": img[n_l:]}


# ---- Dice + CE (eq. 8-9, 20-21) by hand -------------------------------------------------------------------------
def _dice_by_hand(logits: torch.Tensor, target: torch.Tensor) -> float:
    """MONAI soft Dice, background included, over the whole batch: mean_k 1 - (2 I_k + 1e-5) / (P_k + G_k + 1e-5)."""
    lg, tg = logits.double().reshape(logits.shape[0], logits.shape[1], -1), target.reshape(target.shape[0], -1)
    n_b, n_k, n_v = lg.shape
    inter, psum, gsum = [0.0] * n_k, [0.0] * n_k, [0.0] * n_k
    for b in range(n_b):
        for v in range(n_v):
            e = [math.exp(float(lg[b, k, v])) for k in range(n_k)]
            for k in range(n_k):
                p, g = e[k] / sum(e), float(int(tg[b, v]) == k)
                inter[k] += p * g
                psum[k] += p
                gsum[k] += g
    return sum(1 - (2 * inter[k] + 1e-5) / (psum[k] + gsum[k] + 1e-5) for k in range(n_k)) / n_k


def _ce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> float:
    lg, tg = logits.double().reshape(logits.shape[0], logits.shape[1], -1), target.reshape(target.shape[0], -1)
    total, count = 0.0, 0
    for b in range(lg.shape[0]):
        for v in range(lg.shape[2]):
            e = [math.exp(float(lg[b, k, v])) for k in range(lg.shape[1])]
            total += -math.log(e[int(tg[b, v])] / sum(e))
            count += 1
    return total / count


def test_dice_ce_on_a_fixed_input_is_batch_dice_with_background_plus_weighted_mean_ce():
    m = _method()
    # 2 samples x 2 voxels; sample 0 right, sample 1 wrong: per-sample and batch Dice differ, classes differ
    logits = torch.tensor([[[2.0, -1.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, 3.0]]])[:, :, None, None]  # [2,2,1,1,2]
    target = torch.tensor([[0, 1], [1, 0]])[:, None, None]
    dice, ce = _dice_by_hand(logits, target), _ce_by_hand(logits, target)
    assert math.isclose(float(m._dice_ce(logits, target, 0.0)), dice, rel_tol=1e-5)
    assert math.isclose(float(m._dice_ce(logits, target, 0.37)), dice + 0.37 * ce, rel_tol=1e-5)
    # the same numbers, written out: softmax p(class 1) per voxel
    p1 = [1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-3.0))]
    g1 = [0, 1, 1, 0]
    d1 = 1 - (2 * sum(p * g for p, g in zip(p1, g1)) + 1e-5) / (sum(p1) + 2 + 1e-5)
    p0 = [1 - p for p in p1]
    d0 = 1 - (2 * sum(p * (1 - g) for p, g in zip(p0, g1)) + 1e-5) / (sum(p0) + 2 + 1e-5)
    assert math.isclose(dice, (d0 + d1) / 2, rel_tol=1e-9)


def _hand_losses(lc, ld, y_l, y_hat, y_tilde, l_cl, lam, w):
    n = y_l.shape[0]
    sup_c = _dice_by_hand(lc[:n], y_l) + w["beta2"] * lam * _ce_by_hand(lc[:n], y_l)               # eq. 19
    sup_d = _dice_by_hand(ld[:n], y_l) + w["beta1"] * lam * _ce_by_hand(ld[:n], y_l)               # eq. 18
    cps_d = _dice_by_hand(ld[n:], y_hat[n:]) + w["lambda1"] * _ce_by_hand(ld[n:], y_hat[n:])       # eq. 6
    cps_c = _dice_by_hand(lc[n:], y_tilde[n:]) + w["lambda2"] * _ce_by_hand(lc[n:], y_tilde[n:])   # eq. 7
    return {"sup_cs": sup_c, "sup_ds": sup_d, "cps_cs": cps_c, "cps_ds": cps_d,
            "ds": sup_d + w["mu1"] * cps_d, "cs": sup_c + w["mu2"] * (cps_c + w["eta"] * l_cl)}       # eq. 16, 17, 22


W = dict(mu1=0.7, mu2=1.9, lambda1=0.3, lambda2=2.5, beta1=0.45, beta2=0.15, eta=0.02)


def test_losses_decompose_into_the_papers_terms_each_reading_its_own_rows_and_labels():
    m = _method(num_classes=3, **W)
    g = torch.Generator().manual_seed(3)
    lc = torch.randn(4, 3, 2, 2, 2, generator=g, requires_grad=True)   # 2 labeled + 2 unlabeled
    ld = torch.randn(4, 3, 2, 2, 2, generator=g, requires_grad=True)
    y_l = torch.randint(0, 3, (2, 2, 2, 2), generator=g)
    y_hat = torch.randint(0, 3, (4, 2, 2, 2), generator=g)              # independent of the logits on purpose
    y_tilde = torch.randint(0, 3, (4, 2, 2, 2), generator=g)
    l_cl = torch.tensor(2.5, requires_grad=True)
    out = m._losses(lc, ld, y_l, y_hat, y_tilde, l_cl, 0.6)
    expected = _hand_losses(lc.detach(), ld.detach(), y_l, y_hat, y_tilde, 2.5, 0.6, W)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert math.isclose(float(out[key]), value, rel_tol=1e-5), key
    # gradients: supervised terms reach the labeled rows only, the CPS terms the unlabeled rows only
    for key, logits, rows in (("sup_cs", lc, slice(0, 2)), ("cps_cs", lc, slice(2, 4)),
                              ("sup_ds", ld, slice(0, 2)), ("cps_ds", ld, slice(2, 4))):
        (grad,) = torch.autograd.grad(out[key], logits, retain_graph=True)
        other = torch.ones(4, dtype=torch.bool)
        other[rows] = False
        assert grad[rows].abs().sum() > 0 and float(grad[other].abs().sum()) == 0.0, key
    g_c = torch.autograd.grad(out["cs"], [lc, ld, l_cl], retain_graph=True, allow_unused=True)
    assert g_c[1] is None and math.isclose(float(g_c[2]), W["mu2"] * W["eta"], rel_tol=1e-6)
    g_d = torch.autograd.grad(out["ds"], [lc, ld, l_cl], allow_unused=True)
    assert g_d[0] is None and g_d[2] is None and g_d[1].abs().sum() > 0
    # no unlabeled rows: the CPS terms are zero and the totals are the supervised terms
    out = m._losses(lc[:2], ld[:2], y_l, y_hat[:2], y_tilde[:2], l_cl, 0.6)
    assert float(out["cps_cs"]) == float(out["cps_ds"]) == 0.0
    assert math.isclose(float(out["ds"]), expected["sup_ds"], rel_tol=1e-5)
    assert math.isclose(float(out["cs"]), expected["sup_cs"] + W["mu2"] * W["eta"] * 2.5, rel_tol=1e-5)


# ---- one training step, spied on (Algorithm 1) -------------------------------------------------------------------
def _groups(m: DiffCL) -> dict[str, list[torch.nn.Parameter]]:
    out_ids = {id(p) for p in m.cs.decoder.out.parameters()}
    return {"cs_out": list(m.cs.decoder.out.parameters()),
            "cs_body": [p for p in m.cs.parameters() if id(p) not in out_ids],
            "cs_hfm": list(m.cs.hfm.parameters()), "head": list(m.head.parameters()), "ds": list(m.ds.parameters())}


def _reached(loss: torch.Tensor, groups: dict[str, list[torch.nn.Parameter]]) -> set[str]:
    hit = set()
    for name, params in groups.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        if any(g is not None and float(g.abs().sum()) > 0 for g in grads):
            hit.add(name)
    return hit


def test_train_step_wiring_values_logs_gradient_flow_and_sgd_update():
    cfg = dict(num_classes=3, max_steps=100, warmup_fraction=0.5, lr=0.05, momentum=0.8, weight_decay=0.01,
               cl_topk=4, cl_candidates=32, cl_anchors=5, cl_tau=0.3, **W)
    m = _method(**cfg)
    g = torch.Generator().manual_seed(11)
    for cls in range(3):                                   # a filled bank, so that L_cl is not zero
        m.bank.push(cls, torch.randn(10, m.config.proj_dim, generator=g))
    labeled, unlabeled = _batch(2, 1, seed=4, classes=3)
    seen: dict[str, list] = {k: [] for k in ("cs", "ds", "aug", "noise", "losses", "bank", "cl", "step")}
    m.cs.register_forward_hook(lambda mod, args, out: seen["cs"].append((args[0], out)))
    m.ds.register_forward_hook(lambda mod, args, out: seen["ds"].append((args, out)))

    record_calls(m, seen, {"aug": "_augment", "noise": "_noised_labels", "losses": "_losses",
                           "bank": "_update_bank", "cl": "_contrastive"})
    groups = _groups(m)
    flow: dict[str, set[str]] = {}
    original_step = m.backward_and_step

    def step_spy(loss, opt):
        if not seen["step"]:
            (_, losses), = seen["losses"]
            (_, loss_cl), = seen["cl"]
            for key in ("sup_cs", "cps_cs", "sup_ds", "cps_ds", "cs", "ds"):
                flow[key] = _reached(losses[key], groups)
            flow["cl"] = _reached(loss_cl, groups)
        seen["step"].append((loss, opt))
        return original_step(loss, opt)

    m.backward_and_step = step_spy
    params = [p for mod in (m.cs, m.head, m.ds) for p in mod.parameters()]
    for p in params:
        p.grad = torch.full_like(p, 1e3)                   # stale gradients: zero_grad must clear them
    before = [p.detach().clone() for p in params]
    logs = m.train_step(labeled, unlabeled, step=37)

    # augmentation: the labeled image and label, and the unlabeled image, go in; what comes out is trained on
    (aug_in, (x_l, y_l, x_u)), = seen["aug"]
    assert torch.equal(aug_in[0], labeled["image"]) and torch.equal(aug_in[1], labeled["label"][:, 0])
    assert torch.equal(aug_in[2], unlabeled["image"])
    (x, (logits_c, feats_c)), = seen["cs"]
    assert torch.equal(x, torch.cat([x_l, x_u]))
    y_hat = logits_c.detach().argmax(1)
    ((labels,), (y_t, t)), = seen["noise"]
    assert torch.equal(labels, torch.cat([y_l, y_hat[2:]]))                 # Y_0^l = y^l, Y_0^u = CS's argmax
    ((x_ds, y_t_ds, t_ds), (logits_d, feats_d)), = seen["ds"]
    assert torch.equal(x_ds, x) and torch.equal(y_t_ds, y_t) and torch.equal(t_ds, t)
    y_tilde = logits_d.detach().argmax(1)
    ((b_feats, b_pred, b_lab), _), = seen["bank"]
    assert torch.equal(b_feats, feats_d[:2]) and torch.equal(b_pred, y_tilde[:2]) and torch.equal(b_lab, y_l)
    ((cl_feats,), loss_cl), = seen["cl"]
    assert torch.equal(cl_feats, feats_c[2:]) and float(loss_cl) > 0
    (args, losses), = seen["losses"]
    lam = 2.0 * math.exp(-5.0 * (1 - 37 / 50) ** 2)                         # lambda(t), t_max = 0.5 x 100
    assert args[0] is logits_c and args[1] is logits_d and torch.equal(args[2], y_l)
    assert torch.equal(args[3], y_hat) and torch.equal(args[4], y_tilde) and args[5] is loss_cl
    assert math.isclose(args[6], lam, rel_tol=1e-12)
    hand = _hand_losses(logits_c.detach(), logits_d.detach(), y_l, y_hat, y_tilde, float(loss_cl), lam, W)
    for key, value in hand.items():
        assert math.isclose(float(losses[key]), value, rel_tol=1e-4), key
    # one backward + SGD step per network, CS's total on CS's optimizer, DS's on DS's
    assert [(loss is losses["cs"], opt is m.opt_cs) for loss, opt in seen["step"][:1]] == [(True, True)]
    assert seen["step"][1][0] is losses["ds"] and seen["step"][1][1] is m.opt_ds and len(seen["step"]) == 2
    # gradient flow: which parameters each term reaches
    assert flow["sup_cs"] == flow["cps_cs"] == {"cs_out", "cs_body", "cs_hfm"}
    assert flow["cl"] == {"cs_body", "cs_hfm", "head"}                       # features, not the output conv
    assert flow["sup_ds"] == flow["cps_ds"] == flow["ds"] == {"ds"}
    assert flow["cs"] == {"cs_out", "cs_body", "cs_hfm", "head"}
    # logs
    expect = {"loss_cs": hand["cs"], "loss_ds": hand["ds"], "loss_sup_cs": hand["sup_cs"],
              "loss_sup_ds": hand["sup_ds"], "loss_cps_cs": hand["cps_cs"], "loss_cps_ds": hand["cps_ds"],
              "loss_cl": float(loss_cl), "eta_loss_cl": W["eta"] * float(loss_cl), "lambda": lam,
              "beta1": W["beta1"] * lam, "beta2": W["beta2"] * lam,
              "dice_cs": _hard_dice_by_hand(y_hat[:2], y_l, 3), "dice_ds": _hard_dice_by_hand(y_tilde[:2], y_l, 3),
              "agreement_u": _hard_dice_by_hand(y_tilde[2:], y_hat[2:], 3),
              "bank_fill": float(m.bank.count.sum()) / (3 * m.config.bank_size)}
    assert set(expect) <= set(logs)
    for key, value in expect.items():
        assert math.isclose(logs[key], value, rel_tol=1e-4, abs_tol=1e-7), key
    # SGD's first step (momentum buffer = gradient): p' = p - lr (grad + wd p), grads freshly computed
    for p, old in zip(params, before):
        if p.grad is None:
            continue
        assert float(p.grad.abs().max()) < 100.0
        assert torch.allclose(p.detach(), old - 0.05 * (p.grad + 0.01 * old), atol=1e-6)
    assert all(p.grad is not None for p in m.head.parameters())


def _hard_dice_by_hand(pred: torch.Tensor, ref: torch.Tensor, classes: int) -> float:
    scores = []
    for k in range(1, classes):
        a, b = int((pred == k).sum()), int((ref == k).sum())
        if a + b:
            scores.append(2 * int(((pred == k) & (ref == k)).sum()) / (a + b))
    return sum(scores) / len(scores) if scores else 1.0


def test_hard_dice_log_on_a_fixed_map():
    pred = torch.tensor([[0, 1, 1, 2]])
    ref = torch.tensor([[0, 1, 0, 0]])
    assert math.isclose(dm._hard_dice(pred, ref, 3), (2 * 1 / 3 + 0.0) / 2)
    assert dm._hard_dice(pred, ref, 2) == pytest.approx(2 / 3)
    assert dm._hard_dice(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 3) == 1.0


def test_optimizers_hold_the_right_parameters_with_the_configs_hyperparameters():
    m = _method(lr=0.07, momentum=0.85, weight_decay=0.002)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    cs_params = ids(p for g in m.opt_cs.param_groups for p in g["params"])
    ds_params = ids(p for g in m.opt_ds.param_groups for p in g["params"])
    assert cs_params == ids(m.cs.parameters()) | ids(m.head.parameters())   # L_cl trains the head with CS
    assert ds_params == ids(m.ds.parameters())
    for opt in m.optimizers():
        (group,) = opt.param_groups
        assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.07, 0.85, 0.002,
                                                                                              False)
    assert m.optimizers() == [m.opt_cs, m.opt_ds] and set(m.modules()) == {"cs", "ds", "head"}


# ---- schedules ---------------------------------------------------------------------------------------------------
def test_warmup_and_lr_values_at_given_steps():
    for step, length, expected in ((0, 10, math.exp(-5)), (5, 10, math.exp(-1.25)), (10, 10, 1.0),
                                   (25, 10, 1.0), (-3, 10, math.exp(-5)), (2, 8, math.exp(-5 * 0.5625)),
                                   (3, 0, 1.0)):
        assert math.isclose(sigmoid_rampup(step, length), expected, rel_tol=1e-12), (step, length)
    assert math.isclose(gaussian_warmup(30, 40, 2.0), 2.0 * math.exp(-5 * 0.0625), rel_tol=1e-12)
    m = _method(max_steps=200, warmup_fraction=0.25, warmup_scale=3.0)
    assert math.isclose(m.warmup(0), 3.0 * math.exp(-5), rel_tol=1e-12)
    assert math.isclose(m.warmup(25), 3.0 * math.exp(-1.25), rel_tol=1e-12)
    assert m.warmup(50) == m.warmup(199) == 3.0
    assert m.lr_at(0) == m.lr_at(150) == m.config.lr
    poly = _method(max_steps=100, lr_schedule="poly", lr=0.02)
    assert math.isclose(poly.lr_at(50), 0.02 * 0.5 ** 0.9, rel_tol=1e-12) and poly.lr_at(0) == 0.02
    with pytest.raises(ValueError):
        _method(lr_schedule="cosine").lr_at(0)


# ---- augmentation ------------------------------------------------------------------------------------------------
def test_augment_moves_the_label_with_its_image_draws_the_8_symmetries_evenly_and_can_be_off():
    torch.manual_seed(5)
    mark = torch.zeros(3, 4, 4, dtype=torch.long)          # an asymmetric mark, different in every slice (D)
    mark[0, 0, 1] = mark[1, 1, 0:3] = mark[2, 3, 3] = 1
    y = torch.stack([mark, mark.flip(0)])                   # two labeled samples
    x = y[:, None].float() * torch.tensor([2.0, -1.0])[None, :, None, None, None]  # 2 channels: 2y, -y
    x_u = torch.arange(2 * 3 * 16.0).view(2, 1, 3, 4, 4)
    m = _method()
    counts, counts_u = [0] * 8, [0] * 8
    pairs_differ = same_as_u = 0
    for _ in range(400):
        xa, ya, xua = m._augment(x, y, x_u)
        assert torch.equal(xa[:, 0], 2 * ya.float()) and torch.equal(xa[:, 1], -ya.float())
        ks = [which_symmetry(ya[i], y[i]) for i in range(2)]
        ku = [which_symmetry(xua[i, 0], x_u[i, 0]) for i in range(2)]
        assert -1 not in ks + ku
        counts[ks[0]] += 1
        counts_u[ku[1]] += 1
        pairs_differ += ks[0] != ks[1]
        same_as_u += ks[0] == ku[0]
    assert min(counts) > 25 and max(counts) < 80, counts   # 8 symmetries, 1/8 each (50 expected)
    assert min(counts_u) > 25 and max(counts_u) < 80, counts_u
    assert pairs_differ > 250 and same_as_u < 100           # per-sample draws, unlabeled independent
    wide = torch.arange(2 * 2 * 3 * 5.0).view(2, 1, 2, 3, 5)
    seen = set()
    for _ in range(60):
        (out,) = random_rot_flip(wide)
        seen.update(which_symmetry(out[i, 0], wide[i, 0]) for i in range(2))
    assert seen == {0, 2, 4, 6}                              # H != W: 0 / 180 degrees, flipped or not
    off = _method(augment=False)
    xa, ya, xua = off._augment(x, y, x_u)
    assert xa is x and ya is y and xua is x_u


# ---- diffusion -----------------------------------------------------------------------------------------------------
def _abar(T: int) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 2e-2, T))     # DDPM's linear betas


def test_schedule_signed_scaling_q_sample_and_timestep_range():
    ddpm, ddim = make_schedulers(1000)
    assert np.allclose(ddpm.alphas_cumprod.double().numpy(), _abar(1000), rtol=1e-5)
    assert np.allclose(ddim.alphas_cumprod.double().numpy(), _abar(1000), rtol=1e-5)
    assert torch.equal(to_signed(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.equal(from_signed(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    x0 = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    noise = torch.tensor([[0.3, 2.0], [-1.0, 1.5]])
    t = torch.tensor([0, 999])
    ab = _abar(1000)
    expected = np.sqrt(ab[[0, 999]])[:, None] * x0.numpy() + np.sqrt(1 - ab[[0, 999]])[:, None] * noise.numpy()
    assert np.allclose(q_sample(ddpm, x0, t, noise).numpy(), expected, atol=1e-5)
    small, _ = make_schedulers(7)
    ts = sample_timesteps(small, 4000, torch.device("cpu"))
    assert ts.dtype == torch.long and set(ts.tolist()) == set(range(7))     # uniform over [0, T)


def test_noised_labels_are_eq_5_on_signed_one_hot_with_a_uniform_t():
    m = _method(num_classes=3)
    labels = torch.tensor([[[[0, 1], [2, 1]]], [[[2, 2], [0, 0]]], [[[1, 0], [1, 2]]]])   # [3, 1, 2, 2]
    torch.manual_seed(42)
    y_t, t = m._noised_labels(labels)
    torch.manual_seed(42)
    t_hand = torch.randint(0, 1000, (3,))
    draw = torch.randn_like(torch.zeros(3, 1, 2, 2, 3).movedim(-1, 1))   # the one-hot's layout, as randn_like
    y0 = torch.zeros(3, 3, 1, 2, 2)
    for b in range(3):
        for z, yy, xx in np.ndindex(1, 2, 2):
            y0[b, :, z, yy, xx] = -1.0
            y0[b, int(labels[b, z, yy, xx]), z, yy, xx] = 1.0
    ab = torch.tensor(_abar(1000), dtype=torch.float64)[t_hand].float().view(3, 1, 1, 1, 1)
    assert torch.equal(t, t_hand)
    noise = (y_t - ab.sqrt() * y0) / (1 - ab).sqrt()                       # what eq. 5 added to sqrt(abar) Y_0
    assert torch.allclose(noise, draw, atol=1e-4)
    # on a bigger batch, whatever the draw order: the residual of eq. 5 is standard normal noise
    big = torch.randint(0, 3, (8, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    y_t, t = m._noised_labels(big)
    ab = m.ddpm.alphas_cumprod.double()[t].view(8, 1, 1, 1, 1)
    y0 = 2 * F.one_hot(big, 3).movedim(-1, 1).double() - 1
    resid = (y_t.double() - ab.sqrt() * y0) / (1 - ab).sqrt()
    assert abs(float(resid.mean())) < 0.05 and abs(float(resid.std()) - 1) < 0.05


def test_ddim_step_list_and_the_update_of_eq_12():
    assert ddim_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(10, 2) == [9, 0] and ddim_timesteps(1000, 3) == [999, 500, 0]
    assert ddim_timesteps(5, 5) == [4, 3, 2, 1, 0] and ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)
    abar = torch.tensor(_abar(10), dtype=torch.float32)
    calls = []

    def predict(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.tanh(x) * 0.5 + 0.1 * t.float().view(-1, 1)

    x_T = torch.tensor([[0.8, -1.2, 0.3], [2.0, 0.1, -0.4]])
    out = ddim_reverse(abar, predict, x_T, [9, 4, 0])
    assert [c[1].tolist() for c in calls] == [[9, 9], [4, 4], [0, 0]] and torch.equal(calls[0][0], x_T)
    x = x_T.double()
    a = abar.double()
    for i, (t, s) in enumerate(((9, 4), (4, 0))):
        x0 = torch.tanh(x) * 0.5 + 0.1 * t
        eps = (x - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
        x = a[s].sqrt() * x0 + (1 - a[s]).sqrt() * eps
        assert torch.allclose(calls[i + 1][0].double(), x, atol=1e-5)
    assert torch.allclose(out.double(), torch.tanh(x) * 0.5, atol=1e-5)     # the last x0 prediction
    # eta = 1: sigma^2 = (1 - a_s) / (1 - a_t) (1 - a_t / a_s), fresh noise from the generator
    calls.clear()
    gen = torch.Generator().manual_seed(3)
    ddim_reverse(abar, predict, x_T, [9, 4], eta=1.0, generator=gen)
    n = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3)).double()
    x0 = torch.tanh(x_T.double()) * 0.5 + 0.9
    eps = (x_T.double() - a[9].sqrt() * x0) / (1 - a[9]).sqrt()
    sigma = ((1 - a[4]) / (1 - a[9]) * (1 - a[9] / a[4])).sqrt()
    expected = a[4].sqrt() * x0 + (1 - a[4] - sigma ** 2).sqrt() * eps + sigma * n
    assert torch.allclose(calls[1][0].double(), expected, atol=1e-5)
    _, ddim = make_schedulers(10)
    calls.clear()
    ddim_sample(ddim, predict, x_T, 4)
    assert [int(c[1][0]) for c in calls] == [9, 6, 3, 0]


def test_ds_view_starts_from_seeded_noise_visits_the_ddim_steps_and_returns_the_last_softmax():
    m = _method(ddim_steps=3, num_classes=3)
    m.eval()
    calls = []
    m.ds.register_forward_hook(lambda mod, args, out: calls.append((args, out[0].detach())))
    patch, _ = _batch(1, 0, seed=9)
    patch = patch["image"]
    with torch.no_grad():
        probs = m._ds_probs(patch, torch.Generator().manual_seed(13))
    assert len(calls) == 3
    noise = torch.randn((1, 3, S, S, S), generator=torch.Generator().manual_seed(13))
    assert torch.equal(calls[0][0][1], noise)                               # Y_T: pure noise, seeded
    assert [c[0][2].tolist() for c in calls] == [[999], [500], [0]]
    assert all(torch.equal(c[0][0], patch) for c in calls)                  # conditioned on the image
    a = torch.tensor(_abar(1000), dtype=torch.float64)
    x = noise.double()
    for (t, s), (_, logits) in zip(((999, 500), (500, 0)), calls[:2]):
        x0 = 2 * torch.softmax(logits.double(), dim=1) - 1
        eps = (x - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
        x = a[s].sqrt() * x0 + (1 - a[s]).sqrt() * eps
    assert torch.allclose(calls[2][0][1].double(), x, atol=1e-4)
    assert torch.allclose(probs, torch.softmax(calls[2][1], dim=1), atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(1, S, S, S), atol=1e-5)


def test_ds_network_is_a_time_embedded_vnet_on_image_and_label_that_both_reach_the_output():
    m = _method(num_classes=3)
    m.eval()
    g = torch.Generator().manual_seed(1)
    img, y_t = torch.randn(1, 1, S, S, S, generator=g), torch.randn(1, 3, S, S, S, generator=g)
    t = torch.tensor([321])
    with torch.no_grad():
        logits, feats = m.ds(img, y_t, t)
        hand_l, hand_f = m.ds.vnet(torch.cat([img, y_t], 1), m.ds.time_embed(t), return_features=True)
        assert torch.equal(logits, hand_l) and torch.equal(feats, hand_f)
        assert m.ds.vnet.encoder.stage1.convs[0][0].in_channels == 1 + 3
        for changed in ((img, -y_t, t), (img, y_t, torch.tensor([20])), (img * 0.5, y_t, t)):
            assert (m.ds(*changed)[0] - logits).abs().max() > 1e-3
    emb = SinusoidalEmbedding(6, scale=2.0)
    v = torch.tensor([0.5, 3.0])
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    sin = torch.tensor([[math.cos(2 * x * f) for f in freqs] + [math.sin(2 * x * f) for f in freqs] for x in v])
    with torch.no_grad():
        assert torch.allclose(emb(v), emb.mlp(sin.float()), atol=1e-6) and emb.out_dim == 24


def test_conv_stage_adds_the_time_embedding_after_its_first_conv():
    torch.manual_seed(0)
    stage = ConvStage(2, 2, 3, norm="none", emb_dim=4)
    x, e = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4)
    with torch.no_grad():
        h = stage.convs[0](x) + stage.emb(e)[:, :, None, None, None]
        assert torch.allclose(stage(x, e), stage.convs[1](h), atol=1e-6)
        assert torch.allclose(stage(x), stage.convs[1](stage.convs[0](x)), atol=1e-6)


# ---- views and predict -------------------------------------------------------------------------------------------
def test_pseudo_labels_and_predict_in_eval_mode_with_the_configs_seed():
    m = _method(seed=7, num_classes=3)
    labeled, unlabeled = _batch(1, 1, seed=2, classes=3)
    m.train_step(labeled, unlabeled, 0)
    m.train()
    volume = unlabeled["image"][0]
    stats = [b.clone() for b in m.cs.buffers()] + [b.clone() for b in m.ds.buffers()]
    views = m.pseudo_labels(volume)
    assert set(views) == {"cs", "ds"} and m.cs.training and m.ds.training and m.head.training
    assert all(torch.equal(a, b) for a, b in zip(stats, [*m.cs.buffers(), *m.ds.buffers()]))  # no BN update
    m.eval()
    with torch.no_grad():
        cs = torch.softmax(m.cs(volume[None])[0], 1)[0].argmax(0).numpy()
        ds = m._ds_probs(volume[None], torch.Generator().manual_seed(7))[0].argmax(0).numpy()
        ds_other = m._ds_probs(volume[None], torch.Generator().manual_seed(0))[0].argmax(0).numpy()
    assert views["cs"].dtype == np.uint8 and views["cs"].shape == (S, S, S)
    assert np.array_equal(views["cs"], cs) and np.array_equal(views["ds"], ds)
    assert not np.array_equal(ds, ds_other) or len(np.unique(ds)) == 1
    m.train()
    assert np.array_equal(m.predict(volume), cs) and m.cs.training
    m.eval()
    m.head.train()
    m.pseudo_labels(volume)
    assert not m.cs.training and not m.ds.training and m.head.training          # each module's mode restored


# ---- contrastive label propagation (eq. 11-15) ------------------------------------------------------------------
def test_select_pairs_on_fixed_vectors():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.1, -1.0], [-1.0, -1.0], [0.6, 0.8]])
    b = F.normalize(c, dim=1)
    # score_j = sum_i cos(a_i, b_j): 1.414, -1, 1, -0.896, -1.414, 1.4 (eq. 12; eq. 13 = 2 - score)
    pos, neg = select_pairs(anchors, b, 2)
    assert pos.tolist() == [0, 5] and neg.tolist() == [4, 1]
    pos, neg = select_pairs(anchors, b, 50)                 # k clipped to q // 2
    assert pos.tolist() == [0, 5, 2] and neg.tolist() == [4, 1, 3]


def test_label_propagation_loss_by_hand_with_normalisation_temperature_and_reduction():
    a0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]])             # class 0 anchors (not unit length)
    a1 = torch.zeros(0, 2)                                  # class 1: empty bank, skipped
    a2 = torch.tensor([[0.0, -3.0]])
    cands = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-1.0, 0.0], [0.0, -2.0], [1.0, 1.0]])
    tau, k = 0.4, 2

    def unit(v):
        n = math.hypot(*v)
        return [x / n for x in v]

    A0, A2, B = [unit(v) for v in a0.tolist()], [unit(v) for v in a2.tolist()], [unit(v) for v in cands.tolist()]
    cos = lambda u, v: u[0] * v[0] + u[1] * v[1]  # noqa: E731
    total, terms = 0.0, 0
    for anchors in (A0, A2):
        score = [sum(cos(a, b) for a in anchors) for b in B]
        order = sorted(range(5), key=lambda j: -score[j])
        pos, neg = order[:k], order[-k:]
        for a in anchors:
            for j in pos:
                num = math.exp(cos(a, B[j]) / tau)
                total += -math.log(num / (num + sum(math.exp(cos(a, B[n]) / tau) for n in neg)))
                terms += 1
    got_sum = label_propagation_loss([a0, a1, a2], cands, k, tau, "sum")
    got_mean = label_propagation_loss([a0, a1, a2], cands, k, tau, "mean")
    assert math.isclose(float(got_sum), total, rel_tol=1e-5) and terms == 6
    assert math.isclose(float(got_mean), total / terms, rel_tol=1e-5)
    assert math.isclose(float(label_propagation_loss([a0, a1, a2], 7 * cands, k, tau, "mean")), total / terms,
                        rel_tol=1e-5)
    with pytest.raises(ValueError):
        label_propagation_loss([a0], cands, k, tau, "max")
    b = cands.clone().requires_grad_(True)
    empty = label_propagation_loss([a1, a1], b, k, tau, "mean")
    empty.backward()
    assert float(empty) == 0.0 and b.grad is not None


def test_memory_bank_fifo_overflow_sampling_and_state():
    bank = ClassMemoryBank(num_classes=2, size=4, dim=2)
    bank.push(1, torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert bank.count.tolist() == [0, 2] and bank.ptr.tolist() == [0, 2]
    assert torch.allclose(bank.features[1, :2], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    bank.push(1, torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -5.0]]))   # the 5th overwrites the oldest
    assert bank.count.tolist() == [0, 4] and bank.ptr.tolist() == [0, 1]
    assert torch.allclose(bank.features[1], torch.tensor([[0.0, -1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
    bank.push(0, torch.arange(12.0).view(6, 2) + 1)                        # more than size: the last 4 kept
    assert bank.count[0] == 4 and torch.allclose(bank.features[0], F.normalize(torch.arange(4.0, 12).view(4, 2) + 1,
                                                                               dim=1))
    bank.push(0, torch.zeros(0, 2))
    assert bank.count[0] == 4
    small = ClassMemoryBank(2, 6, 2)
    small.push(0, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    torch.manual_seed(0)
    for _ in range(20):
        got = small.sample(0, 2)
        rows = {tuple(r) for r in got.tolist()}
        assert len(rows) == 2 and rows <= {(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)}  # filled slots only, distinct
    assert small.sample(0, 10).shape == (3, 2) and small.sample(1, 3).shape == (0, 2)
    state = small.state()
    other = ClassMemoryBank(2, 6, 2)
    other.load(state)
    assert torch.equal(other.features, small.features) and other.count.tolist() == [3, 0]
    assert other.ptr.tolist() == [3, 0]


def test_sample_voxels_takes_whole_feature_vectors_of_masked_voxels():
    feats = torch.zeros(2, 3, 2, 2, 2)
    for b, z, y, x in np.ndindex(2, 2, 2, 2):
        v = ((b * 2 + z) * 2 + y) * 2 + x
        feats[b, :, z, y, x] = torch.tensor([100.0 * v, 100.0 * v + 1, 100.0 * v + 2])
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = mask[1, 0, 1, 1] = mask[1, 1, 1, 0] = True
    torch.manual_seed(0)
    got = sample_voxels(feats, 10, mask)
    assert sorted(int(r[0]) // 100 for r in got) == [5, 11, 14]
    assert all(r[1] == r[0] + 1 and r[2] == r[0] + 2 for r in got.tolist())
    got = sample_voxels(feats, 5)
    ids = [int(r[0]) // 100 for r in got]
    assert len(ids) == 5 == len(set(ids)) and all(r[2] == r[0] + 2 for r in got.tolist())
    assert sample_voxels(feats, 2, mask).shape == (2, 3)


def test_update_bank_stores_normalised_projections_of_correct_voxels_per_class_capped():
    m = _method(bank_update=3, bank_size=16, num_classes=3)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 2, 2, 2, generator=g)
    labels = torch.tensor([[[[0, 1], [1, 1]], [[1, 1], [2, 0]]]])
    pred = torch.tensor([[[[0, 1], [0, 1]], [[1, 2], [2, 0]]]])          # wrong at 2 voxels
    m._update_bank(feats, pred, labels)
    with torch.no_grad():
        proj = F.normalize(m.head(feats.movedim(1, -1).reshape(-1, 8)), dim=1)
    lab, ok = labels.reshape(-1), (pred == labels).reshape(-1)
    assert m.bank.count.tolist() == [2, 3, 1]                                 # class 1: 4 correct, capped at 3
    for cls in range(3):
        allowed = proj[(lab == cls) & ok]
        stored = m.bank.features[cls, :int(m.bank.count[cls])]
        match = (stored @ allowed.t()).max(1).values
        assert torch.allclose(match, torch.ones_like(match), atol=1e-5), cls
        assert len({tuple(np.round(r, 5)) for r in stored.tolist()}) == stored.shape[0]


def test_contrastive_term_reads_bank_anchors_and_projected_unlabeled_candidates(monkeypatch):
    m = _method(num_classes=3, cl_anchors=4, cl_candidates=20, cl_topk=3, cl_tau=0.25, cl_reduction="sum")
    g = torch.Generator().manual_seed(2)
    m.bank.push(0, torch.randn(6, 8, generator=g))
    m.bank.push(2, torch.randn(2, 8, generator=g))
    feats = torch.randn(1, 8, 4, 4, 4, generator=g)
    seen = []

    def spy(*args):
        seen.append(args)
        return label_propagation_loss(*args)

    monkeypatch.setattr(dm, "label_propagation_loss", spy)
    loss = m._contrastive(feats)
    ((anchors, cands, k, tau, reduction),) = seen
    assert (k, tau, reduction) == (3, 0.25, "sum") and [a.shape[0] for a in anchors] == [4, 0, 2]
    for cls, a in enumerate(anchors):
        stored = m.bank.features[cls, :int(m.bank.count[cls])]
        assert all(any(torch.equal(r, s) for s in stored) for r in a)
    with torch.no_grad():
        proj = m.head(feats.movedim(1, -1).reshape(-1, 8))
    assert cands.shape == (20, 8)
    assert torch.allclose((F.normalize(cands, dim=1) @ F.normalize(proj, dim=1).t()).max(1).values,
                          torch.ones(20), atol=1e-5)
    assert cands.requires_grad and math.isclose(float(loss), float(label_propagation_loss(anchors, cands, 3, 0.25,
                                                                                          "sum")), rel_tol=1e-6)


# ---- HFM (eq. 10) and the selective scan --------------------------------------------------------------------------
def _naive_scan(u, delta, A, B, C, D=None, z=None, bias=None, softplus=False):
    b_n, d_n, L = u.shape
    n_n = A.shape[1]
    y = torch.zeros(b_n, d_n, L, dtype=torch.float64)
    for b in range(b_n):
        for d in range(d_n):
            h = [0.0] * n_n
            for t in range(L):
                dt = float(delta[b, d, t]) + (float(bias[d]) if bias is not None else 0.0)
                dt = math.log1p(math.exp(dt)) if softplus else dt
                uu = float(u[b, d, t])
                h = [math.exp(dt * float(A[d, n])) * h[n] + dt * float(B[b, n, t]) * uu for n in range(n_n)]
                out = sum(float(C[b, n, t]) * h[n] for n in range(n_n))
                if D is not None:
                    out += float(D[d]) * uu
                if z is not None:
                    zz = float(z[b, d, t])
                    out *= zz / (1 + math.exp(-zz))
                y[b, d, t] = out
    return y


def test_selective_scans_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 2, 3, 7
    u, delta, z = (torch.randn(b, d, L, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2
    B, C = torch.randn(b, n, L, generator=g, dtype=torch.float64), torch.randn(b, n, L, generator=g,
                                                                                dtype=torch.float64)
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    full = _naive_scan(u, delta, A, B, C, D, z, bias, softplus=True)
    assert torch.allclose(selective_scan_ref(u, delta, A, B, C, D, z, bias, True), full, atol=1e-10)
    for chunk in (None, 1, 2, 3, 7, 20):
        got = selective_scan_torch(u, delta, A, B, C, D, z, bias, True, chunk_size=chunk)
        assert torch.allclose(got, full, atol=1e-10), chunk
    plain = _naive_scan(u, delta.abs(), A, B, C)
    assert torch.allclose(selective_scan_torch(u, delta.abs(), A, B, C, chunk_size=3), plain, atol=1e-10)
    assert torch.allclose(selective_scan(u, delta.abs(), A, B, C, backend="torch"), plain, atol=1e-10)
    with pytest.raises(ValueError):
        selective_scan(u, delta, A, B, C, backend="triton")


def test_scan_orders_by_hand():
    assert scan_order("forward", (2, 2, 3)).tolist() == list(range(12))
    assert scan_order("backward", (2, 2, 3)).tolist() == list(range(11, -1, -1))
    assert scan_order("slice", (2, 2, 3)).tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    assert scan_order("slice", (3, 1, 2)).tolist() == [0, 2, 4, 1, 3, 5]
    with pytest.raises(ValueError):
        scan_order("diagonal", (2, 2, 2))


def _perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_scan_path_is_causal_conv_then_the_selective_ssm_with_its_own_parameters():
    torch.manual_seed(0)
    path = _ScanPath(d_inner=2, d_state=2, d_conv=3, dt_rank=1, dt_min=1e-3, dt_max=0.1)
    assert torch.equal(path.A_log, torch.log(torch.tensor([[1.0, 2.0], [1.0, 2.0]])))
    assert torch.equal(path.D, torch.ones(2))
    dt0 = F.softplus(path.dt_proj.bias)
    assert bool(((dt0 >= 1e-3 - 1e-7) & (dt0 <= 0.1 + 1e-7)).all())
    _perturb(path)
    x = torch.randn(1, 2, 6)
    with torch.no_grad():
        out = path(x, "torch", 2)
        conv = F.conv1d(x, path.conv1d.weight, path.conv1d.bias, padding=2, groups=2)[..., :6]
        h = F.silu(conv)
        proj = h.transpose(1, 2) @ path.x_proj.weight.t()                      # [1, L, 1 + 2 + 2]
        dt, bb, cc = proj[..., :1], proj[..., 1:3], proj[..., 3:5]
        delta = (dt @ path.dt_proj.weight.t()).transpose(1, 2)
        A = -torch.exp(path.A_log)
        hand = _naive_scan(h, delta, A, bb.transpose(1, 2), cc.transpose(1, 2), path.D, None, path.dt_proj.bias,
                           softplus=True)
        assert torch.allclose(out.double(), hand, atol=1e-5)
        later = x.clone()
        later[..., 4] += 1.0
        moved = path(later, "torch", 2)
    assert torch.equal(moved[..., :4], out[..., :4]) and (moved[..., 4:] - out[..., 4:]).abs().max() > 1e-4


def test_space_mamba_sums_the_three_scans_put_back_in_token_order():
    torch.manual_seed(1)
    sm = SpaceMamba(dim=2, d_state=2, d_conv=2, expand=1, scan_backend="torch", chunk_size=3)
    _perturb(sm, seed=1)
    spatial = (2, 2, 3)
    tokens = torch.randn(2, 12, 2)
    orders = {"forward": list(range(12)), "backward": list(range(11, -1, -1)),
              "slice": [z * 6 + p for p in range(6) for z in range(2)]}
    with torch.no_grad():
        xz = tokens @ sm.in_proj.weight.t()
        x, z = xz[..., :2].transpose(1, 2), xz[..., 2:]
        y = torch.zeros(2, 2, 12)
        for name, order in orders.items():
            out = sm.paths[f"{name}_scan"](x[..., order], "torch", 3)
            y[..., order] += out                                                # token order[i] <- scan step i
        hand = (y * F.silu(z).transpose(1, 2)).transpose(1, 2) @ sm.out_proj.weight.t()
        assert torch.allclose(sm(tokens, spatial), hand, atol=1e-5)


def test_high_pass_mask_and_filter_by_hand():
    mask = high_pass_mask((4, 3, 4), 0.8)
    fz, fy = [-1.0, -0.5, 0.0, 0.5], [-2 / 3, 0.0, 2 / 3]                     # centred, over Nyquist
    for i, j, k in np.ndindex(4, 3, 4):
        assert bool(mask[i, j, k]) == (math.sqrt(fz[i] ** 2 + fy[j] ** 2 + fz[k] ** 2) > 0.8), (i, j, k)
    g = np.random.default_rng(0)
    x = g.normal(size=(2, 3, 4, 6, 5))
    freqs = [np.fft.fftfreq(n) / 0.5 for n in (4, 6, 5)]
    radius = np.sqrt(sum(f ** 2 for f in np.meshgrid(*freqs, indexing="ij")))
    for thr in (0.5, 0.8):
        hand = np.fft.ifftn(np.fft.fftn(x, axes=(-3, -2, -1)) * (radius > thr), axes=(-3, -2, -1)).real
        got = high_pass_filter(torch.tensor(x, dtype=torch.float32), thr)
        assert got.dtype == torch.float32 and np.allclose(got.numpy(), hand, atol=1e-5), thr
    const = torch.full((1, 1, 4, 4, 4), 3.0)
    assert float(high_pass_filter(const, 0.5).abs().max()) < 1e-5
    zz, yy, xx = np.meshgrid(*(np.arange(4),) * 3, indexing="ij")
    checker = torch.tensor((-1.0) ** (zz + yy + xx), dtype=torch.float32)[None, None]
    assert torch.allclose(high_pass_filter(checker, 0.8), checker, atol=1e-5)   # the corner frequency is kept


def test_spatial_attention_and_hfm_block_are_eq_10_composed():
    torch.manual_seed(2)
    sa = GatedSpatialAttention(4)
    _perturb(sa, seed=2)
    f = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(sa(f), f + sa.proj(sa.path(f) * torch.sigmoid(sa.gate(f))), atol=1e-6)
    hfm = HighFrequencyMamba(4, 0.6, d_state=2, d_conv=2, expand=1, mlp_ratio=1.5, scan_backend="torch")
    _perturb(hfm, scale=0.1, seed=3)
    with torch.no_grad():
        f_h = high_pass_filter(hfm.sa(f), 0.6)
        tok = f_h.flatten(2).transpose(1, 2)
        f_m = hfm.mamba(hfm.norm1(tok), (4, 4, 4)) + tok
        f_o = hfm.mlp(hfm.norm2(f_m)) + f_m
        assert torch.allclose(hfm(f), f_o.transpose(1, 2).reshape(1, 4, 4, 4, 4), atol=1e-5)
    assert hfm.mlp[0].out_features == 6 and isinstance(hfm.mlp[1], torch.nn.GELU)


def test_cs_network_adds_hfm_output_on_its_levels_and_decodes_the_sum():
    m = _method(hfm_levels=(2, 4), hf_threshold=0.55)
    assert sorted(m.cs.hfm) == ["2", "4"]
    assert [m.cs.hfm[k].norm1.normalized_shape[0] for k in ("2", "4")] == [4 * 8, 16 * 8]
    assert all(b.hf_threshold == 0.55 for b in m.cs.hfm.values())
    m.eval()
    x = torch.randn(1, 1, S, S, S)
    decoded = []
    m.cs.decoder.register_forward_hook(lambda mod, args, out: decoded.append([f.clone() for f in args[0]]))
    with torch.no_grad():
        raw = [f.clone() for f in m.cs.encoder(x)]
        got_l, got_f = m.cs(x)
        (seen,) = decoded
        for level in range(5):                                      # x_i + HFM_i(x_i) on the HFM levels only
            want = raw[level] + m.cs.hfm[str(level)](raw[level]) if level in (2, 4) else raw[level]
            assert torch.allclose(seen[level], want, atol=1e-6, rtol=1e-5), level
            if level in (2, 4):
                assert (seen[level] - raw[level]).abs().max() > 1e-3
        logits, last = m.cs.decoder(seen, return_features=True)
    assert torch.allclose(got_l, logits, atol=1e-6) and torch.allclose(got_f, last, atol=1e-6)
    assert _method(use_hfm=False).cs.hfm is None
    with pytest.raises(ValueError):
        _method(hfm_levels=(5,))


# ---- config against the paper --------------------------------------------------------------------------------------
def test_config_defaults_and_presets_are_the_papers():
    c = DiffCLConfig()
    assert (c.lr, c.momentum, c.weight_decay, c.lr_schedule, c.nesterov) == (0.01, 0.9, 3e-5, "constant", False)
    assert (c.batch_labeled, c.batch_unlabeled, c.augment) == (2, 2, True)
    assert (c.mu1, c.mu2, c.lambda1, c.lambda2, c.beta1, c.beta2, c.eta) == (1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.007)
    assert (c.warmup_scale, c.warmup_fraction, c.hf_threshold) == (2.0, 1.0, 0.8)
    assert (c.diffusion_steps, c.noise_schedule, c.features, c.norm, c.dropout) == (1000, "linear_beta", 16,
                                                                                    "batch", 0.5)
    assert (c.use_hfm, c.hfm_levels, c.hfm_d_state, c.hfm_d_conv, c.hfm_expand) == (True, (1, 2, 3, 4), 16, 4, 2)
    assert (c.use_cl, c.cl_reduction, c.cl_tau) == (True, "mean", 0.1)
    rows = {"la": (0.7, 0.6, 0.01), "la_more": (0.5, 0.7, 0.01), "pancreas": (0.007, 0.8, 0.1),
            "pancreas_more": (0.0003, 0.5, 0.1), "brats": (0.007, 0.5, 0.1), "brats_more": (0.003, 0.5, 0.1)}
    strides = {"la": (4, 18, 18), "pancreas": (16, 16, 16), "brats": (64, 64, 64)}
    for name, (eta, hf, beta) in rows.items():
        p = DiffCL.make_config(name)
        assert (p.eta, p.hf_threshold, p.beta1, p.beta2, p.hold_out_from) == (eta, hf, beta, beta, None), name
        assert (p.mu1, p.mu2, p.lambda1, p.lambda2, p.lr) == (1.0, 1.0, 1.0, 1.0, 0.01), name
        stride = strides[name.split("_")[0]]
        # MONAI steps int(patch (1 - overlap)) voxels: the paper's strides per (z, y, x) axis
        assert tuple(int(s * (1 - o)) for s, o in zip(p.patch_size, p.sw_overlap)) == stride, name
    assert DiffCL.make_config("la").patch_size == (80, 112, 112)
    pan, brats, la = (DiffCL.make_config(n) for n in ("pancreas", "brats", "la"))
    assert pan.patch_size == brats.patch_size == (96, 96, 96)
    assert (pan.intensity_window, pan.target_spacing) == ((-120.0, 240.0), (1.0, 1.0, 1.0))
    assert (brats.intensity_window, brats.target_spacing) == (None, (1.0, 1.0, 1.0))
    assert (la.intensity_window, la.target_spacing) == (None, None)
    with pytest.raises(ValueError):
        DiffCL(DiffCL.make_config("tiny", patch_size=(16, 24, 16)))


# ---- the review path Diff-CL's views go through ------------------------------------------------------------------
def test_review_scores_of_two_views():
    from backend.engine.metrics import agreement, dice_per_class
    from backend.review.views import disagreement, majority_vote, slice_profile, worst_slice

    cs = np.array([[[0, 1, 1, 2]], [[2, 2, 0, 0]]], dtype=np.uint8)
    ds = np.array([[[0, 1, 0, 2]], [[1, 2, 0, 0]]], dtype=np.uint8)
    d = disagreement([cs, ds])
    assert d.tolist() == [[[0, 0, 1, 0]], [[1, 0, 0, 0]]] and disagreement([cs, cs]).sum() == 0
    assert majority_vote([cs, ds], 3).tolist() == [[[0, 1, 0, 2]], [[1, 2, 0, 0]]]   # ties: the lower class
    assert majority_vote([cs, ds, ds], 3).tolist() == ds.tolist()
    assert np.allclose(dice_per_class(cs, ds, 3), [2 * 1 / 4, 2 * 2 / 5])          # background left out
    score = agreement({"diffcl:cs": cs, "diffcl:ds": ds}, 3)
    assert score["agreement_worst"] == pytest.approx(0.5, abs=1e-6)
    assert score["agreement_mean"] == pytest.approx((0.5 + 0.8) / 2, abs=1e-6)
    assert slice_profile(d).tolist() == [1, 1] and worst_slice([0, 3, 3, 1]) == 1 and worst_slice([0, 0]) is None


def test_review_queue_puts_the_least_agreeing_unlabeled_case_first():
    from backend.review.queue import sort_review_queue

    rows = [{"case": "a", "labeled": False, "scores": {"diffcl": {"mean": 0.9}}},
            {"case": "b", "labeled": True, "scores": {"diffcl": {"mean": 0.1}}},
            {"case": "c", "labeled": False, "scores": {"diffcl": {"mean": 0.4}, "diffrect": {"mean": 0.95}}},
            {"case": "d", "labeled": False, "scores": {"diffcl": {"mean": None}}}]
    assert [r["case"] for r in sort_review_queue(rows, "mean")] == ["c", "a", "d", "b"]


# ---- smaller pieces: no unlabeled data, checkpoints of the bank, head, dropout, norm, schedule length --------------
def test_step_without_unlabeled_data_and_without_cl():
    m = _method(use_cl=False)
    labeled, unlabeled = _batch(2, 1, seed=1)           # BN at the 1^3 bottleneck needs 2 samples
    logs = m.train_step(labeled, None, step=5)
    assert logs["loss_cps_cs"] == logs["loss_cps_ds"] == logs["loss_cl"] == 0.0 and "agreement_u" not in logs
    assert math.isclose(logs["loss_cs"], logs["loss_sup_cs"]) and math.isclose(logs["loss_ds"], logs["loss_sup_ds"])
    assert int(m.bank.count.sum()) == 0
    m.train_step(labeled, unlabeled, step=5)
    assert int(m.bank.count.sum()) == 0                    # use_cl off: the bank is never filled
    (same,) = random_rot_flip(labeled["image"][:0])
    assert same.shape == (0, 1, S, S, S)
    logs = m.train_step(labeled, {"image": labeled["image"][:0]}, step=5)
    assert logs["loss_cps_cs"] == 0.0 and "agreement_u" not in logs


def test_bank_travels_with_the_state_dict():
    m, other = _method(), _method()
    m.bank.push(1, torch.randn(5, m.config.proj_dim))
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.bank.features, m.bank.features) and other.bank.count.tolist() == [0, 5]
    assert other.bank.ptr.tolist() == [0, 5]


def test_projection_head_dropout_norm_and_schedule_length_follow_the_config():
    m = _method(dropout=0.5, diffusion_steps=50, proj_dim=5)
    x = torch.randn(7, 8)
    lin1, lin2 = m.head.net[0], m.head.net[2]
    with torch.no_grad():
        assert torch.allclose(m.head(x), torch.relu(x @ lin1.weight.t() + lin1.bias) @ lin2.weight.t() + lin2.bias,
                              atol=1e-6)
    assert m.head(x).shape == (7, 5) and m.bank.features.shape == (2, m.config.bank_size, 5)
    assert isinstance(m.cs.encoder.stage1.convs[0][1], torch.nn.BatchNorm3d)
    assert isinstance(m.ds.vnet.encoder.stage1.convs[0][1], torch.nn.BatchNorm3d)
    img = torch.randn(2, 1, S, S, S)
    with torch.no_grad():
        m.eval()
        logits, feats = m.cs(img)
        assert torch.allclose(logits, m.cs.decoder.out(feats), atol=1e-6)       # no dropout at inference
        m.train()
        torch.manual_seed(0)
        logits, feats = m.cs(img)
        assert (logits - m.cs.decoder.out(feats)).abs().max() > 1e-4             # dropout before the output conv
    assert m.ddpm.num_train_timesteps == m.ddim.num_train_timesteps == 50
    assert np.allclose(m.ddpm.alphas_cumprod.double().numpy(), _abar(50), rtol=1e-5)
    assert np.allclose(m.ddim.alphas_cumprod.double().numpy(), _abar(50), rtol=1e-5)
    one = label_propagation_loss([torch.randn(3, 4)], torch.randn(1, 4), 2, 0.1, "mean")
    assert float(one) == 0.0                                                      # one candidate: no pairs
    with pytest.raises(RuntimeError):
        selective_scan(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), -torch.ones(1, 1), torch.zeros(1, 1, 2),
                       torch.zeros(1, 1, 2), backend="cuda")


def test_network_sizes_come_from_the_config():
    m = _method(features=4, hfm_d_state=3, hfm_d_conv=2, hfm_expand=3, hfm_mlp_ratio=1.5, scan_chunk=5,
                time_embed_dim=12, hfm_levels=(3,), num_classes=3, in_channels=2, scan_backend="torch")
    block = m.cs.hfm["3"]
    path = block.mamba.paths["slice_scan"]
    assert tuple(path.A_log.shape) == (3 * 32, 3) and path.conv1d.kernel_size == (2,)
    assert block.mamba.in_proj.out_features == 2 * 3 * 32 and block.mlp[0].out_features == 48
    assert block.mamba.chunk_size == 5 and block.mamba.scan_backend == "torch"
    assert set(block.mamba.paths) == {"forward_scan", "backward_scan", "slice_scan"}
    assert _method().cs.hfm["2"].mamba.chunk_size is None                  # scan_chunk 0: ceil(sqrt(L))
    assert m.ds.time_embed.dim == 12 and m.ds.vnet.encoder.stage1.convs[0][0].in_channels == 2 + 3
    assert m.cs.encoder.stage1.convs[0][0].in_channels == 2 and m.cs.decoder.out.out_channels == 3
    assert m.cs.encoder.stage1.convs[0][0].out_channels == 4 and m.head.net[0].in_features == 4
