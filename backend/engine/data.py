"""Training batches from a project folder: a labeled and an unlabeled stream, drawn together every step.

Semi-supervised methods see both kinds of data in every step (the two-stream batch sampler of UA-MT / SSL4MIS:
``batch_labeled`` labeled patches plus ``batch_unlabeled`` unlabeled ones).  This module

* loads every volume once (:func:`load_case`): resampled to the config's ``target_spacing`` when it has one
  (:func:`resample_to_spacing`: SimpleITK, linear for images, nearest neighbour for labels, same origin and
  direction), intensities clipped to its ``intensity_window`` and normalised by
  :func:`backend.engine.intensity.normalize_intensity` for the project's modality, kept as float32 ``[C, Z, Y, X]``,
  labels as uint8 ``[Z, Y, X]``.  Inference prepares a volume the same way (:func:`model_input`) and brings
  the labels back to the case's own grid (:func:`to_case_grid`); validation scores on the training grid.  Volumes
  smaller than the patch are zero-padded once, up front (MONAI ``SpatialPad``; zero is also what MONAI's
  sliding-window inference pads with, so training and inference see the same border);
* cuts patches by plain array slicing (a batch takes about a millisecond, so loading never dominates a step):

  - 3D (``len(patch_size) == 3``): random ``(D, H, W)`` boxes.  Labeled patches are centred on a voxel of a
    randomly chosen foreground class with probability ``fg_fraction`` (nnU-Net's foreground oversampling;
    class voxel lists from MONAI ``map_classes_to_indices``, subsampled to ``MAX_FG_SAMPLES`` per class to
    bound memory), else placed uniformly.
  - 2D (``len(patch_size) == 2``): a random axial slice ``z`` with a random ``(H, W)`` crop; foreground
    oversampling picks the slice and the crop centre from a foreground voxel.

* is deterministic: batch ``i`` is drawn from ``numpy.random.default_rng((seed, i))`` alone, so the sampler's
  whole state is ``(seed, i)`` and a resumed run draws exactly the batches an uninterrupted one would.

When a project has no unlabeled case, the labeled images (without their labels) double as the unlabeled
stream, so every method still gets both streams; :attr:`BatchSampler.unlabeled_from_labeled` records it.
Augmentation is left to the methods (their weak/strong perturbations are part of each paper's method).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from backend.engine.intensity import normalize_intensity
from backend.project import Project
from backend.io.volume import Volume

FG_FRACTION = 2.0 / 3.0  # share of labeled patches centred on a labeled (foreground) voxel
MAX_FG_SAMPLES = 100_000  # voxel positions kept per class for foreground oversampling


@dataclasses.dataclass
class CaseArrays:
    """One case in memory: normalised image ``[C, Z, Y, X]`` float32, label ``[Z, Y, X]`` uint8 or None."""

    case: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]  # (x, y, z) mm, as Volume.spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])


# ---- preprocessing (the preset's grid and intensity window) ---------------------------------------------------
def resample_to_spacing(volume: Volume, spacing: Sequence[float] | None, *, label: bool = False) -> Volume:
    """``volume`` on a grid of ``spacing`` (x, y, z) mm with the same origin, direction and extent (SimpleITK
    ``Resample``; linear interpolation for images, nearest neighbour for labels).  The volume itself when
    ``spacing`` is None or already its spacing."""
    if spacing is None or np.allclose(volume.spacing, spacing, rtol=0, atol=1e-6):
        return volume
    import SimpleITK as sitk

    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"target_spacing must be three positive (x, y, z) mm values (got {spacing})")
    size_xyz = volume.shape[::-1]
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(size_xyz, volume.spacing, spacing)]
    source = volume.to_sitk()
    if not label:
        source = sitk.Cast(source, sitk.sitkFloat32)
    out = sitk.Resample(source, new_size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        volume.origin, spacing, tuple(volume.direction.ravel()), 0, source.GetPixelID())
    return Volume.from_sitk(out)


def to_case_grid(label: np.ndarray, grid: Volume, case_image: Volume, *, nearest_float: bool = False) -> np.ndarray:
    """A ``[Z, Y, X]`` label computed on ``grid`` (the resampled volume) resampled, nearest neighbour, onto the
    exact grid of ``case_image``; returned as is when the two grids are the same.  ``nearest_float``: a float32
    map (an entropy map), resampled nearest neighbour too."""
    if grid is case_image or (grid.geometry_mismatch(case_image, tol=1e-6) is None):
        return label
    import SimpleITK as sitk

    dtype, pixel = (np.float32, sitk.sitkFloat32) if nearest_float else (np.uint8, sitk.sitkUInt8)
    source = grid.like(np.ascontiguousarray(label, dtype=dtype)).to_sitk()
    reference = case_image.to_sitk()
    out = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pixel)
    return sitk.GetArrayFromImage(out)


def preprocess_image(image: Volume, modality: str, config: Any = None) -> tuple[np.ndarray, Volume]:
    """``(normalised float32 [C, Z, Y, X], the grid it lies on)``: ``image`` resampled to the config's
    ``target_spacing`` and normalised with its ``intensity_window`` (both optional config fields, None: as
    stored)."""
    grid = resample_to_spacing(image, getattr(config, "target_spacing", None))
    array = normalize_intensity(grid.array, modality, getattr(config, "intensity_window", None))[None]
    return np.ascontiguousarray(array, dtype=np.float32), grid


def model_input(project: Project, case: str, config: Any = None) -> tuple[torch.Tensor, Volume, Volume]:
    """``(volume tensor [C, Z, Y, X] for Method.pseudo_labels / predict, its grid, the case's image)``; see
    :func:`to_case_grid` to bring results back to the image's grid."""
    image = project.read_image(case)
    array, grid = preprocess_image(image, project.modality, config)
    return torch.from_numpy(array), grid, image


def load_case(project: Project, case: str, *, with_label: bool = True, config: Any = None) -> CaseArrays:
    """Read and preprocess one case (the label too when ``with_label`` and the case has one): resampled to
    ``config.target_spacing`` and clipped to ``config.intensity_window`` when the config sets them."""
    image = project.read_image(case)
    array, grid = preprocess_image(image, project.modality, config)
    label = project.read_label(case) if with_label else None
    if label is not None:
        label = resample_to_spacing(label, getattr(config, "target_spacing", None), label=True)
    lab = None if label is None else np.ascontiguousarray(label.array.astype(np.uint8))
    return CaseArrays(case, array, lab, grid.spacing)


def load_cases(project: Project, cases: Sequence[str], *, with_label: bool = True,
               config: Any = None) -> list[CaseArrays]:
    return [load_case(project, c, with_label=with_label, config=config) for c in cases]


class _Padded:
    """A case padded to at least the patch size (once), with its foreground voxel lists."""

    def __init__(self, data: CaseArrays, patch: tuple[int, ...], num_classes: int | None):
        from monai.transforms import SpatialPad

        spatial = data.shape
        target = tuple(patch) if len(patch) == 3 else (spatial[0], *patch)
        target = tuple(max(s, p) for s, p in zip(spatial, target))
        if target != tuple(spatial):
            pad = SpatialPad(target, method="symmetric", mode="constant")
            self.image = np.ascontiguousarray(np.asarray(pad(data.image)), dtype=np.float32)
            self.label = None if data.label is None else np.ascontiguousarray(
                np.asarray(pad(data.label[None]))[0], dtype=np.uint8)
        else:
            self.image, self.label = data.image, data.label
        self.shape = tuple(self.image.shape[1:])
        self.fg: list[np.ndarray] = []
        if self.label is not None:
            from monai.transforms.utils import map_classes_to_indices

            k = num_classes or int(self.label.max()) + 1
            per_class = map_classes_to_indices(self.label[None], num_classes=max(k, 2),
                                               max_samples_per_class=MAX_FG_SAMPLES)
            self.fg = [np.asarray(ix, dtype=np.int64) for ix in per_class[1:] if len(ix)]


class BatchSampler:
    """Draws ``(labeled, unlabeled)`` batches; see the module docstring for the sampling rules.

    ``labeled`` cases must carry labels; ``unlabeled`` may be empty (then the labeled images are used).
    Batches are dicts of tensors on ``device``: ``{"image": float32 [B, C, *patch], "label": int64 [B, 1, *patch]}``
    and ``{"image": float32 [B, C, *patch]}``.
    """

    def __init__(self, labeled: Sequence[CaseArrays], unlabeled: Sequence[CaseArrays], patch_size: Sequence[int], *,
                 batch_labeled: int, batch_unlabeled: int, seed: int = 0, fg_fraction: float = FG_FRACTION,
                 num_classes: int | None = None, device: torch.device | str = "cpu"):
        if not labeled:
            raise ValueError("at least one labeled case is needed")
        if any(c.label is None for c in labeled):
            raise ValueError("every labeled case needs a label")
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries (got {self.patch})")
        self.batch_labeled = int(batch_labeled)
        self.batch_unlabeled = int(batch_unlabeled)
        self.seed = int(seed)
        self.fg_fraction = float(fg_fraction)
        self.device = torch.device(device)
        self.index = 0
        self.labeled = [_Padded(c, self.patch, num_classes) for c in labeled]
        self.unlabeled_from_labeled = not unlabeled
        if unlabeled:
            self.unlabeled = [_Padded(dataclasses.replace(c, label=None), self.patch, num_classes) for c in unlabeled]
        else:
            self.unlabeled = [_Padded(dataclasses.replace(c, label=None), self.patch, num_classes) for c in labeled]
        self.channels = labeled[0].image.shape[0]

    # ---- state (everything a resumed run needs) -------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.index = int(state["index"])

    # ---- sampling ----------------------------------------------------------------------------------------
    def next(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The next batch pair (advances the sampler)."""
        out = self.batch(self.index)
        self.index += 1
        return out

    def batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Batch pair number ``index`` (a pure function of ``(seed, index)``)."""
        rng = np.random.default_rng((self.seed, int(index)))
        images, labels = self._draw(rng, self.labeled, self.batch_labeled, with_label=True)
        u_images, _ = self._draw(rng, self.unlabeled, self.batch_unlabeled, with_label=False)
        labeled = {"image": self._to_device(images), "label": self._to_device(labels).long()}
        unlabeled = {"image": self._to_device(u_images)}
        return labeled, unlabeled

    def _draw(self, rng: np.random.Generator, cases: list[_Padded], count: int, *, with_label: bool
              ) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.empty((count, self.channels, *self.patch), dtype=np.float32)
        labels = np.empty((count, 1, *self.patch), dtype=np.uint8) if with_label else None
        for b in range(count):
            case = cases[int(rng.integers(len(cases)))]
            centre = None
            if with_label and case.fg and rng.random() < self.fg_fraction:
                voxels = case.fg[int(rng.integers(len(case.fg)))]
                centre = np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), case.shape)
            box = self._box(rng, case.shape, centre)
            images[b] = case.image[(slice(None), *box)]
            if labels is not None:
                labels[b, 0] = case.label[box]
        return images, labels

    def _box(self, rng: np.random.Generator, shape: tuple[int, int, int], centre) -> tuple:
        """Index tuple of one patch: 3 slices (3D) or ``(z, slice, slice)`` (2D)."""
        if len(self.patch) == 3:
            extent, dims = self.patch, shape
        else:
            extent, dims = self.patch, shape[1:]
        starts = []
        for i, (p, s) in enumerate(zip(extent, dims)):
            hi = s - p  # >= 0: volumes were padded to the patch
            if centre is None:
                starts.append(int(rng.integers(hi + 1)))
            else:
                c = int(centre[i] if len(self.patch) == 3 else centre[i + 1])
                starts.append(min(max(c - p // 2, 0), hi))
        box = tuple(slice(a, a + p) for a, p in zip(starts, extent))
        if len(self.patch) == 3:
            return box
        z = int(centre[0]) if centre is not None else int(rng.integers(shape[0]))
        return (z, *box)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def make_sampler(project: Project, config: Any, labeled_cases: Sequence[str], unlabeled_cases: Sequence[str], *,
                 seed: int, device: torch.device | str = "cpu",
                 cache: dict[str, CaseArrays] | None = None) -> BatchSampler:
    """A :class:`BatchSampler` over the project's cases, shaped by a method config (``patch_size``,
    ``batch_labeled``, ``batch_unlabeled``, ``num_classes``, optional ``fg_fraction``).

    ``cache`` (case -> arrays) is filled and reused so validation can share the loaded volumes.  Cases are
    preprocessed as the config says (``target_spacing``, ``intensity_window``; see :func:`load_case`).
    """
    cache = {} if cache is None else cache

    def get(case: str) -> CaseArrays:
        if case not in cache:
            cache[case] = load_case(project, case, config=config)
        return cache[case]

    labeled = [get(c) for c in labeled_cases]
    unlabeled = [get(c) for c in unlabeled_cases]
    return BatchSampler(labeled, unlabeled, config.patch_size, batch_labeled=config.batch_labeled,
                        batch_unlabeled=config.batch_unlabeled, seed=seed,
                        fg_fraction=getattr(config, "fg_fraction", FG_FRACTION),
                        num_classes=config.num_classes, device=device)
