"""Loss-weight ramp-ups used by the semi-supervised methods (shared so each is written once)."""
from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1] (Laine & Aila 2017; SSL4MIS's default)."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def gaussian_warmup(step: float, max_step: float, scale: float = 1.0) -> float:
    """``scale * exp(-5 (1 - step / max_step)^2)``: Diff-CL's lambda(t) (scale 2.0) and A&D's ramp-up."""
    return scale * sigmoid_rampup(step, max_step)
