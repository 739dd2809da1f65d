"""DICOM round trip: source references of imported series, DICOM-SEG export/import, a DICOMweb PACS datastore.

The project floor cannot import this package (it sits above it), so the callers of
:func:`backend.project.importer.init_project` (``semiseg init``, :func:`backend.dicom.pacs.pull`) pass
:func:`sidecar_hook`: every DICOM series imported then gets ``semiseg/dicom/<case>.json``
(:mod:`backend.dicom.refs`).  DICOM-SEG export is :func:`backend.dicom.seg.export_seg`
(``semiseg export --format dicom-seg``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from backend.io.volume import Volume


def sidecar_hook(folder: Path, image: Volume) -> Callable[[Any, str], Path]:
    """Importer pass 1: map the series onto ``image``'s slices (refusing a mixed or inconsistent series before
    anything is written); returns pass 2's writer of the sidecar."""
    from backend.dicom.refs import series_refs, write_refs

    refs = series_refs(folder, image)
    return lambda project, case: write_refs(project, case, refs)
