"""Diff-CL (backend.methods.diffcl): config and presets, contrastive label propagation, memory bank, training
steps, checkpoints, inference views, and learning on a real sample volume."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from backend.methods import get_method
from backend.methods.diffcl import DiffCL, DiffCLConfig
from backend.nets.diffcl_contrast import ClassMemoryBank, label_propagation_loss, select_pairs

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
    aligned = label_propagation_loss(anchors, candidates, k=20, tau=0.1)
    g = torch.Generator().manual_seed(1)
    shuffled = candidates[:, torch.randperm(candidates.shape[1], generator=g)]  # same vectors, scrambled dims
    noise = torch.randn(candidates.shape, generator=g)
    assert aligned < 0.5 * label_propagation_loss(anchors, shuffled, k=20, tau=0.1)
    assert aligned < 0.5 * label_propagation_loss(anchors, noise, k=20, tau=0.1)
    # eq. 15 literally sums over classes, anchors and positives; the default averages the same terms
    summed = label_propagation_loss(anchors, candidates, k=20, tau=0.1, reduction="sum")
    assert torch.isclose(summed, aligned * 3 * 10 * 20)


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
    assert m.cs.hfm is not None and m.cs.hfm.mamba.paths["slice_scan"].A_log.grad is not None


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


@pytest.mark.slow
def test_learns_real_brain_tissue_patch(brain_project):
    """tiny preset on the real MNI152 T1 (GM/WM labels): CS reaches Dice > 0.8 on its labeled patches."""
    from realdata import real_patch

    torch.manual_seed(0)
    shape = brain_project.read_image("mni152_t1").array.shape
    centre = tuple(s // 2 for s in shape)
    x1, y1 = real_patch(brain_project, "mni152_t1", (32, 32, 32))
    x2, y2 = real_patch(brain_project, "mni152_t1", (32, 32, 32), center=(centre[0] + 10, centre[1] - 12, centre[2]))
    xu, _ = real_patch(brain_project, "colin27_ch2", (32, 32, 32))
    labeled = {"image": torch.cat([x1, x2]), "label": torch.cat([y1, y2])}
    steps = 150
    m = DiffCL(DiffCL.make_config("tiny", num_classes=3, batch_labeled=2, max_steps=steps))
    for step in range(steps):
        logs = m.train_step(labeled, {"image": xu}, step)
    assert all(math.isfinite(v) for v in logs.values())
    def dice(pred: np.ndarray, label: torch.Tensor) -> float:
        pred, truth = torch.from_numpy(pred).long(), label[0, 0]
        return float(np.mean([2 * float(((pred == c) & (truth == c)).sum())
                              / float((pred == c).sum() + (truth == c).sum()) for c in (1, 2)]))

    for image, label in ((x1, y1), (x2, y2)):
        assert dice(m.predict(image[0]), label) > 0.8
    # the DS view (2 DDIM steps from pure noise) has learned the anatomy too, if less sharply (0.54-0.65 seen)
    assert dice(m.pseudo_labels(x1[0])["ds"], y1) > 0.4


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
