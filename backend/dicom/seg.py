"""DICOM Segmentation (SEG) objects of a project's labels, written and read with highdicom.

One SEG per case, on the grid of the case's source series (no resampling: the project image *is* that grid, see
:mod:`backend.dicom.refs`): frame ``k`` of the label goes to the source instance at slice ``k``, and the SEG
references every instance of the series.  Segment ``n`` (1, 2, ...) is the ``n``-th declared foreground label of
the project, named after it, with the coded concepts and algorithm of :mod:`backend.dicom.codes`.  The binary SEG
type is the default; ``seg_type="labelmap"`` writes the label-map type (DICOM 2024, one frame holds every segment).

:func:`read_seg` maps a SEG back onto a case's grid (refusing one for another frame of reference or series);
:func:`accept_seg` makes it the case's accepted label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend.dicom.codes import algorithm, label_algorithm, segment_codes
from backend.dicom.refs import check_geometry, read_refs, source_datasets
from backend.errors import InputError
from backend.io.volume import read_volume
from backend.project import Project
from backend.project.checks import check_label
from backend.project.runs import methods_with_pseudo_labels, pseudo_runs
from backend.review.colors import label_color
from backend.review.export import label_sources, primary_view

SEG_TYPES = ("binary", "labelmap")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SERIES_NUMBER = 900


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-semiseg")
    except Exception:  # an uninstalled checkout
        return "0"


def segments(project: Project) -> list[tuple[int, int, str]]:
    """``[(segment number, label value, name)]`` of every declared foreground label, numbered from 1."""
    return [(n, v, name) for n, (v, name) in enumerate(((v, nm) for v, nm in sorted(project.labels.items()) if v), 1)]


def pseudo_label_files(project: Project, method: str, run: str | None) -> tuple[dict[str, Path], str, str]:
    """``({case: primary-view file}, run, view)`` of a method's inference run (the latest when ``run`` is None),
    exactly the files ``semiseg export --source METHOD`` writes."""
    items, _ = label_sources(project, method, run)  # refuses a missing run in one line
    run = run or pseudo_runs(project, method)[-1]
    return dict(items), run, primary_view(project, method, run, project.scores(method, run))


def build_seg(project: Project, case: str, label: np.ndarray, *, kind: str = "MANUAL", method: str | None = None,
              run: str | None = None, parameters: dict[str, str] | None = None, seg_type: str = "binary",
              description: str = "", creator: str | None = None):
    """A ``highdicom.seg.Segmentation`` of ``label`` (``[z, y, x]`` project values on the case's grid)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    if seg_type not in SEG_TYPES:
        raise InputError(None, f"unknown SEG type '{seg_type}' (types: {', '.join(SEG_TYPES)})")
    refs = read_refs(project, case)
    where = project.image_path(case)
    if not refs.get("frame_of_reference_uid"):
        raise InputError(refs.get("source", where), "the source series has no Frame of Reference UID; a SEG cannot "
                                                    "be placed on it")
    check_geometry(refs, project.image_geometry(case), where)
    if tuple(label.shape) != tuple(refs["shape"]):
        raise InputError(where, f"label shape {label.shape} differs from the series' {tuple(refs['shape'])}")
    table = segments(project)
    numbers = np.zeros(256, dtype=np.uint8)
    for number, value, _ in table:
        numbers[value] = number
    pixels = numbers[np.asarray(label, dtype=np.uint8)]
    algorithm_type, ident = algorithm(kind, method, run, parameters)
    descriptions = []
    for number, value, name in table:
        category, prop = segment_codes(project, name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=algorithm_type, algorithm_identification=ident,
            tracking_uid=generate_uid(), tracking_id=f"{case}:{name}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*label_color(value))))
    return hd.seg.Segmentation(
        source_images=source_datasets(refs), pixel_array=pixels,
        segmentation_type=seg_type.upper(), segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="napari-semiseg", manufacturer_model_name="napari-semiseg",
        software_versions=_version(), device_serial_number="0", content_label="SEMISEG",
        content_description=(description or f"{case} segmentation")[:64], content_creator_name=creator,
        omit_empty_frames=bool(pixels.any()))


def case_seg(project: Project, case: str, *, source: str = "labels", run: str | None = None,
             seg_type: str = "binary"):
    """The SEG of one case: its accepted label (``source="labels"``) or a method's pseudo label."""
    if source == "labels":
        path = project.label_path(case)
        if not path.is_file():
            raise InputError(path, f"case '{case}' has no accepted label")
        kind, method, run_name, params = label_algorithm(project, case, set(methods_with_pseudo_labels(project)))
        history = project.history(case)
        creator = str(history[-1].get("user", "")) if history else None
        creator = creator if not creator or "^" in creator else creator + "^"  # a one-component person name
        description, files = "accepted label", {case: path}
    else:
        files, run_name, view = pseudo_label_files(project, source, run)
        if case not in files:
            raise InputError(project.pseudo_dir(source, run_name), f"no pseudo label of case '{case}'")
        kind, method, params, creator = "AUTOMATIC", source, {"view": view}, None
        description = f"pseudo label {source}:{view}"
    image = project.image_geometry(case)
    label = read_volume(files[case])
    array = np.ascontiguousarray(check_label(label, image, project.labels, files[case]))
    return build_seg(project, case, array, kind=kind, method=method, run=run_name, parameters=params,
                     seg_type=seg_type, description=description, creator=creator or None)


def dicom_cases(project: Project, cases: list[str]) -> list[str]:
    """The cases of ``cases`` that were imported from DICOM (have a source sidecar)."""
    return [c for c in cases if read_refs(project, c, required=False) is not None]


def export_seg(project: Project | str | Path, dest: str | Path, *, source: str = "labels", run: str | None = None,
               seg_type: str = "binary", cases: list[str] | None = None) -> list[Path]:
    """Write ``dest/<case>.seg.dcm`` for every DICOM-imported case of ``source``; return the paths.

    Every SEG is built before the first file is written, so a bad case leaves ``dest`` as it was.
    """
    project = project if isinstance(project, Project) else Project.open(project)
    if cases is None:
        cases = project.labeled_cases() if source == "labels" else sorted(pseudo_label_files(project, source, run)[0])
    chosen = dicom_cases(project, cases)
    if not chosen:
        raise InputError(project.root, f"no case to export as DICOM-SEG: none of the {len(cases)} cases of "
                                       f"'{source}' was imported from a DICOM series")
    built = [(case, case_seg(project, case, source=source, run=run, seg_type=seg_type)) for case in chosen]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for case, seg in built:
        path = dest / f"{case}.seg.dcm"
        tmp = dest / f".tmp-{case}.seg.dcm"
        seg.save_as(tmp)
        tmp.replace(path)
        written.append(path)
    return written


def read_seg(project: Project, case: str, seg: Any) -> np.ndarray:
    """The label (project values, ``[z, y, x]`` on the case's grid) held by ``seg`` (a path or a dataset).

    Refused in one line: not a SEG, another frame of reference, another series, a segment whose label name the
    project does not declare.
    """
    import highdicom as hd
    import pydicom

    where = str(seg) if isinstance(seg, (str, Path)) else "SEG"
    try:
        dataset = pydicom.dcmread(seg) if isinstance(seg, (str, Path)) else seg
    except Exception as exc:
        raise InputError(where, f"cannot read ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})")
    if str(dataset.get("SOPClassUID", "")) not in (SEG_SOP_CLASS, LABELMAP_SOP_CLASS):
        raise InputError(where, f"not a DICOM Segmentation (SOP class {dataset.get('SOPClassUID', 'missing')})")
    refs = read_refs(project, case)
    frame = str(dataset.get("FrameOfReferenceUID", ""))
    if frame != refs["frame_of_reference_uid"]:
        raise InputError(where, f"SEG for a different frame of reference ({frame or 'none'}; case '{case}' has "
                                f"{refs['frame_of_reference_uid']})")
    referenced = {str(s.SeriesInstanceUID) for s in dataset.get("ReferencedSeriesSequence", [])}
    if refs["series_instance_uid"] not in referenced:
        raise InputError(where, f"the SEG does not reference the series of case '{case}' "
                                f"({refs['series_instance_uid']})")
    seg_obj = hd.seg.Segmentation.from_dataset(dataset, copy=False)
    by_name = {name: value for value, name in project.labels.items() if value}
    lut = np.zeros(256, dtype=np.uint8)
    for number in seg_obj.segment_numbers:
        name = seg_obj.get_segment_description(number).segment_label
        if name not in by_name:
            raise InputError(where, f"segment {number} '{name}' is not a label of the project "
                                    f"({', '.join(sorted(by_name))})")
        lut[number] = by_name[name]
    uids = [item["sop_instance_uid"] for item in refs["instances"]]
    try:
        pixels = seg_obj.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=False,
                                                       dtype=np.uint8)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError(where, f"cannot map the SEG onto case '{case}' ({str(exc).splitlines()[0][:200]})")
    return lut[pixels]


def accept_seg(project: Project, case: str, seg: str | Path, *, source: str | None = None) -> dict[str, Any]:
    """Accept the label a SEG file holds as ``case``'s label (validated, atomic, in the history)."""
    array = read_seg(project, case, seg)
    return project.accept(case, array, source=source or f"dicom-seg:{Path(seg).name}", label_file=seg)
