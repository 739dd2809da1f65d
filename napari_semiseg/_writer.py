"""Save a Labels layer in the geometry of the image it belongs to (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha).

Where the geometry comes from, first match wins:

1. the layer's own ``metadata["geometry"]`` (layers made by this plugin's reader or docks carry it);
2. the Image layer of the current viewer it was made for: the one named in ``metadata["image_layer"]``, else
   the only Image layer with geometry and the same shape;
3. otherwise the layer's ``scale`` as spacing, origin 0 and identity direction, with a warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend.io.volume import Volume, suffix_of, write_volume
from napari_semiseg._layers import GEOMETRY_KEY, volume_from_metadata


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """napari writer hook for one Labels layer; returns the written path."""
    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"{path}: a 3D labels layer is expected, got {array.ndim}D")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"{path}: label values must lie in 0..255")
    array = array.astype(np.uint8, copy=False)
    volume = resolve_geometry(array, attributes)
    metadata = None
    if suffix_of(path) == ".seg.nrrd":
        metadata = _seg_nrrd_fields(array, attributes)
    return [str(write_volume(volume, Path(path), metadata=metadata))]


def resolve_geometry(array: np.ndarray, attributes: dict[str, Any]) -> Volume:
    """``array`` placed in the geometry of its source image (see the module docstring for the order)."""
    metadata = attributes.get("metadata") or {}
    volume = volume_from_metadata(array, metadata)
    if volume is not None:
        return volume
    volume = _geometry_from_viewer(array, metadata.get("image_layer"))
    if volume is not None:
        return volume
    from napari.utils.notifications import show_warning

    scale = attributes.get("scale") or (1.0, 1.0, 1.0)
    show_warning("No source image geometry for this labels layer: saved with the layer's scale as spacing, "
                 "origin 0 and identity direction.")
    return Volume(array, tuple(float(s) for s in list(scale)[::-1][:3]))


def _geometry_from_viewer(array: np.ndarray, image_name: str | None) -> Volume | None:
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no viewer (headless use of the writer)
        return None
    if viewer is None:
        return None
    candidates = [layer for layer in viewer.layers
                  if layer._type_string == "image" and GEOMETRY_KEY in (layer.metadata or {})
                  and tuple(layer.data.shape) == array.shape]
    named = [layer for layer in candidates if layer.name == image_name]
    chosen = named or (candidates if len(candidates) == 1 else [])
    return volume_from_metadata(array, chosen[0].metadata) if chosen else None


def _seg_nrrd_fields(array: np.ndarray, attributes: dict[str, Any]) -> dict[str, str]:
    """3D Slicer segment fields (names from the project's labels when the layer carries them, colours from the
    shared palette), the same ones :func:`backend.review.export.export` writes."""
    from backend.review.export import slicer_metadata

    names = (attributes.get("metadata") or {}).get("label_names")
    if names:
        labels = {int(k): str(v) for k, v in names.items()}
    else:
        labels = {int(v): f"label {int(v)}" for v in np.unique(array)}
    labels.setdefault(0, "background")
    return slicer_metadata(array, labels)
