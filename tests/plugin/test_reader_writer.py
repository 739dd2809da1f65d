"""File > Open (NIfTI, NRRD, MHA/MHD, DICOM folder, HDF5) and File > Save of Labels layers in the source geometry,
through napari's own plugin machinery, on the real sample volumes; plus the sample-data contributions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.io.volume import Volume, read_volume, write_volume
from conftest import SAMPLE
from napari_semiseg._reader import get_reader, read_layers
from napari_semiseg._writer import write_labels

PLUGIN = "napari-semiseg"
IMAGE = SAMPLE / "lesions" / "imagesTr" / "radiomics_brain1_0000.nii.gz"  # 0.78 x 0.78 x 6.5 mm, oblique-free
LABEL = SAMPLE / "lesions" / "labelsTr" / "radiomics_brain1.nii.gz"


def _rotated(volume: Volume) -> Volume:
    """The same voxels with a non-trivial origin and an oblique direction (rotated 30 degrees about z)."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ volume.direction
    return Volume(volume.array, volume.spacing, (12.5, -40.25, 7.0), direction)


def _assert_same_geometry(a: Volume, b: Volume) -> None:
    assert a.geometry_mismatch(b) is None, a.geometry_mismatch(b)


def _write_dicom_series(volume: Volume, folder: Path) -> None:
    """One CT slice per file with the position/orientation/spacing tags a scanner writes."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    array = volume.array.astype(np.int16)
    uid = "1.2.826.0.1.3680043.2.1125.1.99"
    direction = volume.direction
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k:k + 1])
        image.SetSpacing(volume.spacing)
        position = np.asarray(volume.origin) + direction @ (np.array([0, 0, k]) * np.asarray(volume.spacing))
        image.SetOrigin(tuple(position))
        image.SetDirection(tuple(direction.ravel()))
        tags = {
            "0008|0060": "CT", "0020|000d": uid + ".0", "0020|000e": uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1])),
            "0028|0030": f"{volume.spacing[1]:.6f}\\{volume.spacing[0]:.6f}",
            "0018|0050": f"{volume.spacing[2]:.6f}", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


@pytest.fixture(scope="module")
def source() -> Volume:
    return read_volume(IMAGE)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_open_gives_an_image_layer_with_spacing_as_scale(tmp_path, source, suffix):
    volume = _rotated(source)
    path = tmp_path / f"scan{suffix}"
    if suffix == ".mhd":
        import SimpleITK as sitk

        sitk.WriteImage(volume.to_sitk(), str(path))
    else:
        write_volume(volume, path)
    reader = get_reader(str(path))
    assert reader is not None
    [(data, meta, kind)] = reader(str(path))
    assert kind == "image" and data.shape == source.shape
    assert meta["name"] == "scan"
    assert meta["scale"] == pytest.approx(tuple(source.spacing[::-1]), abs=1e-4)  # z, y, x
    geometry = meta["metadata"]["geometry"]
    assert geometry["spacing"] == pytest.approx(list(volume.spacing), abs=1e-4)
    assert geometry["origin"] == pytest.approx(list(volume.origin), abs=1e-4)
    assert np.allclose(np.reshape(geometry["direction"], (3, 3)), volume.direction, atol=1e-5)


def test_open_a_dicom_folder(tmp_path, source):
    # DICOM frames are right-handed (the slice normal is row x column), so the test volume's frame is too
    volume = _rotated(Volume(source.array[:8, :64, :48], source.spacing))
    _write_dicom_series(volume, tmp_path / "series")
    assert get_reader(str(tmp_path / "series")) is not None
    [(data, meta, kind)] = read_layers(str(tmp_path / "series"))
    assert kind == "image" and data.shape == volume.shape
    assert meta["scale"] == pytest.approx(tuple(volume.spacing[::-1]), abs=1e-3)
    assert np.array_equal(data, volume.array.astype(np.int16))
    geometry = meta["metadata"]["geometry"]
    assert geometry["origin"] == pytest.approx(list(volume.origin), abs=1e-3)
    assert np.allclose(np.reshape(geometry["direction"], (3, 3)), volume.direction, atol=1e-4)


def test_labels_and_hdf5_and_unsupported(tmp_path, source):
    [(data, meta, kind)] = read_layers(str(LABEL))
    assert kind == "labels" and data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    import h5py

    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as handle:
        handle["image"] = source.array.astype(np.float32)
        handle["label"] = read_volume(LABEL).array
        handle["image"].attrs["spacing"] = source.spacing
    layers = read_layers(str(path))
    assert [k for _, _, k in layers] == ["image", "labels"]
    assert layers[0][1]["scale"] == pytest.approx(tuple(source.spacing[::-1]))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    assert get_reader(str(tmp_path / "photo.png")) is None
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "empty")) is None


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_writer_puts_labels_back_in_the_source_geometry(tmp_path, source, suffix):
    volume = _rotated(source)
    write_volume(volume, tmp_path / "scan.nii.gz")
    [(_, image_meta, _)] = read_layers(str(tmp_path / "scan.nii.gz"))
    label = np.zeros(source.shape, np.uint8)
    label[10:15, 40:90, 30:70] = 1
    attributes = {"name": "tumour", "scale": image_meta["scale"],
                  "metadata": {**image_meta["metadata"], "label_names": {0: "background", 1: "tumour"}}}
    [written] = write_labels(str(tmp_path / f"out{suffix}"), label, attributes)
    back = read_volume(written)
    _assert_same_geometry(volume, back)
    assert np.array_equal(back.array, label)
    if suffix == ".seg.nrrd":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(written)
        reader.ReadImageInformation()
        assert reader.GetMetaData("Segment0_Name") == "tumour"
        assert reader.GetMetaData("Segment0_LabelValue") == "1"


@pytest.mark.gui
def test_open_paint_and_save_through_napari(make_napari_viewer, tmp_path, source):
    """The user's path: File > Open an image, add a new Labels layer for it, paint, File > Save Selected Layer."""
    volume = _rotated(source)
    write_volume(volume, tmp_path / "scan.nii.gz")
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "scan.nii.gz"), plugin=PLUGIN)
    assert image._type_string == "image" and tuple(image.scale) == pytest.approx(source.spacing[::-1], abs=1e-4)
    labels = viewer.add_labels(np.zeros(source.shape, np.uint8), name="mask", scale=image.scale)
    assert "geometry" not in labels.metadata  # a plain layer: its geometry comes from the image it matches
    labels.paint((12, 80, 70), 1)
    out = tmp_path / "mask.nii.gz"
    viewer.layers.selection.active = labels
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert [Path(p) for p in written] == [out]
    back = read_volume(out)
    _assert_same_geometry(volume, back)
    assert np.array_equal(back.array, labels.data)
    [(data, meta, kind)] = read_layers(str(out))  # and it reopens over the image
    assert meta["scale"] == pytest.approx(tuple(image.scale), abs=1e-4)


@pytest.mark.gui
def test_sample_data_gives_image_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "brain_tissue")  # an image and its label per labeled case
    assert [layer._type_string for layer in layers] == ["image", "labels"] * (len(layers) // 2) and layers
    names = [layer.name for layer in layers[::2]]
    assert "mni152_t1" in names
    image, label = layers[2 * names.index("mni152_t1"):][:2]
    assert tuple(image.scale) == (2.0, 2.0, 2.0)
    assert label.data.dtype == np.uint8 and set(np.unique(label.data)) == {0, 1, 2}
    same = {k: v for k, v in image.metadata["geometry"].items() if k != "source"}
    assert {k: v for k, v in label.metadata["geometry"].items() if k != "source"} == same
    assert label.metadata["image_layer"] == image.name
    lesions = viewer.open_sample(PLUGIN, "lesions")
    assert tuple(lesions[0].scale) == pytest.approx((6.5, 0.78125, 0.78125))
