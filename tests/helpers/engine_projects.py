"""Small real projects for the engine tests: centre crops of the brain-tissue sample volumes (real intensities and
labels, a fraction of the voxels, so whole-volume validation and inference take well under a second)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.project import Project
from backend.project.sample import sample_root
from backend.io.volume import Volume


def crop_center(volume: Volume, size: tuple[int, int, int]) -> Volume:
    """The centre ``size`` (z, y, x) box of ``volume`` with its origin moved so world positions are kept."""
    starts = [max(0, (s - c) // 2) for s, c in zip(volume.shape, size)]
    box = tuple(slice(a, a + c) for a, c in zip(starts, size))
    ijk = np.array(starts[::-1], dtype=float)  # (x, y, z) voxel offset
    origin = np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * ijk)
    return Volume(np.ascontiguousarray(volume.array[box]), volume.spacing, tuple(origin), volume.direction.copy())


def small_brain_project(root: Path, *, size: tuple[int, int, int] = (48, 64, 64), labeled: int = 1) -> Project:
    """brain_tissue cropped to ``size``: ``mni152_t1`` labeled; with ``labeled=2`` also ``itk_kmeans_t1`` (else
    unlabeled); ``colin27_ch2`` and ``colin27_ch2better`` always unlabeled."""
    source = Project.open(sample_root() / "brain_tissue")
    project = Project.create(root, labels=source.labels, modality=source.modality, name="small_brain")
    for case in source.case_ids():
        image = crop_center(source.read_image(case), size)
        label = source.read_label(case) if (labeled >= 2 or case != "itk_kmeans_t1") else None
        project.add_case(case, image, None if label is None else crop_center(label, size))
    return project
