"""The 8 in-plane symmetries (4 rotations, each optionally mirrored) that the 2D/3D augmentations draw from."""
from __future__ import annotations

import torch


def symmetries(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 in-plane symmetries of ``t [..., H, W]``: rotations by 0-3 quarter turns, then the same mirrored."""
    rots = [torch.rot90(t, k, dims=(-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def which_symmetry(out: torch.Tensor, raw: torch.Tensor) -> int:
    """Index in :func:`symmetries` of the symmetry of ``raw`` that ``out`` is (-1: none)."""
    return next((i for i, s in enumerate(symmetries(raw)) if s.shape == out.shape and torch.equal(s, out)), -1)
