"""A&D learns on a real volume (the MNI152 T1 template's grey/white matter, brain_tissue sample project) and is
scored on a slab it never trained on.

Three disjoint 32^3 slabs along x: one labeled, one unlabeled (its reference label is never used) and one held
out (never trained on, labeled or not).  ``D(xi)`` (through DDIM sampling) and ``D(psi)`` are scored as they make
pseudo labels during training (batch statistics, no dropout); ``D(theta)`` -- which never sees a label, only RS
pseudo labels and the EMA transfer -- with :meth:`predict`'s settings (eval mode), before and after training.
One torch thread: the tiny nets run as fast on one, and a loaded 2-core machine does not make two threads wait on
each other at each of a step's small operations.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from backend.methods import get_method
from backend.project import Project
from conftest import SAMPLE
from helpers.realdata import real_patch

# slab centres (z, y, x): x 1-32 (left hemisphere), 33-64 (the middle), 65-96 (right hemisphere)
LABELED, UNLABELED, HELD_OUT = (47, 58, 17), (47, 58, 49), (47, 58, 81)


def _dice(logits: torch.Tensor, label: torch.Tensor, k: int) -> float:
    pred = F.one_hot(logits.argmax(1), k).movedim(-1, 1)
    true = F.one_hot(label[:, 0], k).movedim(-1, 1)
    return compute_dice(pred, true, include_background=False).mean().item()


def _pseudo_label_mode(net: torch.nn.Module) -> None:
    """Training-time behaviour of the norms (batch statistics) without dropout noise."""
    net.train()
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout3d):
            module.eval()


@pytest.mark.slow
def test_genericssl_learns_a_real_volume_and_theta_improves_from_pseudo_labels_only(one_torch_thread):
    torch.manual_seed(0)
    project = Project.open(SAMPLE / "brain_tissue")
    k = project.num_classes
    x_l, y_l = real_patch(project, "mni152_t1", (32, 32, 32), center=LABELED)
    x_u, _ = real_patch(project, "mni152_t1", (32, 32, 32), center=UNLABELED)
    x_h, y_h = real_patch(project, "mni152_t1", (32, 32, 32), center=HELD_OUT)
    cls = get_method("genericssl")
    m = cls(cls.make_config("tiny", num_classes=k))

    def theta_dice() -> float:
        m.net.eval()
        with torch.no_grad():
            score = _dice(m.net.theta(x_h), y_h, k)
        m.net.train()
        return score

    theta_before = theta_dice()
    start = time.time()
    steps = 60
    for step in range(steps):
        for optimizer in m.optimizers():
            for group in optimizer.param_groups:
                group["lr"] = m.lr_at(step)
        out = m.train_step({"image": x_l, "label": y_l}, {"image": x_u}, step)
    elapsed = time.time() - start
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())

    _pseudo_label_mode(m.net)
    with torch.no_grad():
        torch.manual_seed(1)
        dice_xi = _dice(m.ddim_x0(x_h), y_h, k)
        dice_psi = _dice(m.net.psi(x_h), y_h, k)
    theta_after = theta_dice()
    print(f"{steps} steps in {elapsed:.1f}s, held-out slab: D(xi) {dice_xi:.3f}, D(psi) {dice_psi:.3f}, "
          f"D(theta) {theta_before:.3f} -> {theta_after:.3f}")
    assert dice_xi > 0.7, dice_xi
    assert dice_psi > 0.7, dice_psi
    assert theta_after > theta_before + 0.2, (theta_before, theta_after)
    assert theta_after > 0.6, theta_after
