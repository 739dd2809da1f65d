"""Diff-CL (backend.methods.diffcl.method): config and presets (strides, preprocessing, run length), contrastive label
propagation (eq. 11-15 written out), memory bank, augmentation, one test per semantic rule of the paper (which
label supervises which network, each loss term with its weight and the network it trains, what DS is conditioned
on, what the bank and L_cl are fed, what each review view depends on), checkpoints, and learning on a real volume
scored on a slab never trained on.  bench/mutants.py checks that one-line bugs in these rules fail the fast tests."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from helpers.spy import record_calls
from helpers.symmetry import which_symmetry
from backend.methods import get_method
from backend.methods.diffcl.method import DiffCL, DiffCLConfig, random_rot_flip
from backend.methods.diffcl.contrast import ClassMemoryBank, label_propagation_loss, select_pairs
from backend.methods.layers.diffusion import to_signed

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is as fast (see conftest)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no CUDA device here")


def _batch(n_l=1, n_u=1, size=32, classes=2, seed=0, device="cpu"):
    """Synthetic 3D batch: a bright ball (class 1, and class 2 for its core when 3 classes) on noise."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    images, labels = [], []
    for _ in range(n_l + n_u):
        c = torch.randint(size // 3, 2 * size // 3, (3,), generator=g).float()
        r = torch.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        lab = (r < size / 4).long() + ((r < size / 8).long() if classes > 2 else 0)
        images.append(lab.float() + 0.3 * torch.randn(size, size, size, generator=g))
        labels.append(lab)
    img = torch.stack(images)[:, None].to(device)
    lab = torch.stack(labels)[:, None].to(device)
    return {"image": img[:n_l], "label": lab[:n_l]}, {"image": img[n_l:]}


def _tiny(**overrides) -> DiffCL:
    torch.manual_seed(0)
    return DiffCL(DiffCL.make_config("tiny", **overrides))


# ---- configuration ---------------------------------------------------------------------------------------------
def test_registered_with_views_and_paper_presets():
    assert get_method("diffcl") is DiffCL
    assert DiffCL.dims == 3 and DiffCL.views == ("cs", "ds") and DiffCL.primary_view == "cs"
    default = DiffCL.make_config()
    assert isinstance(default, DiffCLConfig)
    # Sec. 5.1: SGD lr 0.01 (constant), momentum 0.9, weight decay 3e-5, batch 4
    assert (default.lr, default.momentum, default.weight_decay) == (0.01, 0.9, 3e-5)
    assert default.batch_labeled + default.batch_unlabeled == 4
    la = DiffCL.make_config("la")
    assert la.patch_size == (80, 112, 112)  # the paper's 112x112x80 (x, y, z) in (z, y, x) order
    assert (la.eta, la.hf_threshold, la.beta1, la.beta2) == (0.7, 0.6, 0.01, 0.01)
    pancreas = DiffCL.make_config("pancreas")
    assert pancreas.patch_size == (96, 96, 96) and (pancreas.eta, pancreas.hf_threshold) == (0.007, 0.8)
    brats = DiffCL.make_config("brats")
    assert (brats.eta, brats.hf_threshold, brats.beta1) == (0.007, 0.5, 0.1)
    for cfg in (la, pancreas, brats):
        assert (cfg.mu1, cfg.mu2, cfg.lambda1, cfg.lambda2) == (1.0, 1.0, 1.0, 1.0)
    for name in DiffCL.presets:
        cfg = DiffCL.make_config(name)
        assert all(s % 16 == 0 for s in cfg.patch_size), name
    assert DiffCLConfig.from_dict(json_roundtrip(DiffCL.make_config("la"))) == DiffCL.make_config("la")


def test_paper_presets_sliding_window_strides_preprocessing_and_method_defaults():
    """Sec. 5.1: strides 18 x 18 x 4 (x, y, z) for LA, 16 and 64 for Pancreas and BraTS, as MONAI steps them;
    the CT window of Pancreas and the 1 mm grids; flip/rotation on, L_cl's mean (see the module docstring), HFM
    below the bottleneck."""
    from monai.inferers.utils import _get_scan_interval

    def interval(cfg):
        image = tuple(4 * s for s in cfg.patch_size)
        return _get_scan_interval(image, cfg.patch_size, 3, cfg.sw_overlap)

    la, pancreas, brats = (DiffCL.make_config(n) for n in ("la", "pancreas", "brats"))
    assert interval(la) == (4, 18, 18) and interval(DiffCL.make_config("la_more")) == (4, 18, 18)
    assert interval(pancreas) == (16, 16, 16) and interval(brats) == (64, 64, 64)
    assert pancreas.intensity_window == (-120.0, 240.0) and pancreas.target_spacing == (1.0, 1.0, 1.0)
    assert brats.target_spacing == (1.0, 1.0, 1.0) and brats.intensity_window is None
    assert la.target_spacing is None and la.intensity_window is None  # LA is 0.625 mm isotropic, MR
    for cfg in (la, pancreas, brats):
        assert cfg.augment and cfg.cl_reduction == "mean" and cfg.hfm_levels == (1, 2, 3, 4)
    assert DiffCLConfig.from_dict(json_roundtrip(pancreas)) == pancreas


def json_roundtrip(cfg):
    import json

    return json.loads(cfg.to_json())


def test_constant_lr_and_gaussian_warmup():
    m = _tiny(max_steps=100)
    assert m.lr_at(0) == m.lr_at(99) == m.config.lr
    assert math.isclose(m.warmup(0), 2.0 * math.exp(-5.0))
    assert math.isclose(m.warmup(50), 2.0 * math.exp(-5.0 * 0.25))
    assert math.isclose(m.warmup(100), 2.0)
    poly = _tiny(max_steps=100, lr_schedule="poly")
    assert poly.lr_at(50) < poly.lr_at(0)


def test_with_steps_shortens_the_warmup_with_the_run():
    """--steps: lambda(t) keeps its place relative to the run's end (t_max = the last step)."""
    full = DiffCL.make_config("pancreas")
    short = full.with_steps(300)
    assert short.max_steps == 300 and DiffCLConfig.run_length_fields == ()
    m_full = DiffCL.__new__(DiffCL)
    m_full.config = full
    m_short = DiffCL.__new__(DiffCL)
    m_short.config = short
    assert math.isclose(m_short.warmup(150), m_full.warmup(full.max_steps // 2))
    assert math.isclose(m_short.warmup(150), 2.0 * math.exp(-5.0 * 0.25))
    assert math.isclose(m_short.warmup(300), 2.0) and m_full.warmup(300) < 0.02


def test_rejects_patch_not_divisible_by_16():
    with pytest.raises(ValueError):
        DiffCL(DiffCL.make_config("tiny", patch_size=(24, 32, 32)))


# ---- contrastive label propagation (eq. 11-15) -------------------------------------------------------------------
def _clusters(seed=0, classes=3, dim=16, per_class=40, p=10, spread=0.2):
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    anchors = [protos[c] + spread * torch.randn(p, dim, generator=g) for c in range(classes)]
    candidates = torch.cat([protos[c] + spread * torch.randn(per_class, dim, generator=g) for c in range(classes)])
    return anchors, candidates


def test_contrastive_loss_lower_for_aligned_than_shuffled_features():
    anchors, candidates = _clusters()
    aligned = label_propagation_loss(anchors, candidates, k=20, tau=0.1, reduction="mean")
    g = torch.Generator().manual_seed(1)
    shuffled = candidates[:, torch.randperm(candidates.shape[1], generator=g)]  # same vectors, scrambled dims
    noise = torch.randn(candidates.shape, generator=g)
    assert aligned < 0.5 * label_propagation_loss(anchors, shuffled, k=20, tau=0.1, reduction="mean")
    assert aligned < 0.5 * label_propagation_loss(anchors, noise, k=20, tau=0.1, reduction="mean")
    # eq. 15 literally sums over classes, anchors and positives; the default averages the same terms
    summed = label_propagation_loss(anchors, candidates, k=20, tau=0.1, reduction="sum")
    assert torch.isclose(summed, aligned * 3 * 10 * 20)


def test_contrastive_loss_is_eq_14_summed_as_eq_15():
    """The loss written out term by term: for each class, anchor and positive, eq. 14 with that class's
    negatives, summed over everything (eq. 15); ``mean`` is the same sum over the number of terms."""
    anchors, candidates = _clusters(seed=4, classes=2, dim=6, per_class=5, p=3, spread=0.5)
    k, tau = 2, 0.5
    expected, terms = 0.0, 0
    b = torch.nn.functional.normalize(candidates, dim=1)
    for a in anchors:
        a = torch.nn.functional.normalize(a, dim=1)
        score = (a @ b.t()).sum(0)                                        # eq. 12
        pos = sorted(range(len(b)), key=lambda j: -float(score[j]))[:k]
        neg = sorted(range(len(b)), key=lambda j: float(score[j]))[:k]     # eq. 13: largest sum of (1 - cos)
        for i in range(a.shape[0]):
            for j in pos:
                num = math.exp(float(a[i] @ b[j]) / tau)
                den = num + sum(math.exp(float(a[i] @ b[n]) / tau) for n in neg)
                expected += -math.log(num / den)
                terms += 1
    summed = label_propagation_loss(anchors, candidates, k=k, tau=tau, reduction="sum")
    assert math.isclose(float(summed), expected, rel_tol=1e-5)
    mean = label_propagation_loss(anchors, candidates, k=k, tau=tau, reduction="mean")
    assert math.isclose(float(mean), expected / terms, rel_tol=1e-5)
    assert float(label_propagation_loss(anchors, candidates, k=k, tau=tau)) == float(summed)  # default: eq. 15


def test_pairs_are_top_k_most_and_least_similar_and_gradient_pulls_positives_in():
    anchors, candidates = _clusters(classes=3, per_class=40)
    a = torch.nn.functional.normalize(anchors[0], dim=1)
    b = torch.nn.functional.normalize(candidates, dim=1)
    pos, neg = select_pairs(a, b, k=20)
    assert set(pos.tolist()) <= set(range(40))            # the 20 most similar all come from class 0's cluster
    assert not set(neg.tolist()) & set(range(40))
    assert not set(pos.tolist()) & set(neg.tolist())
    _, neg_big = select_pairs(a, b, k=1000)                # k is clipped to q // 2: P and N stay disjoint
    assert len(neg_big) == 60
    b_param = candidates.clone().requires_grad_(True)
    loss = label_propagation_loss([anchors[0]], b_param, k=20, tau=0.1)
    loss.backward()
    stepped = (candidates - 0.5 * b_param.grad)
    sim_before = (a @ torch.nn.functional.normalize(candidates[pos], dim=1).t()).mean()
    sim_after = (a @ torch.nn.functional.normalize(stepped[pos], dim=1).t()).mean()
    assert sim_after > sim_before


def test_contrastive_loss_with_empty_bank_is_zero_and_differentiable():
    b = torch.randn(30, 8, requires_grad=True)
    loss = label_propagation_loss([torch.zeros(0, 8), torch.zeros(0, 8)], b, k=4, tau=0.1)
    loss.backward()
    assert loss.item() == 0.0 and b.grad is not None


def test_memory_bank_is_a_per_class_fifo_with_state():
    bank = ClassMemoryBank(num_classes=2, size=5, dim=3)
    bank.push(0, torch.eye(3))
    assert bank.count.tolist() == [3, 0]
    bank.push(0, torch.tensor([[0.0, 0.0, 2.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]]))
    assert bank.count.tolist() == [5, 0] and int(bank.ptr[0]) == 1
    # the oldest vector (slot 0, e_x) was overwritten by the newest (2 e_x, normalised)
    assert torch.allclose(bank.features[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(bank.features[0].norm(dim=1), torch.ones(5))
    assert bank.sample(0, 4).shape == (4, 3) and bank.sample(1, 4).shape == (0, 3)
    other = ClassMemoryBank(2, 5, 3)
    other.load(bank.state())
    assert torch.equal(other.features, bank.features) and torch.equal(other.count, bank.count)
    with pytest.raises(ValueError):
        ClassMemoryBank(2, 4, 3).load(bank.state())


# ---- augmentation (Sec. 5.1) -------------------------------------------------------------------------------------
def test_random_rot_flip_same_transform_for_image_and_label_all_8_symmetries():
    torch.manual_seed(0)
    label = torch.zeros(1, 4, 6, 6, dtype=torch.long)
    label[0, :, 0, 1] = 1                                       # an asymmetric mark: every symmetry moves it
    label[0, :, 1, 0:3] = 1
    image = torch.cat([label.float()[:, None], -label.float()[:, None]], dim=1)  # 2 channels, [1, 2, 4, 6, 6]
    seen = set()
    for _ in range(80):
        img, lab = random_rot_flip(image, label)
        assert torch.equal(img[:, 0], lab.float()) and torch.equal(img[:, 1], -lab.float())
        seen.add(which_symmetry(lab[0], label[0]))
    assert seen == set(range(8))
    wide = torch.arange(2 * 3 * 4 * 6.0).view(2, 1, 3, 4, 6)   # H != W: 0 or 180 degrees, shape kept
    for _ in range(20):
        (out,) = random_rot_flip(wide)
        assert out.shape == wide.shape
        assert all(which_symmetry(out[i, 0], wide[i, 0]) in (0, 2, 4, 6) for i in range(2))
    (same,) = random_rot_flip(wide[:0])
    assert same.shape[0] == 0


# ---- which label supervises which network, each loss term (eq. 5-7, 15-22) ----------------------------------------
def _soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 8 / 20 by hand: 1 - 2|P n Y| / (|P| + |Y|) per class over the whole batch, averaged over classes."""
    p = torch.softmax(logits.double(), 1)
    y = torch.nn.functional.one_hot(target, p.shape[1]).movedim(-1, 1).double()
    dims = [0, *range(2, p.ndim)]
    inter, total = (p * y).sum(dims), p.sum(dims) + y.sum(dims)
    return (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean()


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 9 / 21 by hand, averaged over voxels."""
    logp = torch.log_softmax(logits.double(), 1)
    return -logp.gather(1, target[:, None]).mean()


def test_loss_terms_are_the_papers_with_their_own_weights_and_targets():
    w = dict(mu1=0.9, mu2=1.3, lambda1=0.6, lambda2=1.7, beta1=0.2, beta2=0.05, eta=0.01)
    m = _tiny(**w)
    g = torch.Generator().manual_seed(0)
    logits_c = torch.randn(3, 2, 6, 6, 6, generator=g, requires_grad=True)   # 1 labeled + 2 unlabeled
    logits_d = torch.randn(3, 2, 6, 6, 6, generator=g, requires_grad=True)
    y_l = torch.randint(0, 2, (1, 6, 6, 6), generator=g)
    y_hat, y_tilde = logits_c.detach().argmax(1), logits_d.detach().argmax(1)
    loss_cl = torch.tensor(3.0, requires_grad=True)
    lam = 0.4
    out = m._losses(logits_c, logits_d, y_l, y_hat, y_tilde, loss_cl, lam)
    sup_c = _soft_dice(logits_c[:1], y_l) + w["beta2"] * lam * _ce(logits_c[:1], y_l)           # eq. 19
    sup_d = _soft_dice(logits_d[:1], y_l) + w["beta1"] * lam * _ce(logits_d[:1], y_l)           # eq. 18
    cps_d = _soft_dice(logits_d[1:], y_hat[1:]) + w["lambda1"] * _ce(logits_d[1:], y_hat[1:])   # eq. 6
    cps_c = _soft_dice(logits_c[1:], y_tilde[1:]) + w["lambda2"] * _ce(logits_c[1:], y_tilde[1:])  # eq. 7
    expected = {"sup_cs": sup_c, "sup_ds": sup_d, "cps_cs": cps_c, "cps_ds": cps_d,
                "ds": sup_d + w["mu1"] * cps_d,                                                  # eq. 16
                "cs": sup_c + w["mu2"] * (cps_c + w["eta"] * 3.0)}                               # eq. 17, 22
    for key, value in expected.items():
        assert math.isclose(float(out[key]), float(value), rel_tol=1e-5, abs_tol=1e-6), key
    # CS's loss reaches CS and L_cl only, DS's loss DS only: the pseudo labels carry no gradient
    out["cs"].backward(retain_graph=True)
    assert logits_d.grad is None and logits_c.grad.abs().sum() > 0
    assert math.isclose(float(loss_cl.grad), w["mu2"] * w["eta"], rel_tol=1e-6)
    logits_c.grad = None
    out["ds"].backward()
    assert logits_c.grad is None and logits_d.grad.abs().sum() > 0


def test_train_step_wiring_augmented_labels_pseudo_labels_features_and_warmup():
    """One step, spied on: the networks see the flipped/rotated batch, the label moves with its image, DS is
    conditioned on the noised [y^l; CS pseudo labels], each loss gets the networks' own outputs, the bank
    gets DS features of labeled voxels with DS's labels, L_cl gets CS features of the unlabeled ones."""
    m = _tiny()
    seen: dict[str, list] = {k: [] for k in ("cs", "ds", "noise", "losses", "bank", "cl")}
    m.cs.register_forward_hook(lambda mod, args, out: seen["cs"].append((args[0].detach(), out)))
    m.ds.register_forward_hook(lambda mod, args, out: seen["ds"].append((args, out)))

    record_calls(m, seen, {"noise": "_noised_labels", "losses": "_losses", "bank": "_update_bank",
                           "cl": "_contrastive"})
    labeled, unlabeled = _batch(size=32, seed=3)
    labeled["image"] = labeled["label"].float()        # image == label: the label must move with its image
    kinds_l, kinds_u = set(), set()
    for step in range(4):
        logs = m.train_step(labeled, unlabeled, step)
        x, (logits_c, feats_c) = seen["cs"][-1]
        (x_ds, y_t, t), (logits_d, feats_d) = seen["ds"][-1]
        kinds_l.add(which_symmetry(x[0, 0], labeled["image"][0, 0]))
        kinds_u.add(which_symmetry(x[1, 0], unlabeled["image"][0, 0]))
        assert torch.equal(x_ds, x)
        (labels,), (y_t_made, t_made) = seen["noise"][-1]
        y_hat = logits_c.detach().argmax(1)
        y_aug = x[:1, 0].long()                                          # the label, transformed with the image
        assert torch.equal(labels, torch.cat([y_aug, y_hat[1:]]))        # Y_0^l = y^l, Y_0^u = CS's argmax
        assert torch.equal(y_t, y_t_made) and torch.equal(t, t_made)
        clean = to_signed(torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float())
        assert not torch.allclose(y_t, clean, atol=1e-3)                 # DS sees the noised label (eq. 5)
        args, _ = seen["losses"][-1]
        assert args[0] is logits_c and args[1] is logits_d
        assert torch.equal(args[2], y_aug) and torch.equal(args[3], y_hat)
        assert torch.equal(args[4], logits_d.detach().argmax(1))
        assert args[6] == m.warmup(step) == logs["lambda"]
        (b_feats, b_pred, b_labels), _ = seen["bank"][-1]
        assert torch.equal(b_feats, feats_d[:1]) and torch.equal(b_labels, y_aug)
        assert torch.equal(b_pred, logits_d.detach().argmax(1)[:1])
        (cl_feats,), _ = seen["cl"][-1]
        assert torch.equal(cl_feats, feats_c[1:])
    assert -1 not in kinds_l | kinds_u and kinds_l - {0} and kinds_u - {0}
    assert math.isclose(logs["lambda"], 2.0 * math.exp(-5.0 * (1 - 3 / 200) ** 2))


def _params_after_one_step(**overrides) -> dict[str, list[torch.Tensor]]:
    m = _tiny(**overrides)
    torch.manual_seed(1)
    labeled, unlabeled = _batch(seed=5)
    m.train_step(labeled, unlabeled, step=150)
    return {k: [p.detach().clone() for p in mod.parameters()] for k, mod in m.modules().items()}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_each_unsupervised_term_reaches_its_own_network_only():
    """Switching one weight off changes exactly the networks the paper's term trains: mu1 L_p^d DS (eq. 16),
    mu2 (L_p^c + eta L_cl) CS (eq. 17, 22), eta L_cl CS and the projection head; the rest stays bit-equal."""
    base = _params_after_one_step()
    no_mu1 = _params_after_one_step(mu1=0.0)
    assert not _same(no_mu1["ds"], base["ds"]) and _same(no_mu1["cs"], base["cs"])
    no_mu2 = _params_after_one_step(mu2=0.0)
    assert not _same(no_mu2["cs"], base["cs"]) and _same(no_mu2["ds"], base["ds"])
    no_eta = _params_after_one_step(eta=0.0)
    assert not _same(no_eta["cs"], base["cs"]) and not _same(no_eta["head"], base["head"])
    assert _same(no_eta["ds"], base["ds"])


def test_memory_bank_takes_only_voxels_ds_predicts_correctly():
    m = _tiny(bank_update=1000, bank_size=64)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 4, 4, 4, generator=g)
    labels = torch.randint(0, 2, (1, 4, 4, 4), generator=g)
    wrong = torch.rand(1, 4, 4, 4, generator=g) < 0.5
    pred = torch.where(wrong, 1 - labels, labels)
    m._update_bank(feats, pred, labels)
    with torch.no_grad():
        projected = torch.nn.functional.normalize(m.head(feats.movedim(1, -1).reshape(-1, 8)), dim=1)
    flat_labels, flat_wrong = labels.reshape(-1), wrong.reshape(-1)
    for cls in (0, 1):
        allowed = projected[(flat_labels == cls) & ~flat_wrong]
        stored = m.bank.features[cls, :int(m.bank.count[cls])]
        assert stored.shape[0] == allowed.shape[0] > 0
        assert torch.allclose((stored @ allowed.t()).max(1).values, torch.ones(len(stored)), atol=1e-5)


# ---- training ----------------------------------------------------------------------------------------------------
def test_train_step_updates_both_networks_the_head_and_the_bank():
    m = _tiny()
    before = {k: [p.detach().clone() for p in mod.parameters()] for k, mod in m.modules().items()}
    labeled, unlabeled = _batch()
    logs = m.train_step(labeled, unlabeled, step=0)
    for key in ("loss_cs", "loss_ds", "loss_sup_cs", "loss_sup_ds", "loss_cps_cs", "loss_cps_ds", "loss_cl",
                "lambda", "beta1", "beta2", "dice_cs", "dice_ds", "agreement_u"):
        assert key in logs and math.isfinite(logs[key]), key
    assert logs["loss_cl"] > 0
    assert math.isclose(logs["beta1"], 0.1 * 2.0 * math.exp(-5.0))
    for key, mod in m.modules().items():
        changed = any(not torch.equal(a, p) for a, p in zip(before[key], mod.parameters()))
        assert changed, key
    assert int(m.bank.count.sum()) > 0
    # HFM is in CS and trains with it
    assert m.cs.hfm is not None and set(m.cs.hfm) == {"2", "3", "4"}  # tiny: 1/4 to 1/16
    assert all(block.mamba.paths["slice_scan"].A_log.grad is not None for block in m.cs.hfm.values())


def test_ablations_and_batches_without_unlabeled_data():
    m = _tiny(use_hfm=False, use_cl=False)
    assert m.cs.hfm is None
    labeled, unlabeled = _batch()
    logs = m.train_step(labeled, unlabeled, step=3)
    assert logs["loss_cl"] == 0.0 and int(m.bank.count.sum()) == 0
    m = _tiny()
    logs = m.train_step(labeled, {"image": labeled["image"][:0]}, step=3)
    assert logs["loss_cps_cs"] == 0.0 and logs["loss_cl"] == 0.0 and math.isfinite(logs["loss_cs"])


def test_checkpoint_round_trip_gives_same_predictions_and_memory_bank():
    m = _tiny()
    labeled, unlabeled = _batch(classes=2)
    for step in range(2):
        m.train_step(labeled, unlabeled, step)
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _tiny()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.features, m.bank.features) and torch.equal(fresh.bank.count, m.bank.count)
    assert int(fresh.bank.count.sum()) > 0
    volume = unlabeled["image"][0]
    a, b = m.pseudo_labels(volume), fresh.pseudo_labels(volume)
    for view in DiffCL.views:
        assert np.array_equal(a[view], b[view]), view
    mom_a = m.opt_cs.state_dict()["state"]
    mom_b = fresh.opt_cs.state_dict()["state"]
    assert all(torch.equal(mom_a[k]["momentum_buffer"], mom_b[k]["momentum_buffer"]) for k in mom_a)


def test_pseudo_labels_and_predict_on_a_volume_of_any_size():
    m = _tiny()
    volume = torch.randn(1, 34, 30, 40)  # not multiples of the 32^3 patch, one axis smaller than it
    m.train()
    views = m.pseudo_labels(volume)
    assert set(views) == {"cs", "ds"}
    for arr in views.values():
        assert arr.dtype == np.uint8 and arr.shape == (34, 30, 40) and arr.max() < 2
    assert m.cs.training and m.ds.training  # inference restores the training mode
    again = m.pseudo_labels(volume)
    assert np.array_equal(again["ds"], views["ds"])  # DDIM noise is seeded
    assert np.array_equal(m.predict(volume), views["cs"])


def test_views_depend_on_what_they_should():
    """``cs`` is CS alone; ``ds`` is DS conditioned on the image, sampled from noise (seeded), CS-independent."""
    m = _tiny()
    labeled, unlabeled = _batch(size=32, seed=2)
    m.train_step(labeled, unlabeled, 0)
    m.eval()
    patch = labeled["image"]
    other = unlabeled["image"]

    def ds(p, seed):
        with torch.no_grad():
            return m._ds_probs(p, torch.Generator().manual_seed(seed))

    base = ds(patch, 0)
    assert torch.equal(base, ds(patch, 0))
    assert not torch.allclose(base, ds(patch, 1), atol=1e-4)            # starts from the seeded noise
    assert not torch.allclose(base, ds(other, 0), atol=1e-4)            # conditioned on the image
    with torch.no_grad():
        cs_before = m._cs_probs(patch)
        for p in m.cs.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(cs_before, m._cs_probs(patch), atol=1e-4)
    assert torch.equal(base, ds(patch, 0))                              # DS's view ignores CS
    with torch.no_grad():
        cs_now = m._cs_probs(patch)
        for p in m.ds.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert torch.equal(cs_now, m._cs_probs(patch))                 # CS's view ignores DS
    assert not torch.allclose(base, ds(patch, 0), atol=1e-4)


# slab centres (z, y, x) in the MNI152 T1 (94 x 116 x 98): x 1-32 (left hemisphere), 33-64, 65-96 (right)
LABELED, UNLABELED, HELD_OUT = (47, 58, 17), (47, 58, 49), (47, 58, 81)


@pytest.mark.slow
def test_learns_real_brain_tissue_scored_on_a_held_out_slab(brain_project):
    """tiny preset on the real MNI152 T1 (GM/WM labels): one labeled slab, one unlabeled, and CS scored on a third
    slab it never trained on (the other hemisphere)."""
    from helpers.realdata import real_patch

    torch.manual_seed(0)
    x_l, y_l = real_patch(brain_project, "mni152_t1", (32, 32, 32), center=LABELED)
    x_u, _ = real_patch(brain_project, "mni152_t1", (32, 32, 32), center=UNLABELED)
    x_h, y_h = real_patch(brain_project, "mni152_t1", (32, 32, 32), center=HELD_OUT)
    steps = 90  # measured: held-out Dice cs 0.90, ds 0.85; 8 min on the shared 2-core machine at load 10
    m = DiffCL(DiffCL.make_config("tiny", num_classes=3, max_steps=steps))
    for step in range(steps):
        logs = m.train_step({"image": x_l, "label": y_l}, {"image": x_u}, step)
    assert all(math.isfinite(v) for v in logs.values())

    def dice(pred: np.ndarray, label: torch.Tensor) -> float:
        pred, truth = torch.from_numpy(pred).long(), label[0, 0]
        return float(np.mean([2 * float(((pred == c) & (truth == c)).sum())
                              / float((pred == c).sum() + (truth == c).sum()) for c in (1, 2)]))

    held_cs = dice(m.predict(x_h[0]), y_h)
    held_ds = dice(m.pseudo_labels(x_h[0])["ds"], y_h)
    print(f"{steps} steps: held-out slab Dice cs {held_cs:.3f}, ds {held_ds:.3f}")
    assert held_cs > 0.75, held_cs
    assert held_ds > 0.7, held_ds


@CUDA
def test_cuda_amp_train_step_and_inference():
    torch.manual_seed(0)
    m = DiffCL(DiffCL.make_config("tiny", amp=True), device="cuda")
    assert m.amp_dtype is not None
    labeled, unlabeled = _batch(device="cuda")
    for step in range(2):
        logs = m.train_step(labeled, unlabeled, step)
    assert all(math.isfinite(v) for v in logs.values())
    views = m.pseudo_labels(unlabeled["image"][0])
    assert views["cs"].shape == (32, 32, 32) and views["ds"].dtype == np.uint8
