"""One in-memory volume type and the readers/writers of every supported format.

Conventions (the ones ITK, SimpleITK and DICOM use):

* ``Volume.array`` is indexed ``[z, y, x]`` (numpy order, as ``sitk.GetArrayFromImage`` returns it), so napari
  shows axial slices and scrolls through ``z``.
* ``spacing`` and ``origin`` are ``(x, y, z)`` in millimetres, ``direction`` is the 3x3 matrix whose columns are
  the x, y and z axes in LPS world coordinates.  ``world = origin + direction @ diag(spacing) @ (i, j, k)``.

NIfTI goes through nibabel (RAS affine, flipped to LPS here); NRRD/MHA/MHD and DICOM series through SimpleITK;
SSL4MIS-style HDF5 through h5py (``image``/``label`` datasets, arrays taken in ``[z, y, x]`` order, spacing from
a ``spacing`` attribute when present, else 1 mm with a warning in ``Volume.notes``).
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import warnings
from pathlib import Path

import numpy as np

from backend.errors import InputError
from backend.io.atomic import fsync_dir, fsync_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
H5_SUFFIXES = (".h5", ".hdf5")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + H5_SUFFIXES
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def suffix_of(path: str | Path) -> str:
    """The format suffix of ``path``, double suffixes (``.nii.gz``, ``.seg.nrrd``) included."""
    name = Path(path).name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def strip_suffix(path: str | Path) -> str:
    """File name without its format suffix: ``case_0000.nii.gz`` -> ``case_0000``."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(name))] if suffix_of(name) else name


def format_mm(values) -> str:
    """``(1.5, 0.9766, 3)``: plain numbers for messages (numpy 2 would print ``np.float64(1.5)``)."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)) + ")"


@dataclasses.dataclass
class Volume:
    """A 3D voxel array with its full physical geometry (see module docstring for conventions)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping ``(x, y, z, 1)`` voxel indices to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """The NIfTI/nibabel affine: ``(x, y, z, 1)`` voxel indices to RAS millimetres."""
        return _LPS_FROM_RAS @ self.affine_lps

    def like(self, array: np.ndarray) -> "Volume":
        """A new volume holding ``array`` in this volume's geometry (shapes must match)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"shape {tuple(array.shape)} does not match the volume's {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def geometry_mismatch(self, other: "Volume", tol: float = 1e-4) -> str | None:
        """``None`` when both volumes share size and geometry within ``tol`` mm, else what differs."""
        if self.shape != other.shape:
            return f"shape {other.shape} differs from {self.shape}"
        for name in ("spacing", "origin"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(a, b, atol=tol, rtol=0):
                return f"{name} {format_mm(b)} differs from {format_mm(a)}"
        if not np.allclose(self.direction, other.direction, atol=tol, rtol=0):
            return "direction differs"
        return None

    # ---- SimpleITK bridge -----------------------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image) -> "Volume":
        import SimpleITK as sitk

        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
        )


# ---- reading -------------------------------------------------------------------------------------------
def read_volume(path: str | Path, *, key: str = "image", series_uid: str | None = None) -> Volume:
    """Read a 3D volume from any supported format; a folder is read as a DICOM series.

    Raises :class:`InputError` naming ``path`` for anything unreadable, truncated, 2D, 4D or multi-component.
    ``key`` picks the dataset of an HDF5 file; ``series_uid`` the series of a DICOM folder (default: the
    series with the most files).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    try:
        if path.is_dir():
            volume = _read_dicom(path, series_uid)
        else:
            suffix = suffix_of(path)
            if suffix in NIFTI_SUFFIXES:
                volume = _read_nifti(path)
            elif suffix in ITK_SUFFIXES:
                volume = _read_itk(path)
            elif suffix in H5_SUFFIXES:
                volume = _read_h5(path, key)
            else:
                raise InputError(path, f"unsupported format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    except InputError:
        raise
    except Exception as exc:  # every library has its own exception types for a broken file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read ({first[:200]})") from exc
    if volume.array.ndim == 2:
        raise InputError(path, f"2D image of shape {volume.array.shape}; a 3D volume is expected")
    if volume.array.ndim != 3:
        raise InputError(path, f"{volume.array.ndim}D image of shape {volume.array.shape}; a 3D volume is expected")
    if min(volume.spacing) <= 0 or not np.all(np.isfinite(volume.spacing)):
        raise InputError(path, f"invalid voxel spacing {format_mm(volume.spacing)}")
    return volume


def read_geometry(path: str | Path) -> Volume:
    """A NIfTI file's size and geometry from its header alone (no voxel is decompressed).

    The returned volume's array is a read-only zero-stride placeholder of the right shape: use it for
    geometry checks and :meth:`Volume.like`, never for voxel values.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot read header ({exc})") from exc
    shape = image.shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"{len(image.shape)}D image of shape {image.shape}; a 3D volume is expected")
    return _nifti_volume(path, image, np.broadcast_to(np.uint8(0), shape))


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)  # reads the whole file: a truncated one fails here
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return Volume(data)  # rejected by the caller with its shape
    return _nifti_volume(path, image, data)


def _nifti_volume(path: Path, image, data: np.ndarray) -> Volume:
    """Volume from nibabel's ``[x, y, z]`` data and RAS affine (flipped to LPS, axes to ``[z, y, x]``)."""
    lps = _LPS_FROM_RAS @ image.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise InputError(path, "the header holds no voxel spacing (zero-length axis in the affine)")
    return Volume(
        np.ascontiguousarray(data.transpose(2, 1, 0)),
        tuple(spacing),
        tuple(lps[:3, 3]),
        lps[:3, :3] / spacing,
    )


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{image.GetNumberOfComponentsPerPixel()} components per voxel; one is expected")
    if image.GetDimension() != 3:
        return Volume(sitk.GetArrayFromImage(image))
    return Volume.from_sitk(image)


def _read_dicom(folder: Path, series_uid: str | None) -> Volume:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series:
        raise InputError(folder, "no DICOM series in this folder")
    if series_uid is None:
        series_uid = max(series, key=lambda uid: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)))
    elif series_uid not in series:
        raise InputError(folder, f"no DICOM series {series_uid} (found {', '.join(series)})")
    reader = sitk.ImageSeriesReader()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warning on a gap: refused below instead
    try:
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise InputError(folder, "the DICOM series holds a single slice; a 3D volume is expected")
    _check_slice_spacing(folder, reader, image)
    return Volume.from_sitk(image)


SLICE_GAP_TOLERANCE = 0.01  # relative: slice positions may deviate 1 % of the slice distance (rounding in headers)


def _check_slice_spacing(folder: Path, reader, image) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing slice, a gap, a mixed series).

    SimpleITK stacks the slices with one spacing (the mean), which would silently misplace every slice after a
    gap; resampling would invent data, so the series is refused with the distances found.
    """
    count = image.GetSize()[2]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    normal = direction[:, 2]
    positions = []
    for k in range(count):
        key = "0020|0032"  # Image Position (Patient)
        if not reader.HasMetaDataKey(k, key):
            return  # no per-slice position (not a classic slice series): nothing to check against
        try:
            positions.append(float(np.dot(normal, [float(v) for v in reader.GetMetaData(k, key).split("\\")])))
        except ValueError:
            raise InputError(folder, f"slice {k + 1} has an unreadable position '{reader.GetMetaData(k, key)}'")
    gaps = np.diff(np.asarray(positions))
    step = float(np.median(np.abs(gaps)))
    if step <= 0:
        raise InputError(folder, "two slices of the DICOM series share one position (a duplicated slice?)")
    bad = np.flatnonzero(np.abs(np.abs(gaps) - step) > SLICE_GAP_TOLERANCE * step)
    if bad.size or np.any(np.sign(gaps) != np.sign(gaps[0])):
        k = int(bad[0]) if bad.size else 0
        raise InputError(folder, f"non-uniform slice spacing: slices {k + 1} and {k + 2} are {abs(gaps[k]):.4g} mm "
                                 f"apart, the others {step:.4g} mm (a missing slice?); {count} slices found. "
                                 f"Re-export the complete series, or resample it to a uniform grid first")


def _read_h5(path: Path, key: str) -> Volume:
    import h5py

    with h5py.File(path, "r") as handle:
        if key not in handle:
            raise InputError(path, f"no '{key}' dataset (found {', '.join(handle.keys())})")
        data = handle[key][()]
        spacing = handle[key].attrs.get("spacing", handle.attrs.get("spacing"))
    volume = Volume(np.asarray(data))
    if data.ndim == 3:
        if spacing is None:
            volume.notes.append(f"{path.name}: no 'spacing' attribute, 1 mm isotropic assumed")
        else:
            volume.spacing = tuple(float(s) for s in np.ravel(spacing)[:3])
    return volume


def h5_has_key(path: str | Path, key: str) -> bool:
    import h5py

    with h5py.File(path, "r") as handle:
        return key in handle


# ---- writing -------------------------------------------------------------------------------------------
def write_volume(volume: Volume, path: str | Path, *, metadata: dict[str, str] | None = None,
                 sync_dir: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix), atomically: a temp file, then a rename.

    A crash or a full disk never leaves a half-written file at ``path``; an earlier file there stays intact.
    ``metadata`` becomes NRRD/MHA header fields (used for 3D Slicer's ``.seg.nrrd``).  The file is fsynced, and
    so is its folder unless ``sync_dir`` is False (a caller that fsyncs the folder itself afterwards).
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in NIFTI_SUFFIXES + ITK_SUFFIXES or suffix in (".mhd", ".nhdr"):
        raise InputError(path, f"cannot write '{suffix}' (write .nii.gz, .nii, .nrrd, .seg.nrrd or .mha)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh random name created by the writer itself: the file gets the umask's mode (mkstemp forces 0600).
    tmp = path.parent / f".tmp-{secrets.token_hex(8)}{suffix}"
    try:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(volume, tmp)
        else:
            _write_itk(volume, tmp, metadata or {})
        fsync_file(tmp)
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(path, f"cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_nifti(volume: Volume, path: Path) -> None:
    import nibabel as nib

    affine = volume.affine_ras
    # The [x, y, z] view of a C-ordered [z, y, x] array is Fortran-ordered: exactly what NIfTI stores, no copy.
    image = nib.Nifti1Image(volume.array.transpose(2, 1, 0), affine)
    # Both forms set and equal, so nibabel and ITK (which disagree on which one wins) read the same geometry.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib.save(image, str(path))


def _write_itk(volume: Volume, path: Path, metadata: dict[str, str]) -> None:
    import SimpleITK as sitk

    image = volume.to_sitk()
    for key, value in metadata.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), useCompression=True)
