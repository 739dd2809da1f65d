"""Real training patches from the sample projects, for learning tests of single methods (no engine needed)."""
from __future__ import annotations

import numpy as np
import torch

from backend.engine.intensity import normalize_intensity
from backend.project import Project


def real_patch(project: Project, case: str, patch: tuple[int, ...], center: tuple[int, int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A normalised image patch ``[1, 1, *patch]`` and its label ``[1, 1, *patch]`` (None when unlabeled).

    ``patch`` of length 3 is ``(D, H, W)`` around ``center`` (default: the volume centre); of length 2 it is
    the ``(H, W)`` centre crop of the middle axial slice.
    """
    image = project.read_image(case)
    array = normalize_intensity(image.array, project.modality)
    label = project.read_label(case)
    lab = None if label is None else label.array.astype(np.int64)
    z, y, x = center or tuple(s // 2 for s in array.shape)
    if len(patch) == 2:
        h, w = patch
        sl = (z, slice(y - h // 2, y - h // 2 + h), slice(x - w // 2, x - w // 2 + w))
    else:
        d, h, w = patch
        sl = (slice(z - d // 2, z - d // 2 + d), slice(y - h // 2, y - h // 2 + h), slice(x - w // 2, x - w // 2 + w))
    img_t = torch.from_numpy(np.ascontiguousarray(array[sl]))[None, None]
    lab_t = None if lab is None else torch.from_numpy(np.ascontiguousarray(lab[sl]))[None, None]
    return img_t, lab_t
