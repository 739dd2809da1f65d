"""DICOM round trip: source references of imported series, DICOM-SEG export/import, a DICOMweb PACS datastore.

The project floor cannot import this package (it sits above it), so importing it registers the writer of the
source sidecar on :data:`backend.project.importer.DICOM_HOOKS`: every DICOM series ``init_project`` imports then
gets ``semiseg/dicom/<case>.json`` (:mod:`backend.dicom.refs`).  The CLI imports it when it builds its parser,
:func:`backend.dicom.pacs.pull` before it imports; DICOM-SEG export is :func:`backend.dicom.seg.export_seg`
(``semiseg export --format dicom-seg``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from backend.io.volume import Volume
from backend.project import importer as _importer


def sidecar_hook(folder: Path, image: Volume) -> Callable[[Any, str], Path]:
    """Importer pass 1: map the series onto ``image``'s slices (refusing a mixed or inconsistent series before
    anything is written); returns pass 2's writer of the sidecar."""
    from backend.dicom.refs import series_refs, write_refs

    refs = series_refs(folder, image)
    return lambda project, case: write_refs(project, case, refs)


if sidecar_hook not in _importer.DICOM_HOOKS:
    _importer.DICOM_HOOKS.append(sidecar_hook)
