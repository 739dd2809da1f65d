"""A PACS as a datastore, over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) with dicomweb-client.

* :func:`list_series`: the series on the PACS (a SEG series shows the series it references);
* :func:`pull`: retrieve series into a project (each becomes a case, imported like a DICOM folder: the image and
  its source sidecar);
* :func:`push`: store a DICOM-SEG of each labeled, DICOM-imported case back on the PACS.

Authentication: none, HTTP basic (``user`` + ``password``) or a bearer ``token``; the CLI takes the secrets from
``$SEMISEG_PACS_PASSWORD`` / ``$SEMISEG_PACS_TOKEN`` so they never show in a process list.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from backend.errors import InputError
from backend.project import Project

SEG_MODALITY = "SEG"
SERIES_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                 "SeriesDescription", "NumberOfSeriesRelatedInstances")


def client(url: str, *, user: str | None = None, password: str | None = None, token: str | None = None,
           timeout: float = 60):
    """A ``DICOMwebClient`` for ``url`` with optional basic or bearer authentication."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    if user:
        session.auth = (user, password or "")
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    pacs = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    # dicomweb-client retries every failed request 5 times with a growing wait (31 s before a refused connection
    # is reported): an error is reported at once instead, in one line (_call)
    pacs.set_http_retry_params(retry=False)
    return pacs


def client_from_env(url: str, *, user: str | None = None, timeout: float = 60):
    """:func:`client` with the credentials of the environment: basic auth for ``user`` (or
    ``$SEMISEG_PACS_USER``) with ``$SEMISEG_PACS_PASSWORD``, else a bearer ``$SEMISEG_PACS_TOKEN`` if set."""
    import os

    user = user or os.environ.get("SEMISEG_PACS_USER")
    return client(url, user=user, password=os.environ.get("SEMISEG_PACS_PASSWORD"),
                  token=None if user else os.environ.get("SEMISEG_PACS_TOKEN"), timeout=timeout)


def _value(item: dict, keyword: str) -> Any:
    from pydicom.datadict import tag_for_keyword

    element = item.get(f"{tag_for_keyword(keyword):08X}", {})
    values = element.get("Value") or [None]
    value = values[0]
    return value.get("Alphabetic") if isinstance(value, dict) else value


def _call(url: str, what: str, fn, *args, **kwargs):
    """Run a DICOMweb request; a refused connection, an HTTP error or a timeout is one line naming the URL."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (check --user/--token)" if status in (401, 403) else ""
        raise InputError(url, f"{what} failed: HTTP {status}{hint}") from exc
    except requests.exceptions.Timeout as exc:
        raise InputError(url, f"{what} failed: no answer in time (--timeout)") from exc
    except requests.exceptions.ConnectionError as exc:
        raise InputError(url, f"{what} failed: cannot connect (no server answers at this URL)") from exc
    except requests.exceptions.RequestException as exc:
        raise InputError(url, f"{what} failed: {type(exc).__name__} ({str(exc).splitlines()[0][:160]})") from exc


def list_series(pacs, url: str, *, modality: str | None = None, patient: str | None = None) -> list[dict]:
    """Every series on the PACS (filtered by modality / patient): one dict per series; a SEG series gains
    ``references`` = the Series Instance UIDs its first SEG instance references."""
    filters = {k: v for k, v in (("Modality", modality), ("PatientID", patient)) if v}
    found = _call(url, "search", pacs.search_for_series, search_filters=filters,
                  fields=["SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances", "PatientID"])
    rows = []
    for item in found:
        row = {key: _value(item, key) for key in SERIES_FIELDS}
        if row["Modality"] == SEG_MODALITY:
            row["references"] = sorted(seg_references(pacs, url, row["StudyInstanceUID"], row["SeriesInstanceUID"]))
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["PatientID"]), str(r["StudyInstanceUID"]), int(r["SeriesNumber"] or 0)))


def seg_references(pacs, url: str, study: str, series: str) -> set[str]:
    """The source Series Instance UIDs the SEG instances of ``series`` reference (Referenced Series Sequence of
    their DICOM JSON metadata)."""
    from pydicom.datadict import tag_for_keyword

    sequence, uid = (f"{tag_for_keyword(k):08X}" for k in ("ReferencedSeriesSequence", "SeriesInstanceUID"))
    metadata = _call(url, "metadata", pacs.retrieve_series_metadata, study, series)
    return {str(v) for item in metadata for ref in item.get(sequence, {}).get("Value", [])
            for v in ref.get(uid, {}).get("Value", [])}


def _case_name(row: dict, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{row.get('PatientID') or 'patient'}_s{row.get('SeriesNumber') or 0}")
    base = base.strip("_-") or "series"
    name = base if base[0].isalnum() else f"s{base}"
    if name in taken:
        name = f"{name}_{str(row['SeriesInstanceUID']).replace('.', '')[-8:]}"
    taken.add(name)
    return name


def pulled_series(project: Project) -> dict[str, str]:
    """``{Series Instance UID: case}`` of the project's cases imported from DICOM (their source sidecars)."""
    from backend.dicom.refs import read_refs

    found = {}
    for case in project.case_ids():
        refs = read_refs(project, case, required=False)
        if refs is not None:
            found[refs["series_instance_uid"]] = case
    return found


def pull(pacs, url: str, project_dir: str | Path, series: list[str], *, labels_json: str | Path | None = None,
         modality: str | None = None) -> tuple[Project, dict[str, str]]:
    """Retrieve ``series`` (Series Instance UIDs) into the project at ``project_dir`` (created when missing), one
    case per series; a series the project already holds is not retrieved again.  Returns the project and
    ``{case: series UID}`` of every series asked for.  Everything is downloaded and validated (missing slices,
    mixed series, ...) before the project is touched."""
    from backend.dicom import sidecar_hook
    from backend.project.importer import init_project

    project_dir = Path(project_dir)
    project = Project.open(project_dir) if (project_dir / "dataset.json").is_file() else None
    present = pulled_series(project) if project is not None else {}
    wanted = [uid for uid in dict.fromkeys(series) if uid not in present]
    rows = {r["SeriesInstanceUID"]: r for r in list_series(pacs, url)} if wanted else {}
    for uid in wanted:
        if uid not in rows:
            raise InputError(url, f"no series {uid} on the PACS")
        if rows[uid]["Modality"] == SEG_MODALITY:
            raise InputError(url, f"series {uid} is a SEG, not an image series")
    taken = set(project.case_ids()) if project is not None else set()
    cases = {case: uid for uid, case in present.items() if uid in series}
    if not wanted:
        return project, cases
    with tempfile.TemporaryDirectory(prefix="semiseg-pacs-") as tmp:
        for uid in wanted:
            row = rows[uid]
            case = _case_name(row, taken)
            folder = Path(tmp) / case
            folder.mkdir()
            for n, ds in enumerate(_call(url, "retrieve", pacs.retrieve_series, row["StudyInstanceUID"], uid)):
                ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
            cases[case] = uid
        try:
            project = init_project(project_dir, tmp, labels_json=labels_json, modality=modality,
                                   series_hook=sidecar_hook)
        except InputError as exc:  # name the series on the PACS, not the temporary folder it was read from
            path = Path(exc.path or tmp)
            case = path.relative_to(tmp).parts[0] if path.is_relative_to(tmp) and path != Path(tmp) else None
            where = f"{url} series {cases[case]} (case {case})" if case in cases else url
            raise InputError(where, exc.problem) from None
    return project, cases


def push(pacs, url: str, project: Project, *, cases: list[str] | None = None, source: str = "labels",
         run: str | None = None, seg_type: str = "binary") -> list[tuple[str, str]]:
    """Store one SEG per case (default: every labeled case imported from DICOM) on the PACS; returns
    ``[(case, SEG SOP Instance UID)]``.  Every SEG is built before the first is sent."""
    from backend.dicom.seg import case_seg, dicom_cases, pseudo_label_files

    if cases is None:
        pool = project.labeled_cases() if source == "labels" else sorted(pseudo_label_files(project, source, run)[0])
        cases = dicom_cases(project, pool)
        if not cases:
            raise InputError(project.root, f"nothing to push: no case of '{source}' was imported from DICOM")
    segs = [(case, case_seg(project, case, source=source, run=run, seg_type=seg_type)) for case in cases]
    _call(url, "store", pacs.store_instances, [seg for _, seg in segs])
    return [(case, str(seg.SOPInstanceUID)) for case, seg in segs]
