"""The DICOM source references of an imported series: a sidecar ``semiseg/dicom/<case>.json``.

A project stores every image as NIfTI; a label exported back to a PACS must name the DICOM instances it was drawn
on.  On import (:func:`series_refs`, called from :mod:`backend.project.importer` through its hook) every file of the
series folder is read (header only, pydicom) and each instance is placed on the volume's slice grid by its Image
Position (Patient) along the slice normal, so the sidecar lists the SOP Instance UIDs in the project's slice order
``k = 0 .. depth-1`` whatever the file names or the order of the files, oblique series included.  It also keeps
the Study / Series / Frame of Reference UIDs, the orientation, every position and the patient/study attributes a
Segmentation object copies from its source (the pixel data stays in the project's NIfTI).

A folder holding more than one series, instances whose orientation or size differ from the volume's, or positions
that fall between slices are refused here with one line, before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError
from backend.io.atomic import read_json, write_json_atomic
from backend.io.volume import Volume, format_mm

FORMAT = "semiseg-dicom-refs"
VERSION = 1
POSITION_TOLERANCE = 0.01  # of the slice distance (as backend.io.volume's gap check)
ORIENTATION_TOLERANCE = 1e-4

# Attributes a derived object (SEG) copies from its source: patient, study, series, equipment-free image module.
HEADER_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "IssuerOfPatientID",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber",
    "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "BodyPartExamined", "Rows", "Columns", "PixelSpacing", "SliceThickness",
    "ImageOrientationPatient", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation",
)


def refs_path(project, case: str) -> Path:
    """``<project>/semiseg/dicom/<case>.json``."""
    return Path(project.semiseg) / "dicom" / f"{case}.json"


def _headers(folder: Path) -> list[tuple[Path, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError):
            continue  # not a DICOM file (a README, a DICOMDIR's companions): SimpleITK skips it too
        if "SOPInstanceUID" in ds:
            found.append((path, ds))
    return found


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.array([])
    if array.size != count:
        raise InputError(path, f"no valid {keyword} ({value!r}); the series cannot be mapped to slices")
    return array


def series_refs(folder: str | Path, volume: Volume) -> dict[str, Any]:
    """The sidecar of the DICOM series in ``folder`` that was read as ``volume`` (see module docstring)."""
    folder = Path(folder)
    headers = _headers(folder)
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise InputError(folder, f"mixed series: {len(series)} DICOM series in one folder ({', '.join(series[:3])}"
                                 f"{', ...' if len(series) > 3 else ''}); put each series in its own folder")
    depth, rows, columns = volume.shape
    if len(headers) != depth:
        raise InputError(folder, f"{len(headers)} DICOM instances for {depth} slices (a missing or extra file?)")
    direction = np.asarray(volume.direction, dtype=np.float64)
    origin = np.asarray(volume.origin, dtype=np.float64)
    step = float(volume.spacing[2])
    slots: list[dict[str, Any] | None] = [None] * depth
    for path, ds in headers:
        orientation = _floats(ds, "ImageOrientationPatient", 6, path)
        if not np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=ORIENTATION_TOLERANCE):
            raise InputError(path, f"orientation {format_mm(orientation)} differs from the series' (mixed series?)")
        if (int(ds.get("Rows", rows)), int(ds.get("Columns", columns))) != (rows, columns):
            raise InputError(path, f"{ds.Rows}x{ds.Columns} pixels differ from the series' {rows}x{columns}")
        position = _floats(ds, "ImagePositionPatient", 3, path)
        offset = np.linalg.solve(direction @ np.diag(volume.spacing), position - origin)  # (i, j, k) of the corner
        k = int(round(offset[2]))
        if np.any(np.abs(offset[:2]) > POSITION_TOLERANCE) or abs(offset[2] - k) > POSITION_TOLERANCE \
                or not 0 <= k < depth:
            raise InputError(path, f"position {format_mm(position)} is not on the series' slice grid "
                                   f"({step:g} mm slices from {format_mm(origin)})")
        if slots[k] is not None:
            raise InputError(path, f"two instances at slice {k + 1} (also {slots[k]['file']})")
        slots[k] = {"sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.get("SOPClassUID", "")),
                    "position": [float(v) for v in position], "instance_number": int(ds.get("InstanceNumber") or k + 1),
                    "file": path.name}
    first = headers[0][1]
    header = {}
    for keyword in HEADER_KEYWORDS:
        if keyword in first and first[keyword].value not in (None, ""):
            element = first[keyword]
            header[keyword] = element.to_json_dict(None, 0)
    return {
        "format": FORMAT, "version": VERSION, "source": str(folder),
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "series_instance_uid": series[0],
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "modality": str(first.get("Modality", "")),
        "orientation": [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])],
        "shape": [depth, rows, columns], "spacing": list(volume.spacing), "origin": list(volume.origin),
        "direction": direction.tolist(),
        "instances": slots,
        "header": header,
    }


def write_refs(project, case: str, refs: dict[str, Any]) -> Path:
    """Write the sidecar of ``case`` atomically; returns its path."""
    path = refs_path(project, case)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, refs)
    return path


def read_refs(project, case: str, *, required: bool = True) -> dict[str, Any] | None:
    """The sidecar of ``case``; ``None`` (or, when ``required``, an :class:`InputError`) when there is none."""
    path = refs_path(project, case)
    if not path.is_file():
        if required:
            raise InputError(project.image_path(case), f"case '{case}' was not imported from a DICOM series "
                                                       f"(no source references in {path})")
        return None
    refs = read_json(path, "DICOM references")
    if not isinstance(refs, dict) or refs.get("format") != FORMAT or not isinstance(refs.get("instances"), list):
        raise InputError(path, "corrupt DICOM references (not a semiseg-dicom-refs sidecar)")
    return refs


def check_geometry(refs: dict[str, Any], image: Volume, where: str | Path, tol: float = 1e-3) -> None:
    """Refuse when the project's image no longer has the grid the sidecar was recorded on."""
    reference = Volume(np.broadcast_to(np.uint8(0), tuple(refs["shape"])), refs["spacing"], refs["origin"],
                       np.asarray(refs["direction"]))
    mismatch = reference.geometry_mismatch(image, tol=tol)
    if mismatch:
        raise InputError(where, f"the image no longer matches its DICOM source series: {mismatch}")


def source_datasets(refs: dict[str, Any]) -> list:
    """One header-only pydicom dataset per source instance, in slice order (what highdicom reads from a source)."""
    from pydicom import Dataset

    base = Dataset.from_json({refs_keyword_tag(k): v for k, v in refs["header"].items()})
    datasets = []
    for item in refs["instances"]:
        ds = Dataset()
        ds.update(base)
        ds.SOPClassUID = item["sop_class_uid"]
        ds.SOPInstanceUID = item["sop_instance_uid"]
        ds.StudyInstanceUID = refs["study_instance_uid"]
        ds.SeriesInstanceUID = refs["series_instance_uid"]
        ds.FrameOfReferenceUID = refs["frame_of_reference_uid"]
        ds.Modality = refs["modality"] or "OT"
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in refs["orientation"]]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in item["position"]]
        ds.InstanceNumber = item["instance_number"]
        ds.Rows, ds.Columns = refs["shape"][1], refs["shape"][2]
        ds.PixelSpacing = [f"{refs['spacing'][1]:.10g}", f"{refs['spacing'][0]:.10g}"]  # row, column spacing
        if "SliceThickness" not in ds:
            ds.SliceThickness = f"{refs['spacing'][2]:.10g}"
        datasets.append(ds)
    return datasets


def refs_keyword_tag(keyword: str) -> str:
    """``"PatientID"`` -> ``"00100020"`` (DICOM JSON is keyed by tag)."""
    from pydicom.datadict import tag_for_keyword

    return f"{tag_for_keyword(keyword):08X}"
