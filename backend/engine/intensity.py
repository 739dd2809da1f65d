"""Intensity normalisation per modality (the nnU-Net convention): CT windowing, MR z-score; an optional
intensity window of a paper preset (``BaseConfig.intensity_window``) clips first."""
from __future__ import annotations

from typing import Sequence

import numpy as np

CT_WINDOW = (-1000.0, 1000.0)  # HU clip before scaling; wide enough for lung, soft tissue and bone


def normalize_intensity(array: np.ndarray, modality: str, window: Sequence[float] | None = None) -> np.ndarray:
    """float32 intensities with zero mean and unit spread, by modality.

    * ``CT``: clip to ``window`` (default :data:`CT_WINDOW`), then scale that window to [-1, 1] (Hounsfield
      units are absolute, so a paper's CT window, e.g. [-125, 275] HU for abdominal organs, is the whole
      normalisation).
    * ``MR`` and ``other``: clip to ``window`` when given, then z-score over the non-zero voxels (skull-stripped
      volumes keep a zero background), using MONAI's ``NormalizeIntensity``.
    """
    from monai.transforms import NormalizeIntensity

    data = np.asarray(array, dtype=np.float32)
    if window is not None:
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"intensity window must be (low, high) with low < high (got {tuple(window)})")
    if modality.upper() == "CT":
        lo, hi = (float(v) for v in (window if window is not None else CT_WINDOW))
        return (np.clip(data, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    nonzero = bool(np.count_nonzero(data) < data.size * 0.98)  # decided on the stored intensities
    if window is not None:  # the zero background stays zero (and outside the statistics) when it is kept apart
        clipped = np.clip(data, float(window[0]), float(window[1]))
        data = np.where(data == 0, np.float32(0), clipped) if nonzero else clipped
    return np.asarray(NormalizeIntensity(nonzero=nonzero)(data), dtype=np.float32)
