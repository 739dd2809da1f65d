"""Volume I/O keeps geometry exactly, for every reader format, through the project, read back by SimpleITK
and nibabel (issue 2: round trip, oblique DICOM, LPS NRRD)."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from backend.errors import InputError
from backend.project.importer import init_project
from backend.io.volume import Volume, read_volume, write_volume

from conftest import SAMPLE  # noqa: E402

SOURCE_IMAGE = SAMPLE / "lesions" / "imagesTr" / "radiomics_brain1_0000.nii.gz"
SOURCE_LABEL = SAMPLE / "lesions" / "labelsTr" / "radiomics_brain1.nii.gz"
TOL = 1e-4


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _real_oblique_image() -> sitk.Image:
    """The real MR brain volume, cropped to a few slices, with an oblique LPS direction and odd origin."""
    image = sitk.ReadImage(str(SOURCE_IMAGE))[:, :, 8:16]
    image.SetDirection(tuple(_rotation((1, 2, 3), 23.0).ravel()))
    image.SetOrigin((-101.25, 37.5, 12.125))
    return sitk.Cast(image, sitk.sitkInt16)


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """A real multi-slice DICOM series written with SimpleITK's series writer (per-slice position tags)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.12345"
    orientation = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                   direction[1], direction[4], direction[7]))
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [
            ("0008|0060", "MR"), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.1"),
            ("0020|0037", orientation), ("0020|0032", "\\".join(f"{p:.10f}" for p in position)),
            ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.10f}"),
            ("0028|0030", f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}"),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}"),
        ]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def _make_source(fmt: str, tmp: Path) -> tuple[Path, sitk.Image]:
    """Write the real volume in ``fmt``; return the path and the geometry reference as SimpleITK reads it."""
    image = _real_oblique_image()
    folder = tmp / "scans"
    folder.mkdir()
    if fmt == "dicom":
        _write_dicom_series(image, folder / "case1")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "case1")))
        return folder / "case1", reader.Execute()
    if fmt == "h5":
        path = folder / "case1.h5"
        with h5py.File(path, "w") as handle:
            handle["image"] = sitk.GetArrayFromImage(image)
            handle.attrs["spacing"] = image.GetSpacing()
        ref = sitk.GetImageFromArray(sitk.GetArrayFromImage(image))
        ref.SetSpacing(image.GetSpacing())
        return path, ref
    if fmt == "nrrd-lps":
        # An LPS-oriented NRRD: identity direction in LPS (what ITK writes for "left-posterior-superior").
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
        path = folder / "case1.nrrd"
    else:
        path = folder / f"case1.{fmt}"
    sitk.WriteImage(image, str(path))
    return path, sitk.ReadImage(str(path))


def _assert_same_geometry(ref: sitk.Image, path: Path) -> None:
    got = sitk.ReadImage(str(path))
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=TOL)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=TOL)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=TOL)
    # nibabel reads the same file to the same world mapping (RAS = diag(-1, -1, 1) LPS).
    ref_vol = Volume.from_sitk(ref)
    nib_img = nib.load(str(path))
    assert nib_img.shape == ref.GetSize()
    np.testing.assert_allclose(nib_img.affine, ref_vol.affine_ras, atol=TOL)


@pytest.mark.parametrize("fmt", ["nii.gz", "nii", "nrrd", "nrrd-lps", "mha", "mhd", "dicom", "h5"])
def test_label_written_through_project_keeps_source_geometry(fmt, tmp_path):
    source, ref = _make_source(fmt, tmp_path)
    project = init_project(tmp_path / "project", tmp_path / "scans", labels_json=None)
    (case,) = project.case_ids()
    image = project.read_image(case)
    label = (image.array > np.percentile(image.array, 90)).astype(np.uint8)
    project.accept(case, label, source="test")
    _assert_same_geometry(ref, project.image_path(case))
    _assert_same_geometry(ref, project.label_path(case))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(project.label_path(case)))), label)


def test_dicom_series_reader_picks_the_largest_series_or_the_named_one(tmp_path):
    image = _real_oblique_image()
    _write_dicom_series(image, tmp_path / "dcm")
    volume = read_volume(tmp_path / "dcm")
    assert volume.shape == (image.GetDepth(), image.GetHeight(), image.GetWidth())
    with pytest.raises(InputError, match="no DICOM series 1.2.3"):
        read_volume(tmp_path / "dcm", series_uid="1.2.3")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_write_then_read_is_exact(suffix, tmp_path):
    volume = read_volume(SOURCE_LABEL)
    volume.direction = _rotation((0, 0, 1), 30.0)
    path = write_volume(volume, tmp_path / f"label{suffix}")
    back = read_volume(path)
    assert back.geometry_mismatch(volume) is None
    np.testing.assert_array_equal(back.array, volume.array)
    assert not list(tmp_path.glob(".tmp-*")), "temp files must not be left behind"


def test_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    volume = read_volume(SOURCE_LABEL)
    path = write_volume(volume, tmp_path / "label.nii.gz")
    before = path.read_bytes()
    import backend.io.volume as bv

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bv, "_write_nifti", disk_full)
    with pytest.raises(InputError, match="No space left on device") as err:
        write_volume(volume.like(np.zeros_like(volume.array)), path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".tmp-*"))
