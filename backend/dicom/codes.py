"""Segment descriptions of a DICOM Segmentation: coded concepts per label name and the algorithm that made it.

Coded concepts (Segmented Property Category and Type) come, per project label name, from

1. ``dataset.json`` -> ``"dicom_segments"``, or the project config ``semiseg/dicom/segments.json``::

       {"GM": {"category": ["85756007", "SCT", "Tissue"], "type": ["83942000", "SCT", "Gray matter"]}}

   (``[value, scheme, meaning]`` lists or ``{"value", "scheme", "meaning"}`` objects);
2. else a default: a SNOMED CT concept pydicom knows for the name (``liver`` -> SCT 10200004 *Liver*, ``GM`` ->
   *Gray matter*, ``tumour`` -> *Neoplasm*), under *Anatomical Structure* or *Morphologically Abnormal Structure*;
3. else *Tissue* / *Tissue* (SCT 85756007), the generic concept DCMQI uses.

Algorithm identification: a pseudo label is ``AUTOMATIC`` (name = method, version = run); an accepted label
started from a method's view is ``SEMIAUTOMATIC`` (that method and the run the reviewer had open), one drawn from
scratch or a file is ``MANUAL``.
"""
from __future__ import annotations

import re
from typing import Any

from backend.errors import InputError
from backend.io.atomic import read_json

TISSUE = ("85756007", "SCT", "Tissue")
ANATOMY = ("91723000", "SCT", "Anatomical Structure")
ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")
ALIASES = {  # label name (lower case, no separators) -> pydicom codes.SCT keyword, category
    "gm": ("GrayMatter", ANATOMY), "greymatter": ("GrayMatter", ANATOMY), "graymatter": ("GrayMatter", ANATOMY),
    "wm": ("WhiteMatter", ANATOMY), "whitematter": ("WhiteMatter", ANATOMY),
    "csf": ("CerebrospinalFluid", ANATOMY),
    "tumour": ("Neoplasm", ABNORMAL), "tumor": ("Neoplasm", ABNORMAL), "neoplasm": ("Neoplasm", ABNORMAL),
    "lesion": ("Lesion", ABNORMAL), "mass": ("Mass", ABNORMAL),
}


def _code(value: Any, where: str):
    from highdicom.sr import CodedConcept

    if isinstance(value, dict):
        value = [value.get("value"), value.get("scheme"), value.get("meaning")]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, str) and v for v in value):
        raise InputError(where, f"invalid coded concept {value!r} (expected [value, scheme, meaning])")
    return CodedConcept(value[0], value[1], value[2])


def configured_codes(project) -> dict[str, dict]:
    """The ``"dicom_segments"`` table of ``dataset.json``, overridden by ``semiseg/dicom/segments.json``."""
    table = dict(project.dataset.get("dicom_segments") or {})
    config = project.semiseg / "dicom" / "segments.json"
    if config.is_file():
        extra = read_json(config, "segment codes")
        if not isinstance(extra, dict):
            raise InputError(config, "invalid segment codes (not a JSON object)")
        table.update(extra)
    return table


def segment_codes(project, name: str) -> tuple[Any, Any]:
    """``(category, type)`` coded concepts of the label called ``name`` (see module docstring)."""
    from pydicom.sr.codedict import codes

    configured = configured_codes(project).get(name)
    if configured is not None:
        where = f"{project.dataset_path} (dicom_segments.{name})"
        if not isinstance(configured, dict):
            raise InputError(where, "expected {\"category\": [...], \"type\": [...]}")
        return _code(configured.get("category", list(TISSUE)), where), _code(configured.get("type"), where)
    key = re.sub(r"[^a-z]", "", name.lower())
    keyword, category = ALIASES.get(key, (None, ANATOMY))
    for candidate in (keyword, name[:1].upper() + name[1:] if name else None):
        if candidate and candidate in codes.SCT.dir(candidate):
            code = getattr(codes.SCT, candidate)
            return _code(list(category), name), _code([code.value, code.scheme_designator, code.meaning], name)
    return _code(list(TISSUE), name), _code(list(TISSUE), name)


def algorithm(kind: str, method: str | None = None, run: str | None = None,
              parameters: dict[str, str] | None = None) -> tuple[str, Any]:
    """``(algorithm type, AlgorithmIdentificationSequence or None)`` for ``kind`` = automatic / semiautomatic /
    manual."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    kind = kind.upper()
    if kind == "MANUAL" or not method:
        return "MANUAL", None
    ident = hd.AlgorithmIdentificationSequence(name=method, family=codes.cid7162.ArtificialIntelligence,
                                               version=run or "unknown", source="napari-semiseg",
                                               parameters=parameters or None)
    return kind, ident


def label_algorithm(project, case: str, methods: set[str]) -> tuple[str, str | None, str | None, dict]:
    """How the accepted label of ``case`` was made, from its last history record: ``(kind, method, run,
    parameters)``; ``methods`` are the names of the project's methods with pseudo labels or models."""
    history = project.history(case)
    record = history[-1] if history else {}
    started = str(record.get("started_from") or record.get("source") or "")
    runs = record.get("runs") or {}
    method = started.split(":", 1)[0] if ":" in started else None
    if method and method in methods | set(runs):
        params = {"view": started.split(":", 1)[1], "voxels_edited": str(record.get("voxels_edited", "unknown"))}
        return "SEMIAUTOMATIC", method, runs.get(method), params
    if started.startswith("majority") and runs:
        names = "+".join(sorted(runs))
        return "SEMIAUTOMATIC", f"majority vote ({names})", ",".join(f"{m}:{r}" for m, r in sorted(runs.items())), {}
    return "MANUAL", None, None, {}
