"""``semiseg init``: turn a folder of scans (plain, Decathlon or nnU-Net raw) into a project.

Every file is read and validated before anything is written, so a bad file leaves the project untouched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backend.errors import InputError
from backend.project import Project
from backend.project.checks import check_case_name, check_image, check_label, check_label_values, parse_labels
from backend.io.volume import H5_SUFFIXES, SUPPORTED_SUFFIXES, h5_has_key, read_volume, strip_suffix, suffix_of

IMAGE_TAGS = ("_0000", "_image", "_img")
LABEL_TAGS = ("_label", "_labels", "_seg", "_mask", "_gt")


@dataclass
class CaseSource:
    case: str
    image: Path
    label: Path | None = None
    label_key: str = "label"  # the HDF5 dataset that holds the label


def _case_name(path: Path, tags: tuple[str, ...]) -> str:
    stem = strip_suffix(path)
    for tag in tags:
        if stem.endswith(tag):
            return stem[: -len(tag)]
    return stem


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in (".dcm", "") and p.is_file() for p in path.iterdir())


def _scan_folder(folder: Path, tags: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("._") or path.name.startswith(".") and not path.is_file():
            continue  # macOS resource forks, hidden folders (.git, ...)
        if path.is_file() and suffix_of(path) in SUPPORTED_SUFFIXES or _is_dicom_folder(path):
            if path.name.startswith("."):
                raise InputError(path, "hidden file (its name starts with '.'); a case name starts with a letter "
                                       "or digit: rename the file or move it out of the folder")
            case = _case_name(path, tags)
            if case in found:
                raise InputError(path, f"duplicate case '{case}' (also {found[case].name})")
            found[case] = path
    return found


def discover(images: Path, labels: Path | None = None) -> tuple[list[CaseSource], dict | None]:
    """Pair images with labels by case name; returns the pairs and a ``dataset.json`` found on the way."""
    images = Path(images)
    if not images.is_dir():
        raise InputError(images, "not a folder")
    dataset = None
    if (images / "imagesTr").is_dir():  # a Decathlon or nnU-Net raw dataset folder
        if (images / "dataset.json").is_file():
            try:
                dataset = json.loads((images / "dataset.json").read_text())
            except ValueError as exc:
                raise InputError(images / "dataset.json", f"invalid JSON ({exc})") from exc
        labels = labels or (images / "labelsTr" if (images / "labelsTr").is_dir() else None)
        images = images / "imagesTr"
    image_files = _scan_folder(images, IMAGE_TAGS)
    if not image_files:
        raise InputError(images, "no images found (.nii, .nii.gz, .nrrd, .mha, .mhd, .h5 or DICOM folders)")
    label_files = _scan_folder(Path(labels), LABEL_TAGS) if labels else {}
    for case, path in label_files.items():
        if case not in image_files:
            raise InputError(path, f"label for case '{case}' has no image")
    sources = []
    for case, path in image_files.items():
        check_case_name(case, path)
        label = label_files.get(case)
        if label is None and suffix_of(path) in H5_SUFFIXES and _h5_has_label(path):
            label = path
        sources.append(CaseSource(case, path, label))
    return sources, dataset


def _h5_has_label(path: Path) -> bool:
    try:
        return h5_has_key(path, "label")
    except Exception as exc:  # h5py's errors for a file that is not HDF5 (or a truncated one)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read ({first[:200]})") from exc


def _infer_labels(sources: list[CaseSource]) -> dict[int, str]:
    """Label names from the values found in the labels (``label_<v>``), when no JSON declares them."""
    import numpy as np

    values: set[int] = {0}
    for source in sources:
        if source.label is not None:
            array = read_volume(source.label, key=source.label_key).array
            if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0)):
                raise InputError(source.label, "label holds non-integer values")
            found = np.unique(array)
            check_label_values([int(v) for v in found], source.label)
            values.update(int(v) for v in found)
    if values == {0}:  # no label seen: a single foreground class until the user says otherwise
        values.add(1)
    return {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}


def init_project(root: str | Path, images: str | Path, labels: str | Path | None = None,
                 labels_json: str | Path | None = None, modality: str | None = None,
                 series_hook: Callable[[Path, Any], Callable[[Project, str], Any]] | None = None) -> Project:
    """Create (or extend) the project at ``root`` from a folder of scans; see module docstring.

    ``series_hook(folder, image)`` runs in pass 1 for every DICOM series folder (it may refuse the series with an
    InputError before anything is written); what it returns runs in pass 2 as ``write(project, case)`` once the case
    is added.  The CLI and the PACS pull pass :func:`backend.dicom.sidecar_hook` (the source-reference sidecar; this
    floor does not import backend.dicom)."""
    root = Path(root)
    sources, dataset = discover(Path(images), Path(labels) if labels else None)
    if labels_json:
        try:
            label_map = parse_labels(json.loads(Path(labels_json).read_text()))
        except (ValueError, OSError) as exc:
            raise InputError(labels_json, f"invalid label JSON ({exc})") from exc
    elif dataset and "labels" in dataset:
        label_map = parse_labels(dataset["labels"])
    else:
        label_map = None
    if modality is None and dataset:
        channels = dataset.get("channel_names") or dataset.get("modality") or {}
        modality = str(channels.get("0", "MR"))
    existing = Project.open(root) if (root / "dataset.json").is_file() else None
    if existing:
        label_map = existing.labels
        for source in sources:
            if source.case in existing.case_ids():
                raise InputError(source.image, f"duplicate case '{source.case}': the project already has it")
    label_map = label_map or _infer_labels(sources)

    # Pass 1: read and validate everything; nothing is written yet.
    after_add: dict[str, Callable[[Project, str], Any]] = {}
    for source in sources:
        image = read_volume(source.image)
        check_image(image, source.image)
        if series_hook is not None and source.image.is_dir():
            after_add[source.case] = series_hook(source.image, image)
        if source.label is not None:
            check_label(read_volume(source.label, key=source.label_key), image, label_map, source.label)

    # Pass 2: write.
    project = existing or Project.create(root, labels=label_map, modality=modality or "MR",
                                         name=(dataset or {}).get("name"))
    for source in sources:
        image = read_volume(source.image)
        label = read_volume(source.label, key=source.label_key) if source.label is not None else None
        project.add_case(source.case, image, label, source=source.image)
        if source.case in after_add:
            after_add[source.case](project, source.case)
    return project
