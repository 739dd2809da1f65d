"""One fixed colour per label value, shared by the plugin's Labels layers and the exported ``.seg.nrrd`` files.

Label 0 (background) is transparent.  Labels 1-10 take a hand-picked palette of distinct, saturated colours
that stay readable over a grey-scale scan; higher labels walk the hue circle by the golden angle, so any
number of classes gets stable, well-separated colours.
"""
from __future__ import annotations

import colorsys

# (r, g, b) in 0..1 for label values 1, 2, 3, ...
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.24),  # 1 red
    (0.20, 0.60, 0.86),  # 2 blue
    (0.18, 0.80, 0.44),  # 3 green
    (0.95, 0.77, 0.06),  # 4 yellow
    (0.61, 0.35, 0.71),  # 5 purple
    (0.90, 0.49, 0.13),  # 6 orange
    (0.10, 0.74, 0.74),  # 7 teal
    (0.93, 0.44, 0.73),  # 8 pink
    (0.55, 0.76, 0.29),  # 9 lime
    (0.65, 0.47, 0.33),  # 10 brown
)
_GOLDEN = 0.618033988749895


def label_color(index: int) -> tuple[float, float, float]:
    """``(r, g, b)`` floats in 0..1 for label value ``index``; ``(0, 0, 0)`` for the background (drawn
    transparent, see :func:`label_rgba`)."""
    index = int(index)
    if index < 0:
        raise ValueError(f"label values are non-negative (got {index})")
    if index == 0:
        return (0.0, 0.0, 0.0)
    if index <= len(PALETTE):
        return PALETTE[index - 1]
    hue = (index * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return (round(r, 4), round(g, 4), round(b, 4))


def label_rgba(index: int) -> tuple[float, float, float, float]:
    """``(r, g, b, a)``: alpha 0 for the background, 1 for every label."""
    return (*label_color(index), 0.0 if int(index) == 0 else 1.0)


def label_colormap(num_classes: int) -> dict[int, tuple[float, float, float, float]]:
    """``{value: rgba}`` for values ``0 .. num_classes - 1`` (napari's ``DirectLabelColormap`` takes this)."""
    return {i: label_rgba(i) for i in range(num_classes)}
