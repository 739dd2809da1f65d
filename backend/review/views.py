"""The pseudo-label views of a case, their majority vote and voxel-wise disagreement, per method and per slice."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from backend.io.volume import Volume, read_volume, strip_suffix
from backend.project import Project
from backend.project.checks import FILE_ENDING, check_case_name
from backend.review.queue import default_runs

MAJORITY = "majority"  # the name of the majority-vote "view"
ALL_METHODS = "all methods"  # the disagreement of every view of every method


def pseudo_views(project: Project, case: str, runs: dict[str, str] | None = None) -> dict[str, Path]:
    """``{"<method>:<view>": path}`` of every pseudo label of ``case`` in ``runs`` (default: :func:`default_runs`)."""
    check_case_name(case)
    runs = default_runs(project) if runs is None else runs
    views: dict[str, Path] = {}
    for method, run in sorted(runs.items()):
        folder = project.pseudo_dir(method, run) / case
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{FILE_ENDING}")):
                views[f"{method}:{strip_suffix(path)}"] = path
    return views


def read_views(project: Project, case: str, runs: dict[str, str] | None = None,
               image: Volume | None = None) -> dict[str, np.ndarray]:
    """Every pseudo-label view of ``case`` as uint8 ``[z, y, x]`` arrays, each checked against the image grid
    (a view that does not fit the image is skipped, never shown misaligned)."""
    image = image if image is not None else project.read_image(case)
    out: dict[str, np.ndarray] = {}
    for name, path in pseudo_views(project, case, runs).items():
        volume = read_volume(path)
        if image.geometry_mismatch(volume) is None:
            out[name] = volume.array.astype(np.uint8, copy=False)
    return out


def majority_vote(arrays: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Voxel-wise majority of the views (uint8).  A tie goes to the lower class value, so background wins
    ties against a structure: the reviewer then adds what is doubtful rather than erasing it."""
    if not arrays:
        raise ValueError("no views to vote over")
    counts = np.zeros((num_classes,) + arrays[0].shape, dtype=np.uint8)
    for array in arrays:
        for k in range(num_classes):
            counts[k] += array == k
    return np.argmax(counts, axis=0).astype(np.uint8)


def disagreement(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """1 where the views do not all agree, 0 where they do (uint8, one value so it draws in one colour)."""
    if not arrays:
        raise ValueError("no views")
    out = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays[1:]:
        out |= array != arrays[0]
    return out.view(np.uint8)


def view_method(view: str) -> str:
    """The method of a ``<method>:<view>`` name."""
    return view.split(":", 1)[0]


def disagreement_by_method(views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{method: where that method's own views differ}`` for every method with two or more views, plus
    :data:`ALL_METHODS` (every view of every method) when more than one method has views.  One method's
    disagreement says how unsure that method is; mixing methods mostly shows how they differ."""
    by_method: dict[str, list[np.ndarray]] = {}
    for name, array in views.items():
        by_method.setdefault(view_method(name), []).append(array)
    out = {m: disagreement(arrays) for m, arrays in by_method.items() if len(arrays) > 1}
    if len(by_method) > 1:
        out[ALL_METHODS] = disagreement(list(views.values()))
    return out


def slice_profile(mask: np.ndarray) -> np.ndarray:
    """Voxels set in ``mask`` per axial slice (axis 0 of ``[z, y, x]``), int64, one entry per slice."""
    mask = np.asarray(mask)
    return np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1).astype(np.int64)


def worst_slice(profile: Sequence[int] | np.ndarray) -> int | None:
    """The slice with the most disagreement (the lowest index on ties), None when the views agree everywhere."""
    profile = np.asarray(profile)
    if profile.size == 0 or not profile.any():
        return None
    return int(np.argmax(profile))
