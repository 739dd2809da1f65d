"""DICOM round trip on real volumes: a sample scan written as a DICOM series (SimpleITK's series writer) ->
``semiseg init`` -> accept -> ``semiseg export --format dicom-seg`` -> read back with highdicom: voxel-equal to the
accepted label on the source grid, the SEG SOP class, a reference to every source instance; oblique series and
shuffled file names included.  Bad input (missing slice, mixed series, SEG of another frame of reference) is one
line and changes nothing."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import SAMPLE
from helpers.dicom_series import write_dicom_series
from helpers.fault_cases import folder_hash, semiseg

from backend.dicom.refs import read_refs
from backend.dicom.seg import LABELMAP_SOP_CLASS, SEG_SOP_CLASS, case_seg
from backend.io.volume import Volume, read_volume
from backend.project import Project

MR = SAMPLE / "brain_tissue" / "imagesTr" / "mni152_t1_0000.nii.gz"
MR_LABEL = SAMPLE / "brain_tissue" / "labelsTr" / "mni152_t1.nii.gz"
CT = SAMPLE / "lesions" / "imagesTr" / "radiomics_lung2_0000.nii.gz"
CT_LABEL = SAMPLE / "reference" / "lesions" / "radiomics_lung2.nii.gz"
BRAIN_LABELS = {"background": 0, "GM": 1, "WM": 2}


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _shuffle_names(folder: Path, seed: int = 0) -> None:
    """Rename the slice files in a random order: the file order no longer tells the slice order."""
    files = sorted(folder.iterdir())
    names = [f"im{n:04d}.dcm" for n in range(len(files))]
    random.Random(seed).shuffle(names)
    for path, name in zip(files, names):
        path.rename(folder / f"tmp-{name}")
    for path in folder.iterdir():
        path.rename(folder / path.name[4:])


def _project(tmp: Path, volume: Volume, labels: dict, *, modality: str = "MR", shuffle: bool = False):
    scans = tmp / "scans"
    uids = write_dicom_series(volume, scans / "case1", modality=modality)
    if shuffle:
        _shuffle_names(scans / "case1")
    (tmp / "labels.json").write_text(json.dumps(labels))
    out = semiseg("init", tmp / "project", "--images", scans, "--labels-json", tmp / "labels.json",
                  "--modality", "CT" if modality == "CT" else "MR")
    assert out.returncode == 0, out.stderr
    return Project.open(tmp / "project"), scans / "case1", uids


def _check_seg(seg_path: Path, series_folder: Path, label: np.ndarray, project: Project, sop_class: str) -> None:
    """Read the SEG with highdicom alone and compare it with the accepted label, instance by instance."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == sop_class
    sources = {}
    for path in series_folder.iterdir():
        ds = pydicom.dcmread(path)
        sources[ds.SOPInstanceUID] = ds
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == set(sources), "the SEG must reference every source instance"
    first = next(iter(sources.values()))
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {first.SeriesInstanceUID}
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    order = sorted(sources, key=lambda uid: int(sources[uid].InstanceNumber))  # the writer numbered slice k k+1
    image = project.read_image("case1").array
    assert np.array_equal(np.stack([sources[uid].pixel_array for uid in order]), image), "the source grid"
    lut = np.zeros(256, dtype=np.uint8)  # project label value -> the SEG's segment number, matched by name
    value_of = {name: value for value, name in project.labels.items()}
    for number in seg.segment_numbers:
        lut[value_of[seg.get_segment_description(number).segment_label]] = number
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in first.PixelSpacing]  # row, column
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame where a viewer draws it: on its source slice
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
    frames = seg.get_pixels_by_source_instance(order, combine_segments=True, dtype=np.uint8)
    assert np.array_equal(frames, lut[label]) and label.any()


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    """The real MR scan written as a DICOM series and imported by ``semiseg init`` (once for the module)."""
    project, folder, _ = _project(tmp_path_factory.mktemp("mr"), read_volume(MR), BRAIN_LABELS)
    return project, folder


def test_real_mr_series_round_trips_through_binary_and_labelmap_seg(tmp_path, mr):
    project, folder = mr
    refs = read_refs(project, "case1")
    assert len(refs["instances"]) == 94 and refs["frame_of_reference_uid"]
    assert [i["file"] for i in refs["instances"]] == [f"slice_{k:04d}.dcm" for k in range(94)]
    label = read_volume(MR_LABEL).array.astype(np.uint8)
    label[40, 50:60, 50:60] = 1  # a reviewer's correction
    project.accept("case1", label, source="diffcl:cs", extra={"started_from": "diffcl:cs",
                                                              "runs": {"diffcl": "2-tiny"}, "voxels_edited": 87})
    for seg_type, sop_class in (("binary", SEG_SOP_CLASS), ("labelmap", LABELMAP_SOP_CLASS)):
        out = semiseg("export", project.root, tmp_path / seg_type, "--format", "dicom-seg", "--seg-type", seg_type)
        assert out.returncode == 0, out.stderr
        seg_path = tmp_path / seg_type / "case1.seg.dcm"
        assert out.stdout.split() == [str(seg_path)]
        _check_seg(seg_path, folder, label, project, sop_class)
        ds = pydicom.dcmread(seg_path)
        segments = [s for s in ds.SegmentSequence if s.SegmentNumber]  # a label map also declares 0, background
        assert [s.SegmentLabel for s in segments] == ["GM", "WM"]
        gm = segments[0]
        assert (gm.SegmentedPropertyTypeCodeSequence[0].CodeValue, gm.SegmentAlgorithmType) == \
            ("389081007", "SEMIAUTOMATIC")
        assert (gm.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName,
                gm.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion) == ("diffcl", "2-tiny")
        assert ds.StudyInstanceUID == refs["study_instance_uid"] and ds.PatientID == "SEMISEG1"


def test_oblique_series_with_shuffled_files_maps_back_exactly(tmp_path):
    z, y, x = 8, 32, 40  # a 24 x 96 x 96 crop of the real CT around its tumour, tilted 23 degrees
    crop = read_volume(CT).to_sitk()[x:x + 96, y:y + 96, z:z + 24]
    label = read_volume(CT_LABEL).array[z:z + 24, y:y + 96, x:x + 96].astype(np.uint8)
    oblique = Volume(sitk_array(crop), (0.75, 0.625, 5.0), (-101.25, 37.5, 12.125), _rotation((1, 2, 3), 23.0))
    project, folder, _ = _project(tmp_path, oblique, {"background": 0, "tumour": 1}, modality="CT", shuffle=True)
    assert project.read_image("case1").geometry_mismatch(oblique, tol=1e-3) is None
    project.accept("case1", label, source="manual")
    out = semiseg("export", project.root, tmp_path / "seg", "--format", "dicom-seg")
    assert out.returncode == 0, out.stderr
    _check_seg(tmp_path / "seg" / "case1.seg.dcm", folder, label, project, SEG_SOP_CLASS)
    seg = pydicom.dcmread(tmp_path / "seg" / "case1.seg.dcm")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    expected = np.concatenate([oblique.direction[:, 0], oblique.direction[:, 1]])
    assert np.allclose([float(v) for v in orientation], expected, atol=1e-6)
    # accept-seg reads it back onto the grid: the same label, voxel for voxel
    project.accept("case1", np.zeros_like(label), source="manual")
    out = semiseg("accept-seg", project.root, "case1", tmp_path / "seg" / "case1.seg.dcm")
    assert out.returncode == 0, out.stderr
    assert np.array_equal(project.read_label("case1").array, label)


def test_real_ct_pseudo_label_is_an_automatic_seg_with_configured_codes(tmp_path):
    project, folder, _ = _project(tmp_path, read_volume(CT), {"background": 0, "tumour": 1}, modality="CT")
    dataset = json.loads(project.dataset_path.read_text())
    dataset["dicom_segments"] = {"tumour": {"category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
                                            "type": ["4147007", "SCT", "Mass"]}}
    project.dataset_path.write_text(json.dumps(dataset))
    label = read_volume(CT_LABEL).array.astype(np.uint8)
    run = project.pseudo_dir("genericssl", "3-tiny")  # the files inference writes: a view per case + scores.json
    run.joinpath("case1").mkdir(parents=True)
    from backend.io.volume import write_volume

    write_volume(project.read_image("case1").like(label), run / "case1" / "combined.nii.gz")
    (run / "scores.json").write_text(json.dumps({"run": "3-tiny", "primary_view": "combined", "views": ["combined"],
                                                 "cases": {"case1": {}}}))
    out = semiseg("export", project.root, tmp_path / "seg", "--format", "dicom-seg", "--source", "genericssl")
    assert out.returncode == 0, out.stderr
    _check_seg(tmp_path / "seg" / "case1.seg.dcm", folder, label, Project.open(project.root), SEG_SOP_CLASS)
    segment = pydicom.dcmread(tmp_path / "seg" / "case1.seg.dcm").SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("genericssl", "3-tiny")
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Mass"


def test_synthetic_series_with_empty_slices_and_an_undrawn_label_round_trips(tmp_path):
    """A synthetic scan: non-square slices, unequal row and column spacing, a tilted grid, slices without any label
    (frames the SEG omits) and a declared label drawn nowhere; in-process (init_project, case_seg, accept_seg)."""
    from backend.dicom.seg import accept_seg
    from backend.dicom import sidecar_hook
    from backend.project.importer import init_project

    volume = Volume(np.random.default_rng(0).integers(0, 800, (9, 40, 25)).astype(np.int16), (0.9, 1.3, 3.0),
                    (10.0, -20.0, 5.0), _rotation((0, 1, 1), 12.0))
    write_dicom_series(volume, tmp_path / "scans" / "case1")
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "liver": 1, "lesion": 2, "CSF": 3}))
    project = init_project(tmp_path / "project", tmp_path / "scans", labels_json=tmp_path / "labels.json",
                           series_hook=sidecar_hook)
    label = np.zeros(volume.shape, np.uint8)
    label[2:5, 5:30, 3:10] = 1
    label[3, 10:12, 20:24] = 2
    project.accept("case1", label, source="manual")
    case_seg(project, "case1").save_as(tmp_path / "case1.seg.dcm")
    _check_seg(tmp_path / "case1.seg.dcm", tmp_path / "scans" / "case1", label, project, SEG_SOP_CLASS)
    seg = pydicom.dcmread(tmp_path / "case1.seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion", "CSF"]
    assert seg.NumberOfFrames == 4  # liver on slices 2-4, lesion on slice 3: the empty frames are left out
    project.accept("case1", np.zeros_like(label), source="manual")
    accept_seg(project, "case1", tmp_path / "case1.seg.dcm")
    assert np.array_equal(project.read_label("case1").array, label)


def test_series_with_a_missing_slice_is_refused_in_one_line(tmp_path):
    write_dicom_series(read_volume(MR), tmp_path / "scans" / "case1")
    (tmp_path / "scans" / "case1" / "slice_0040.dcm").unlink()
    out = semiseg("init", tmp_path / "project", "--images", tmp_path / "scans")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "case1" in out.stderr and "missing slice" in out.stderr
    assert not (tmp_path / "project").exists()


def test_mixed_series_in_one_folder_is_refused_in_one_line_and_changes_nothing(tmp_path, mr):
    project, _ = mr
    volume = read_volume(MR)
    write_dicom_series(volume, tmp_path / "scans" / "case2")
    write_dicom_series(Volume(volume.array[:30], volume.spacing, volume.origin), tmp_path / "other")
    for n, path in enumerate(sorted((tmp_path / "other").iterdir())):
        shutil.copy(path, tmp_path / "scans" / "case2" / f"other{n}.dcm")
    before = folder_hash(project.root)
    out = semiseg("init", project.root, "--images", tmp_path / "scans")  # adding a case to the project
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "mixed series: 2 DICOM series" in out.stderr and "case2" in out.stderr
    assert folder_hash(project.root) == before and Project.open(project.root).case_ids() == ["case1"]


def test_seg_of_another_frame_of_reference_is_refused_and_changes_nothing(tmp_path, mr):
    project, _ = mr
    label = read_volume(MR_LABEL).array.astype(np.uint8)
    project.accept("case1", label, source="manual")
    seg = case_seg(project, "case1")
    seg.FrameOfReferenceUID = pydicom.uid.generate_uid()  # the same pixels, placed in another patient space
    seg.save_as(tmp_path / "other.seg.dcm")
    project.accept("case1", np.zeros_like(label), source="manual")
    before = folder_hash(project.root)
    out = semiseg("accept-seg", project.root, "case1", tmp_path / "other.seg.dcm")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "SEG for a different frame of reference" in out.stderr
    assert folder_hash(project.root) == before and not project.read_label("case1").array.any()


def test_export_of_a_project_without_dicom_cases_is_one_line(tmp_path):
    shutil.copytree(SAMPLE / "lesions", tmp_path / "project")
    out = semiseg("export", tmp_path / "project", tmp_path / "seg", "--format", "dicom-seg")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "none of the 1 cases of 'labels' was imported from a DICOM series" in out.stderr
    assert not (tmp_path / "seg").exists()
