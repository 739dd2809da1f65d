"""What the project accepts: safe case and run names, declared label values (0..255, uint8), images without
NaN/inf, labels on their image's grid.  Each refusal is an :class:`InputError` naming the file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError
from backend.io.volume import Volume

IMAGE_SUFFIX = "_0000.nii.gz"
FILE_ENDING = ".nii.gz"
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODALITIES = ("MR", "CT", "other")
MAX_LABEL = 255  # labels are stored as uint8


def check_case_name(case: str, source: str | Path | None = None) -> str:
    """Return ``case`` if it is a safe file name; names that could leave the project folder are refused."""
    if not isinstance(case, str) or not CASE_NAME.match(case) or ".." in case:
        raise InputError(source or case, f"invalid case name '{case}' (letters, digits, '_', '-', '.'; no '..' or '/')")
    return case


def check_name(name: str, what: str, source: str | Path | None = None) -> str:
    """Return a method or run name if it is a safe folder name (same rule as case names)."""
    if not isinstance(name, str) or not CASE_NAME.match(name) or ".." in name:
        raise InputError(source, f"invalid {what} name '{name}' (letters, digits, '_', '-', '.'; no '..' or '/')")
    return name


def check_label_values(values: Any, source: str | Path) -> None:
    """Refuse label values that a uint8 label file cannot hold (negative, over 255, not integers)."""
    bad = []
    for value in values:
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not integer or not 0 <= value <= MAX_LABEL:
            bad.append(value)
    if bad:
        shown = ", ".join(str(int(v)) if isinstance(v, (int, np.integer)) else repr(v) for v in bad[:5])
        raise InputError(source, f"label values must be integers 0..{MAX_LABEL}; found {shown}")


def parse_labels(labels: dict) -> dict[int, str]:
    """Label map ``{value: name}`` from either the Decathlon (``{"0": "background"}``) or nnU-Net v2
    (``{"background": 0}``) form of ``dataset.json``'s ``labels``."""
    out: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and not str(key).isdigit()):
            out[int(value)] = str(key)
        else:
            out[int(key)] = str(value)
    if 0 not in out:
        raise ValueError("labels must declare 0 (background)")
    bad = sorted(v for v in out if not 0 <= v <= MAX_LABEL)
    if bad:
        raise ValueError(f"label values must be 0..{MAX_LABEL} (a label file stores uint8); found {bad}")
    return dict(sorted(out.items()))


def check_image(volume: Volume, source: str | Path) -> None:
    """Refuse images whose intensities hold NaN or infinity."""
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise InputError(source, "image holds NaN or infinite intensities")
    if volume.array.dtype.kind not in "iuf b":
        raise InputError(source, f"unsupported voxel type {volume.array.dtype}")


def label_histogram(array: np.ndarray) -> np.ndarray:
    """Voxel count of each value 0..255 of a uint8 label (in slabs: twice as fast as one ``np.bincount``,
    which would first widen the whole volume to int64)."""
    flat = array.ravel()
    counts = np.zeros(MAX_LABEL + 1, np.int64)
    for start in range(0, flat.size, 1 << 18):
        counts += np.bincount(flat[start:start + (1 << 18)], minlength=MAX_LABEL + 1)
    return counts


def check_label(label: Volume, image: Volume, label_values: dict[int, str], source: str | Path) -> np.ndarray:
    """Validate ``label`` against its ``image`` and the declared values; return it as a uint8 array."""
    return check_label_counts(label, image, label_values, source)[0]


def check_label_counts(label: Volume, image: Volume, label_values: dict[int, str],
                        source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    mismatch = image.geometry_mismatch(label)
    if mismatch:
        raise InputError(source, f"label does not match its image: {mismatch}")
    array = label.array
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise InputError(source, "label holds non-integer values")
    elif array.dtype.kind not in "iub":
        raise InputError(source, f"label has unsupported voxel type {array.dtype}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > MAX_LABEL:
        values = np.unique(array[(array < 0) | (array > MAX_LABEL)])
        shown = ", ".join(str(int(v)) for v in values[:5])
        raise InputError(source, f"label values must be integers 0..{MAX_LABEL}; found {shown}")
    array = np.array(array, dtype=np.uint8)  # a copy: the caller may go on editing its array
    counts = label_histogram(array)  # within 0..255: a histogram is ten times faster than np.unique
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - set(label_values))
    if unknown:
        raise InputError(source, f"label values {unknown} are not declared in dataset.json {sorted(label_values)}")
    return array, counts


