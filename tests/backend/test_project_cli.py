"""The project folder and the foundation CLI, through real subprocesses on the real sample data (issue 2)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from backend.project import Project
from backend.io.volume import read_volume, write_volume

from conftest import REPO, SAMPLE  # noqa: E402

BRAIN_IMAGE = SAMPLE / "lesions" / "imagesTr" / "radiomics_brain1_0000.nii.gz"
BRAIN_LABEL = SAMPLE / "lesions" / "labelsTr" / "radiomics_brain1.nii.gz"


def semiseg(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "backend.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def folder_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_help_lists_the_commands():
    out = semiseg("--help")
    assert out.returncode == 0
    for name in ("init", "cases", "accept", "sample"):
        assert name in out.stdout


def test_sample_then_cases_json(tmp_path):
    dest = tmp_path / "p"
    assert semiseg("sample", dest).returncode == 0
    out = semiseg("cases", dest, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["case"] for r in rows} == {"mni152_t1", "itk_kmeans_t1", "colin27_ch2", "colin27_ch2better"}
    by_case = {r["case"]: r for r in rows}
    assert by_case["mni152_t1"]["labeled"] is True and by_case["itk_kmeans_t1"]["labeled"] is True
    assert by_case["colin27_ch2"]["labeled"] is False and by_case["colin27_ch2better"]["labeled"] is False
    assert by_case["mni152_t1"]["shape"] == [94, 116, 98]  # [z, y, x] of the 98x116x94 (x, y, z) volume
    assert by_case["mni152_t1"]["spacing"] == [2.0, 2.0, 2.0]


def test_init_from_plain_folder_matches_labels_by_case_name(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    (images / "brain1_image.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    (images / "brain2.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    (labels / "brain1_label.nii.gz").write_bytes(BRAIN_LABEL.read_bytes())
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "tumour": 1}))
    out = semiseg("init", tmp_path / "proj", "--images", images, "--labels", labels,
                  "--labels-json", tmp_path / "labels.json")
    assert out.returncode == 0, out.stderr
    project = Project.open(tmp_path / "proj")
    assert project.labeled_cases() == ["brain1"] and project.unlabeled_cases() == ["brain2"]
    assert project.labels == {0: "background", 1: "tumour"}
    assert json.loads((tmp_path / "proj" / "dataset.json").read_text())["numTraining"] == 1


def test_init_from_decathlon_folder(tmp_path):
    out = semiseg("init", tmp_path / "proj", "--images", SAMPLE / "brain_tissue")
    assert out.returncode == 0, out.stderr
    project = Project.open(tmp_path / "proj")
    assert project.labels == {0: "background", 1: "GM", 2: "WM"}
    assert project.case_ids() == ["colin27_ch2", "colin27_ch2better", "itk_kmeans_t1", "mni152_t1"]
    assert project.labeled_cases() == ["itk_kmeans_t1", "mni152_t1"]
    assert project.modality == "MR"


def test_accept_records_history_and_grows_the_labeled_set(tmp_path):
    dest = tmp_path / "p"
    semiseg("sample", dest, "--task", "lesions")
    reference = SAMPLE / "reference" / "lesions" / "radiomics_lung2.nii.gz"
    out = semiseg("accept", dest, "radiomics_lung2", reference, "--source", "reference")
    assert out.returncode == 0, out.stderr
    project = Project.open(dest)
    assert project.labeled_cases() == ["radiomics_brain1", "radiomics_lung2"]
    (record,) = project.history("radiomics_lung2")
    assert record["source"] == "reference"
    ref = read_volume(reference).array
    assert record["voxels_per_class"]["tumour"] == int((ref == 1).sum())
    assert record["voxels_changed"] == ref.size  # no previous label: every voxel is new
    assert (project.semiseg / "history" / record["snapshot"]).is_file()
    # Accepting an edit records only the voxels that changed.
    edited = ref.copy()
    edited[0, 0, :5] = 1
    record2 = project.accept("radiomics_lung2", edited, source="manual")
    assert record2["voxels_changed"] == int((edited != ref).sum()) == 5
    assert len(project.history("radiomics_lung2")) == 2


# ---- bad input: exit code 2, one line naming the file, project unchanged --------------------------------
def _bad_label(kind: str, tmp: Path) -> Path:
    label = read_volume(BRAIN_LABEL)
    path = tmp / f"{kind}.nii.gz"
    if kind == "truncated":
        data = BRAIN_LABEL.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-a-volume":
        path.write_text("this is not an image")
    elif kind == "shape":
        write_volume(label.like(label.array)[:0] if False else type(label)(label.array[:, :, :-3], label.spacing,
                                                                           label.origin, label.direction), path)
    elif kind == "geometry":
        moved = label.like(label.array)
        moved.origin = (label.origin[0] + 5.0, label.origin[1], label.origin[2])
        write_volume(moved, path)
    elif kind == "out-of-range":
        array = label.array.copy()
        array[0, 0, 0] = 7
        write_volume(label.like(array), path)
    elif kind == "non-integer":
        array = label.array.astype(np.float32)
        array[0, 0, 0] = 0.5
        write_volume(label.like(array), path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "not-a-volume", "shape", "geometry", "out-of-range", "non-integer"])
def test_accept_bad_label_is_refused_and_nothing_changes(kind, tmp_path):
    dest = tmp_path / "p"
    semiseg("sample", dest, "--task", "lesions")
    before = folder_hash(dest)
    bad = _bad_label(kind, tmp_path)
    out = semiseg("accept", dest, "radiomics_brain1", bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], out.stderr
    assert folder_hash(dest) == before


def test_accept_case_name_leaving_the_project_is_refused(tmp_path):
    dest = tmp_path / "p"
    semiseg("sample", dest, "--task", "lesions")
    before = folder_hash(dest)
    out = semiseg("accept", dest, "../x", BRAIN_LABEL)
    assert out.returncode == 2 and "invalid case name '../x'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert folder_hash(dest) == before


def _bad_scan_folder(kind: str, tmp: Path) -> tuple[Path, Path]:
    """A folder of scans holding one bad file; returns the folder and the bad file."""
    folder = tmp / "scans"
    folder.mkdir()
    (folder / "good_case.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    image = read_volume(BRAIN_IMAGE)
    if kind == "nan":
        array = image.array.astype(np.float32)
        array[3, 4, 5] = np.nan
        bad = write_volume(image.like(array), folder / "nan_case.nii.gz")
    elif kind == "inf":
        array = image.array.astype(np.float32)
        array[3, 4, 5] = np.inf
        bad = write_volume(image.like(array), folder / "inf_case.nii.gz")
    elif kind == "2d":
        bad = folder / "flat_case.nii.gz"
        nib.save(nib.Nifti1Image(image.array[5].astype(np.int16), np.eye(4)), str(bad))
    elif kind == "truncated":
        bad = folder / "cut_case.nii.gz"
        bad.write_bytes(gzip.compress(gzip.decompress(BRAIN_IMAGE.read_bytes())[:5000]))
    elif kind == "duplicate":
        bad = folder / "good_case.nrrd"
        import SimpleITK as sitk

        sitk.WriteImage(image.to_sitk(), str(bad))
    elif kind == "existing-case":
        bad = folder / "radiomics_brain1.nii.gz"
        bad.write_bytes(BRAIN_IMAGE.read_bytes())
    else:
        raise AssertionError(kind)
    return folder, bad


@pytest.mark.parametrize("kind", ["nan", "inf", "2d", "truncated", "duplicate", "existing-case"])
def test_init_bad_scan_is_refused_and_project_unchanged(kind, tmp_path):
    dest = tmp_path / "p"
    semiseg("sample", dest, "--task", "lesions")
    before = folder_hash(dest)
    folder, bad = _bad_scan_folder(kind, tmp_path)
    out = semiseg("init", dest, "--images", folder)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and bad.name in lines[0], out.stderr
    assert folder_hash(dest) == before
    if kind == "existing-case":
        return  # only a duplicate of the existing project; a new project from this folder is fine
    # A new project from the same folder is not created either.
    out = semiseg("init", tmp_path / "new", "--images", folder)
    assert out.returncode == 2 and not (tmp_path / "new").exists()


def test_label_values_not_declared_in_dataset_json_are_refused_at_init(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    (images / "b1.nii.gz").write_bytes(BRAIN_IMAGE.read_bytes())
    label = read_volume(BRAIN_LABEL)
    array = label.array.copy()
    array[0, 0, 0] = 2
    write_volume(label.like(array), labels / "b1.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "tumour": 1}))
    out = semiseg("init", tmp_path / "proj", "--images", images, "--labels", labels,
                  "--labels-json", tmp_path / "labels.json")
    assert out.returncode == 2 and "b1.nii.gz" in out.stderr and "[2]" in out.stderr
    assert not (tmp_path / "proj").exists()


def test_backend_never_imports_qt_or_napari():
    """Statically (every import statement under backend/) and dynamically (importing every module)."""
    import ast

    forbidden = {"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy"}
    modules = []
    for path in sorted((REPO / "backend").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path} imports {name}"
        rel = path.relative_to(REPO).with_suffix("")
        if rel.name != "__main__":
            modules.append(".".join(p for p in rel.parts if p != "__init__"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(forbidden)!r})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
