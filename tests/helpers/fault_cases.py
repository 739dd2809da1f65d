"""Shared by tests/test_faults.py and bench/faults.py: the real-data project the fault experiments damage, the
check that a project came through intact, and the table of malformed inputs (issue 14).

Every malformed input is built from the real sample data (a real scan or label, changed in the one way the row
names) and handed to the real ``semiseg`` entry point; each row says the exit code and the message expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from backend.project import Project
from backend.io.volume import Volume, read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"
LESIONS = SAMPLE / "lesions"
BRAIN_IMAGE = LESIONS / "imagesTr" / "radiomics_brain1_0000.nii.gz"
BRAIN_LABEL = LESIONS / "labelsTr" / "radiomics_brain1.nii.gz"
LUNG_REFERENCE = SAMPLE / "reference" / "lesions" / "radiomics_lung2.nii.gz"
CASE = "radiomics_lung2"  # the unlabeled case of the lesions sample project that the experiments accept


def semiseg(*args: str | Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a child process."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "backend.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def folder_hash(root: Path) -> str:
    """Names and bytes of every file under ``root`` (not folders, nor the lock file: taking the lock creates it
    and the project's temp folder)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name == "project.lock" or not path.is_file():
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def lesion_project(dest: Path) -> Project:
    """A copy of the real lesions sample project (two real scans, one labeled)."""
    from backend.project.sample import copy_sample

    return copy_sample(dest, "lesions")


def reference_label(edit: int = 0) -> np.ndarray:
    """The real reference label of ``CASE``, with ``edit`` voxels of a corner flipped (a distinct correction)."""
    array = read_volume(LUNG_REFERENCE).array.astype(np.uint8)
    if edit:
        flat = array.reshape(-1)
        flat[:edit] = 1 - flat[:edit]
    return array


def label_state(project: Project, case: str) -> np.ndarray | None:
    label = project.read_label(case)
    return None if label is None else label.array


def check_intact(root: Path, case: str, old: np.ndarray | None, new: np.ndarray, old_records: int) -> str:
    """After a fault: open the project (recovery runs) and say which state it is in.

    ``"old"`` (rolled back: the label and history as before), ``"new"`` (completed: the new label, one more
    history record whose snapshot holds its bytes), or a description of what is lost or corrupted.
    """
    try:
        project = Project.open(root)
        problems = project.verify()
        label = label_state(project, case)
        records = len(project.history(case))
    except Exception as exc:  # noqa: BLE001 - anything here is a corrupted project
        return f"corrupted: {type(exc).__name__}: {exc}"
    if problems:
        return "corrupted: " + "; ".join(problems)
    if label is not None and np.array_equal(label, new) and records == old_records + 1:
        return "new"
    if (label is None and old is None or label is not None and old is not None and np.array_equal(label, old)) \
            and records == old_records:
        return "old"
    return f"lost: label matches neither state (history {records} records, was {old_records})"


# ---- the table of malformed inputs ------------------------------------------------------------------------------
@dataclass
class Malformed:
    """One malformed input: ``build(tmp)`` writes it and returns the command's arguments and the project folder
    that must stay unchanged (None for ``init``, whose project must not come to exist)."""

    name: str
    build: Callable[[Path], tuple[list[str], Path | None]]
    code: int
    message: str  # a regular expression the single stderr line must match


def _image() -> Volume:
    return read_volume(BRAIN_IMAGE)


def _label() -> Volume:
    return read_volume(BRAIN_LABEL)


def _scans(tmp: Path, *, image: Volume | None = None, label: Volume | None = None, image_name: str = "case1",
           label_name: str = "case1") -> tuple[Path, Path]:
    images, labels = tmp / "scans", tmp / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    write_volume(image or _image(), images / f"{image_name}_0000.nii.gz")
    if label is not None:
        write_volume(label, labels / f"{label_name}.nii.gz")
    return images, labels


def _init(tmp: Path, **kwargs) -> tuple[list[str], None]:
    images, labels = _scans(tmp, **kwargs)
    return ["init", str(tmp / "project"), "--images", str(images), "--labels", str(labels)], None


def _with_label_array(values: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        label = _label()
        array = values(label.array) if callable(values) else values
        return _init(tmp, label=label.like(array))
    return build


def _set_voxel(dtype, value) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        out = array.astype(dtype)
        out[0, 0, 0] = value
        return out
    return change


def _negative_labels(array: np.ndarray) -> np.ndarray:
    return -(array.astype(np.int16))  # {0, -1}: the label of issue 14's first defect


def _raw_file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        images = tmp / "scans"
        images.mkdir(parents=True)
        (images / name).write_bytes(data() if callable(data) else data)
        return ["init", str(tmp / "project"), "--images", str(images)], None
    return build


def _nifti_array(array: np.ndarray) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        import nibabel as nib

        images = tmp / "scans"
        images.mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(images / "case1_0000.nii.gz"))
        return ["init", str(tmp / "project"), "--images", str(images)], None
    return build


ZERO_SPACING_NRRD = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspacings: 1 0 1\nencoding: raw\n"
                     b"endian: little\n\n" + bytes(128))


def _truncated() -> bytes:
    data = BRAIN_IMAGE.read_bytes()
    return data[: len(data) // 2]


def _nan_image(tmp: Path):
    image = _image()
    array = image.array.astype(np.float32)
    array[3, 3, 3] = np.nan
    return _init(tmp, image=image.like(array))


def _shape_mismatch(tmp: Path):
    label = _label()
    return _init(tmp, label=Volume(label.array[:, :, :-3].copy(), label.spacing, label.origin, label.direction))


def _moved_label(tmp: Path):
    label = _label()
    moved = label.like(label.array)
    moved.origin = (label.origin[0] + 5.0, label.origin[1], label.origin[2])
    return _init(tmp, label=moved)


def _orphan_label(tmp: Path):
    return _init(tmp, label=_label(), label_name="case2")


def _hidden_image(tmp: Path):
    images = tmp / "scans"
    images.mkdir(parents=True)
    shutil.copyfile(BRAIN_IMAGE, images / "..x_0000.nii.gz")
    return ["init", str(tmp / "project"), "--images", str(images)], None


def _bad_case_name(tmp: Path):
    images = tmp / "scans"
    images.mkdir(parents=True)
    shutil.copyfile(BRAIN_IMAGE, images / "a b_0000.nii.gz")
    return ["init", str(tmp / "project"), "--images", str(images)], None


def _duplicate_case(tmp: Path):
    images = tmp / "scans"
    images.mkdir(parents=True)
    shutil.copyfile(BRAIN_IMAGE, images / "case1.nii.gz")
    shutil.copyfile(BRAIN_IMAGE, images / "case1_0000.nii.gz")
    return ["init", str(tmp / "project"), "--images", str(images)], None


def _empty_folder(tmp: Path):
    (tmp / "scans").mkdir()
    (tmp / "scans" / "notes.txt").write_text("no scans here")
    return ["init", str(tmp / "project"), "--images", str(tmp / "scans")], None


def _not_a_folder(tmp: Path):
    return ["init", str(tmp / "project"), "--images", str(BRAIN_IMAGE)], None


def _labels_json(text: str) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        argv, _ = _init(tmp)
        (tmp / "labels.json").write_text(text)
        return argv + ["--labels-json", str(tmp / "labels.json")], None
    return build


def _decathlon_bad_json(tmp: Path):
    root = tmp / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copyfile(BRAIN_IMAGE, root / "imagesTr" / "case1_0000.nii.gz")
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    return ["init", str(tmp / "project"), "--images", str(root)], None


def _dicom_missing_slice(tmp: Path):
    folder = tmp / "scans" / "case1"
    write_dicom_series(folder, slices=10, spacing=1.5)
    (folder / "slice004.dcm").unlink()
    return ["init", str(tmp / "project"), "--images", str(tmp / "scans")], None


def write_dicom_series(folder: Path, *, slices: int, spacing: float) -> None:
    """A real multi-slice DICOM series (slices of the real MR scan) with per-slice position tags."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE / "brain_tissue" / "imagesTr" / "mni152_t1_0000.nii.gz"))
    image = sitk.Cast(image[:, :, 40:40 + slices], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, spacing))
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [
            ("0008|0060", "MR"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.777"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.7"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0032", "\\".join(f"{p:.6f}" for p in position)), ("0020|0013", str(k + 1)),
            ("0018|0050", f"{spacing:.6f}"), ("0028|0030", "1\\1"),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.7.{k + 1}"),
        ]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


# -- commands on an existing project (the lesions sample; radiomics_lung2 unlabeled) --
def _project(tmp: Path) -> Project:
    return lesion_project(tmp / "project")


def _accept_array(change: Callable[[np.ndarray], np.ndarray], *, case: str = CASE) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        reference = read_volume(LUNG_REFERENCE)
        path = tmp / "edited.nii.gz"
        write_volume(reference.like(change(reference.array)), path)
        return ["accept", str(project.root), case, str(path)], project.root
    return build


def _accept_moved(tmp: Path):
    project = _project(tmp)
    reference = read_volume(LUNG_REFERENCE)
    moved = reference.like(reference.array)
    moved.origin = (reference.origin[0] + 2.5, reference.origin[1], reference.origin[2])
    write_volume(moved, tmp / "moved.nii.gz")
    return ["accept", str(project.root), CASE, str(tmp / "moved.nii.gz")], project.root


def _accept_case(case: str) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        return ["accept", str(project.root), case, str(LUNG_REFERENCE)], project.root
    return build


def _corrupt_history(tmp: Path):
    project = _project(tmp)
    project.accept(CASE, read_volume(LUNG_REFERENCE).array.astype(np.uint8), source="first")
    with open(project.history_path(CASE), "a") as handle:
        handle.write('{"time": "2026-12-0')  # a torn last line
    return ["accept", str(project.root), CASE, str(LUNG_REFERENCE)], project.root


def _edit_dataset(change: Callable[[dict], dict | str]) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        result = change(json.loads(project.dataset_path.read_text()))
        project.dataset_path.write_text(result if isinstance(result, str) else json.dumps(result))
        return ["cases", str(project.root)], project.root
    return build


def _negative_declared(dataset: dict) -> dict:
    dataset["labels"]["label_-1"] = -1  # what init wrote before issue 14's fix
    return dataset


def _scores(text: str, command: str = "cases") -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        folder = project.pseudo_dir("supervised", "20261201-000000")
        folder.mkdir(parents=True)
        (folder / "scores.json").write_text(text)
        if command == "cases":
            return ["cases", str(project.root)], project.root
        return ["export", str(project.root), str(tmp / "out"), "--source", "supervised"], project.root
    return build


def _journal(text: str) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        project.tmp_dir.mkdir(parents=True, exist_ok=True)
        (project.tmp_dir / "accept.journal.json").write_text(text)
        return ["cases", str(project.root)], project.root
    return build


def _hand_edited_label(tmp: Path):
    project = _project(tmp)
    label = read_volume(project.label_path("radiomics_brain1"))
    array = label.array.astype(np.int16)
    array[0, 0, 0] = -1
    write_volume(label.like(array), project.label_path("radiomics_brain1"))  # edited by hand, outside semiseg
    return ["export", str(project.root), str(tmp / "out")], project.root


def _job_spec(text: str) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        job = project.jobs_dir / "20261201-000000-train-abcd"
        job.mkdir(parents=True)
        (job / "spec.json").write_text(text)
        (job / "events.jsonl").write_text("")
        return ["wait", str(project.root), job.name, "--timeout", "1"], project.root
    return build


def _engine(command: str, *extra: str) -> Callable[[Path], tuple]:
    def build(tmp: Path):
        project = _project(tmp)
        return [command, str(project.root), "--method", "supervised", "--device", "cpu", *extra], project.root
    return build


MALFORMED: list[Malformed] = [
    # init: labels
    Malformed("init-negative-label", _with_label_array(_negative_labels), 2,
              r"label values must be integers 0\.\.255; found -1"),
    Malformed("init-label-300", _with_label_array(_set_voxel(np.int16, 300)), 2, r"0\.\.255; found 300"),
    Malformed("init-label-fraction", _with_label_array(_set_voxel(np.float32, 0.5)), 2, "non-integer"),
    Malformed("init-label-nan", _with_label_array(_set_voxel(np.float32, np.nan)), 2, "non-integer"),
    Malformed("init-label-shape", _shape_mismatch, 2, r"label does not match its image: shape"),
    Malformed("init-label-moved", _moved_label, 2, r"origin \(-?[\d.]+, -?[\d.]+, -?[\d.]+\) differs"),
    Malformed("init-label-without-image", _orphan_label, 2, r"case2.nii.gz: label for case 'case2' has no image"),
    # init: images
    Malformed("init-truncated", _raw_file("case1_0000.nii.gz", _truncated), 2, r"case1_0000.nii.gz: cannot read"),
    Malformed("init-not-an-image", _raw_file("case1_0000.nii.gz", b"not an image"), 2,
              r"case1_0000.nii.gz: cannot read"),
    Malformed("init-empty-file", _raw_file("case1_0000.nii.gz", b""), 2, r"case1_0000.nii.gz: cannot read"),
    Malformed("init-unsupported-h5", _raw_file("case1.h5", b"\x89HDF\r\n\x1a\n"), 2, r"case1.h5: cannot read"),
    Malformed("init-2d", _nifti_array(np.zeros((20, 30), np.int16)), 2, r"2D image of shape"),
    Malformed("init-4d", _nifti_array(np.zeros((8, 8, 8, 2), np.int16)), 2, r"4D image of shape"),
    Malformed("init-nrrd-zero-spacing", _raw_file("case1_0000.nrrd", ZERO_SPACING_NRRD), 2,
              r"case1_0000.nrrd: cannot read"),
    Malformed("init-nan-intensity", _nan_image, 2, r"NaN or infinite"),
    Malformed("init-hidden-name", _hidden_image, 2, r"\.\.x_0000\.nii\.gz: hidden file"),
    Malformed("init-case-name", _bad_case_name, 2, r"invalid case name 'a b'"),
    Malformed("init-duplicate-case", _duplicate_case, 2, r"duplicate case 'case1'"),
    Malformed("init-no-images", _empty_folder, 2, r"no images found"),
    Malformed("init-images-not-a-folder", _not_a_folder, 2, r"not a folder"),
    Malformed("init-dicom-missing-slice", _dicom_missing_slice, 2,
              r"non-uniform slice spacing: slices 4 and 5 are 3 mm apart"),
    Malformed("init-decathlon-bad-json", _decathlon_bad_json, 2, r"dataset.json: invalid JSON"),
    # init: label names
    Malformed("labels-json-not-json", _labels_json("{background: 0"), 2, r"invalid label JSON"),
    Malformed("labels-json-negative", _labels_json('{"background": 0, "x": -1}'), 2, r"0\.\.255.*-1"),
    Malformed("labels-json-256", _labels_json('{"background": 0, "x": 256}'), 2, r"0\.\.255.*256"),
    Malformed("labels-json-no-background", _labels_json('{"x": 1}'), 2, r"must declare 0"),
    # accept
    Malformed("accept-negative", _accept_array(lambda a: -(a.astype(np.int16))), 2, r"found -1"),
    Malformed("accept-undeclared-value", _accept_array(_set_voxel(np.uint8, 7)), 2, r"values \[7\] are not declared"),
    Malformed("accept-fraction", _accept_array(_set_voxel(np.float32, 0.25)), 2, r"non-integer"),
    Malformed("accept-moved", _accept_moved, 2, r"origin \(-?[\d.]+, -?[\d.]+, -?[\d.]+\) differs"),
    Malformed("accept-unknown-case", _accept_case("no_such_case"), 2, r"no case 'no_such_case'"),
    Malformed("accept-escaping-case", _accept_case("../x"), 2, r"invalid case name '\.\./x'"),
    Malformed("accept-corrupt-history", _corrupt_history, 2, r"corrupt history: line 2"),
    # project files
    Malformed("dataset-json-corrupt", _edit_dataset(lambda d: '{"labels": '), 2, r"dataset.json: corrupt dataset.json"),
    Malformed("dataset-json-negative-label", _edit_dataset(_negative_declared), 2, r"0\.\.255.*-1"),
    Malformed("dataset-json-no-labels", _edit_dataset(lambda d: {k: v for k, v in d.items() if k != "labels"}), 2,
              r"invalid dataset.json"),
    Malformed("scores-json-corrupt", _scores("{\"cases\": {"), 2, r"scores.json: corrupt scores.json"),
    Malformed("scores-json-not-a-table", _scores('{"cases": [1, 2]}'), 2, r"corrupt scores.json"),
    Malformed("export-scores-json-corrupt", _scores("[", "export"), 2, r"corrupt scores.json"),
    Malformed("export-hand-edited-label", _hand_edited_label, 2, r"radiomics_brain1.nii.gz: label values must be"),
    Malformed("journal-corrupt", _journal("{\"tx\": "), 2, r"accept.journal.json: corrupt accept journal"),
    Malformed("journal-escaping-case", _journal('{"tx": "t", "case": "../x", "files": {}, "snapshot": "x"}'), 2,
              r"invalid case name '\.\./x'"),
    Malformed("spec-json-corrupt", _job_spec("{\"kind\": "), 2, r"spec.json: corrupt spec.json"),
    # engine: run names (foreground commands create no folder outside the project)
    Malformed("train-run-escapes", _engine("train", "--preset", "tiny", "--run", "../../x"), 2,
              r"invalid run name '\.\./\.\./x'"),
    Malformed("infer-run-escapes", _engine("infer", "--run", "../../x"), 2, r"invalid run name '\.\./\.\./x'"),
]


def fill_disk(mount: Path, leave: int) -> Path:
    """Fill the file system up to ``leave`` free bytes with a filler file; returns it."""
    filler = mount / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler
