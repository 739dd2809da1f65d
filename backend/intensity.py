"""Intensity normalisation per modality (the nnU-Net convention): CT windowing, MR z-score."""
from __future__ import annotations

import numpy as np

CT_WINDOW = (-1000.0, 1000.0)  # HU clip before scaling; wide enough for lung, soft tissue and bone


def normalize_intensity(array: np.ndarray, modality: str) -> np.ndarray:
    """float32 intensities with zero mean and unit spread, by modality.

    * ``CT``: clip to :data:`CT_WINDOW`, then scale to [-1, 1] (Hounsfield units are absolute).
    * ``MR`` and ``other``: z-score over the non-zero voxels (skull-stripped volumes keep a zero background),
      using MONAI's ``NormalizeIntensity``.
    """
    from monai.transforms import NormalizeIntensity

    data = np.asarray(array, dtype=np.float32)
    if modality.upper() == "CT":
        lo, hi = CT_WINDOW
        return (np.clip(data, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    nonzero = bool(np.count_nonzero(data) < data.size * 0.98)
    return np.asarray(NormalizeIntensity(nonzero=nonzero)(data), dtype=np.float32)
