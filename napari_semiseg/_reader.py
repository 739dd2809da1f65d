"""File > Open for medical volumes: NIfTI, NRRD, MHA/MHD, a DICOM folder, SSL4MIS-style HDF5.

An image opens as an Image layer, a label volume (an integer volume with few values, or a file in a
``labelsTr`` folder) as a Labels layer; both with ``scale`` = voxel spacing in (z, y, x) order and the source
geometry in ``metadata["geometry"]`` so a Labels layer saved through the plugin's writer lands in it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from backend.errors import InputError
from backend.io.volume import H5_SUFFIXES, SUPPORTED_SUFFIXES, h5_has_key, read_volume, strip_suffix, suffix_of
from napari_semiseg._layers import geometry_metadata, label_colormap, layer_scale

MAX_LABEL_VALUES = 64


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[tuple]] | None:
    """The reader for ``path`` when this plugin can open it, else None (napari then asks other readers)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_can_read(Path(p)) for p in paths):
        return None
    return read_layers


def _can_read(path: Path) -> bool:
    if path.is_dir():
        return _looks_like_dicom_folder(path)
    return suffix_of(path) in SUPPORTED_SUFFIXES


def _looks_like_dicom_folder(folder: Path) -> bool:
    """A cheap check (no series scan): any file with a ``.dcm`` suffix or the DICM preamble among the first few."""
    for i, child in enumerate(p for p in folder.iterdir() if p.is_file()):
        if i >= 8:
            break
        if child.suffix.lower() == ".dcm":
            return True
        try:
            with open(child, "rb") as handle:
                head = handle.read(132)
        except OSError:
            continue
        if head[128:132] == b"DICM":
            return True
    return False


def read_layers(path: str | list[str]) -> list[tuple]:
    """Layer data tuples of every volume in ``path`` (one file, several files, or a DICOM folder)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[tuple] = []
    for p in paths:
        layers.extend(_read_one(Path(p)))
    return layers


def _read_one(path: Path) -> list[tuple]:
    name = path.name if path.is_dir() else strip_suffix(path)
    if not path.is_dir() and suffix_of(path) in H5_SUFFIXES:
        layers = [_layer_tuple(read_volume(path, key="image"), path, name, force="image")]
        if h5_has_key(path, "label"):
            layers.append(_layer_tuple(read_volume(path, key="label"), path, f"{name} label", force="labels"))
        return layers
    return [_layer_tuple(read_volume(path), path, name)]


def _layer_tuple(volume, path: Path, name: str, force: str | None = None) -> tuple:
    kind = force or ("labels" if is_label_volume(volume.array, path) else "image")
    meta: dict[str, Any] = {"name": name, "scale": layer_scale(volume), "metadata": geometry_metadata(volume, path)}
    for note in volume.notes:
        from napari.utils.notifications import show_warning

        show_warning(note)
    if kind == "labels":
        array = volume.array
        if array.dtype.kind == "f":
            if not np.all(np.mod(array, 1) == 0):
                raise InputError(path, "label volume holds non-integer values")
        top = int(array.max()) if array.size else 0
        data = array.astype(np.uint8 if top < 256 else np.uint16, copy=False)
        meta["colormap"] = label_colormap(top + 1)
        return data, meta, "labels"
    return volume.array, meta, "image"


def is_label_volume(array: np.ndarray, path: Path | None = None) -> bool:
    """A label map: in a ``labelsTr`` folder, or an integer volume with at most ``MAX_LABEL_VALUES`` values
    that are all small non-negative integers."""
    if path is not None and path.parent.name == "labelsTr":
        return True
    if array.dtype.kind not in "iub" or array.size == 0:
        return False
    sample = np.unique(array[::4, ::4, ::4])
    if sample.size > MAX_LABEL_VALUES or sample.min() < 0 or sample.max() >= 256:
        return False
    values = np.unique(array)
    return values.size <= MAX_LABEL_VALUES and values.min() >= 0 and values.max() < 256
