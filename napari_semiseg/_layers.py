"""Between backend volumes and napari layers: scale, geometry metadata and label colours (no Qt here).

napari shows the ``[z, y, x]`` array with ``scale = spacing[::-1]`` (millimetres per voxel along z, y, x), so
layers of one case overlay and measure in mm.  The full physical geometry (spacing, origin and direction, in the
backend's LPS convention) travels in ``layer.metadata["geometry"]``; the writer puts labels back into it.
Origin and direction are not applied to the napari world frame (a rotated frame would make axial painting
awkward); they only matter on disk, where they are kept exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backend.io.volume import Volume
from backend.review.colors import label_color

GEOMETRY_KEY = "geometry"


def geometry_metadata(volume: Volume, source: str | None = None) -> dict[str, Any]:
    """JSON-friendly geometry of ``volume`` (plus the file it came from) for a layer's metadata."""
    geometry = {
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": [float(v) for v in np.asarray(volume.direction).ravel()],
    }
    if source:
        geometry["source"] = str(source)
    return {GEOMETRY_KEY: geometry}


def volume_from_metadata(array: np.ndarray, metadata: dict[str, Any] | None) -> Volume | None:
    """``array`` in the geometry kept in ``metadata`` (None when there is none or the shape differs)."""
    geometry = (metadata or {}).get(GEOMETRY_KEY)
    if not geometry:
        return None
    if list(geometry.get("shape", array.shape)) != list(array.shape):
        return None
    return Volume(np.asarray(array), tuple(geometry["spacing"]), tuple(geometry["origin"]),
                  np.asarray(geometry["direction"], dtype=float).reshape(3, 3))


def layer_scale(volume: Volume) -> tuple[float, float, float]:
    """napari ``scale`` of a ``[z, y, x]`` array: the spacing in z, y, x order."""
    return tuple(float(s) for s in volume.spacing[::-1])


def label_colormap(num_classes: int, *, opacity: float = 1.0):
    """A napari ``DirectLabelColormap`` giving class ``k`` the shared palette colour ``label_color(k)`` (the
    same colours the exported files and every layer of the plugin use); 0 is transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {0: np.zeros(4), None: np.array([0.5, 0.5, 0.5, opacity])}
    for k in range(1, max(int(num_classes), 2)):
        colors[k] = np.array([*_palette(k), opacity])
    return DirectLabelColormap(color_dict=colors)


def label_rgb(value: int) -> tuple[float, float, float]:
    """The ``(r, g, b)`` (0..1) that label ``value`` is drawn in (for legends)."""
    return _palette(value)


def single_colormap(rgb: tuple[float, float, float]):
    """A colormap drawing value 1 in ``rgb`` (the disagreement layer)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={0: np.zeros(4), 1: np.array([*rgb, 1.0]), None: np.zeros(4)})


def _palette(index: int) -> tuple[float, float, float]:
    return tuple(float(c) for c in label_color(index))[:3]


def set_if_changed(layer: Any, name: str, value: Any) -> None:
    """Set ``layer.<name>`` only when the value changes.  napari re-slices and redraws a layer on every set, equal
    or not (``scale`` also recomputes the viewer's extent from every layer), so re-setting the same scale, name
    and opacity on each of a case's layers made showing a case cost many redraws of all of them."""
    current = getattr(layer, name)
    try:
        if isinstance(value, (tuple, list, np.ndarray)):
            same = np.array_equal(np.asarray(current), np.asarray(value))
        else:
            same = bool(current == value)
    except (TypeError, ValueError):
        same = False
    if not same:
        setattr(layer, name, value)
