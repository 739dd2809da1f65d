"""A project on a ``semiseg serve`` server, with the names of the local API: :class:`backend.project.Project`'s
(cases, labels, label versions, accept with ``expected_version``, scores), the review floor's free functions
(``review_rows``, ``pseudo_views``, ``read_views``, flags, runs) as methods, and :mod:`backend.jobs`'s
(:class:`backend.remote.jobs.RemoteJobs`).  Images and views are downloaded once and kept on local disk by ETag.

Drafts stay on this machine: :attr:`RemoteProject.semiseg` is a local folder, so
:func:`backend.review.corrections.save_draft` / ``load_draft`` / ``list_drafts`` work unchanged with a
RemoteProject, and a lost connection never loses an edit.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import LabelConflictError
from backend.io.volume import Volume, read_geometry, read_volume, write_volume
from backend.project import ANY
from backend.project.checks import FILE_ENDING
from backend.remote.jobs import RemoteJobs
from backend.remote.transport import Transport
from backend.review.queue import DEFAULT_SORT_SCORE


def runs_param(runs: dict[str, str] | None) -> dict[str, str]:
    return {"runs": ",".join(f"{m}:{r}" for m, r in sorted(runs.items()))} if runs else {}


class RemoteProject(RemoteJobs):
    """The project served at ``url`` (``http(s)://host:port``), as the user of ``token``.

    ``cache_dir``: where downloads and drafts are kept (default ``~/.cache/semiseg/remote/<host>_<port>``);
    ``verify``: True, False or a CA bundle path (a self-signed server certificate); ``timeout`` in seconds.
    """

    def __init__(self, url: str, token: str, *, cache_dir: str | Path | None = None, verify: bool | str | Path = True,
                 timeout: float = 30.0):
        self.http = Transport(url, token, cache_dir=cache_dir, verify=verify, timeout=timeout)
        self._info: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RemoteProject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the server and the project -------------------------------------------------------------------------
    def test_connection(self) -> dict[str, Any]:
        """The server's project info (name, labels, user, role); raises ConnectionRefused, HostNotFound,
        TLSFailure, Unauthorized or RemoteTimeout (:mod:`backend.remote.errors`) with a one-line message."""
        self._info = self.http.request("GET", "/info")
        return self._info

    def info(self) -> dict[str, Any]:
        return self._info if self._info is not None else self.test_connection()

    @property
    def root(self) -> str:
        """The server URL (shown where a local project shows its folder)."""
        return self.http.url

    @property
    def name(self) -> str:
        return self.info()["name"]

    @property
    def modality(self) -> str:
        return self.info()["modality"]

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.info()["labels"].items()}

    @property
    def num_classes(self) -> int:
        return int(self.info()["num_classes"])

    @property
    def user(self) -> str:
        return self.info()["user"]

    @property
    def role(self) -> str:
        return self.info()["role"]

    @property
    def semiseg(self) -> Path:
        """A local folder standing for the project's ``semiseg/`` where the review keeps drafts."""
        return self.http.cache_dir / "semiseg"

    # ---- cases ----------------------------------------------------------------------------------------------
    def review_rows(self, runs: dict[str, str] | None = None, score: str = DEFAULT_SORT_SCORE) -> list[dict[str, Any]]:
        """The review queue as :func:`backend.review.queue.review_rows` orders it, each row with
        ``label_version``."""
        return self.http.request("GET", "/cases", params={"score": score, **runs_param(runs)})["cases"]

    def case_table(self) -> list[dict[str, Any]]:
        return self.review_rows()

    def case_ids(self) -> list[str]:
        return sorted(row["case"] for row in self.review_rows())

    def labeled_cases(self) -> list[str]:
        return sorted(row["case"] for row in self.review_rows() if row["labeled"])

    def unlabeled_cases(self) -> list[str]:
        return sorted(row["case"] for row in self.review_rows() if not row["labeled"])

    def case_info(self, case: str, runs: dict[str, str] | None = None) -> dict[str, Any]:
        """``labeled``, ``label_version``, ``shape``, ``spacing`` and the ``views`` of ``runs`` of one case."""
        return self.http.request("GET", f"/cases/{case}", params=runs_param(runs))

    def is_labeled(self, case: str) -> bool:
        return bool(self.case_info(case)["labeled"])

    def label_version(self, case: str) -> str | None:
        """The version token of the case's accepted label (None: none); pass it to :meth:`accept`."""
        return self.case_info(case)["label_version"]

    def image_header(self, case: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        info = self.case_info(case)
        return tuple(info["shape"]), tuple(info["spacing"])

    def image_path(self, case: str) -> Path:
        """The case's image in the local cache (downloaded when the server's copy changed)."""
        return self.http.download(f"/cases/{case}/image", FILE_ENDING)[0]

    def read_image(self, case: str) -> Volume:
        return read_volume(self.image_path(case))

    def image_geometry(self, case: str) -> Volume:
        return read_geometry(self.image_path(case))

    def read_label(self, case: str) -> Volume | None:
        volume, _ = self.read_label_versioned(case)
        return volume

    def read_label_versioned(self, case: str) -> tuple[Volume | None, str | None]:
        """The accepted label and the version it is (one request: they cannot disagree)."""
        if not self.case_info(case)["labeled"]:
            return None, None
        path, etag = self.http.download(f"/cases/{case}/label", FILE_ENDING)
        return read_volume(path), etag.strip('"')

    def pseudo_views(self, case: str, runs: dict[str, str] | None = None) -> dict[str, Path]:
        """``{"<method>:<view>": local path}`` of the case's pseudo labels of ``runs`` (default: the review's)."""
        views = self.case_info(case, runs)["views"]
        return {name: self.http.download(f"/cases/{case}/views/{v['method']}/{v['run']}/{v['view']}",
                                         FILE_ENDING)[0] for name, v in views.items()}

    def read_views(self, case: str, runs: dict[str, str] | None = None,
                   image: Volume | None = None) -> dict[str, np.ndarray]:
        """As :func:`backend.review.views.read_views`: uint8 arrays, a view off the image's grid skipped."""
        image = image if image is not None else self.image_geometry(case)
        out = {}
        for name, path in self.pseudo_views(case, runs).items():
            volume = read_volume(path)
            if image.geometry_mismatch(volume) is None:
                out[name] = volume.array.astype(np.uint8, copy=False)
        return out

    def scores(self, method: str, run: str | None = None) -> dict[str, Any]:
        return self.http.request("GET", f"/scores/{method}", params={"run": run} if run else {})

    # ---- accepting a label ------------------------------------------------------------------------------------
    def accept(self, case: str, label: Volume | np.ndarray, *, source: str = "manual", start: np.ndarray | None = None,
               seconds: float = 0.0, expected_version: str | None | object = ANY) -> dict[str, Any]:
        """Accept a corrected label on the server (its journaled accept, provenance = this token's user).

        ``expected_version``: the :meth:`label_version` the correction started from (None: the case had no
        label); :class:`LabelConflictError` when the server's label changed since.  ``start``: the array the
        reviewer started from (the history records how many voxels were edited).  Returns the history record
        with the new ``label_version``.
        """
        if isinstance(label, np.ndarray):
            label = self.image_geometry(case).like(label)
        array = np.asarray(label.array, dtype=np.uint8)
        params: dict[str, Any] = {"source": source, "seconds": seconds}
        if start is not None and start.shape == array.shape:
            params["voxels_edited"] = int(np.count_nonzero(start != array))
        headers = ({"If-Match": "*"} if expected_version is ANY else {"If-None-Match": "*"}
                   if expected_version is None else {"If-Match": f'"{expected_version}"'})
        upload = self.http.cache_dir / "uploads" / f"{case}-{secrets.token_hex(4)}{FILE_ENDING}"
        write_volume(label.like(array), upload, sync_dir=False)
        try:
            return self.http.request("PUT", f"/cases/{case}/label", content=upload.read_bytes(), params=params,
                                     headers=headers, conflict=LabelConflictError)
        finally:
            upload.unlink(missing_ok=True)

    # ---- flags ------------------------------------------------------------------------------------------------
    def flag_case(self, case: str, reason: str = "") -> dict[str, Any]:
        return self.http.request("POST", f"/cases/{case}/flag", json={"reason": reason})

    def unflag_case(self, case: str) -> None:
        self.http.request("DELETE", f"/cases/{case}/flag")

    def flags(self) -> dict[str, bool]:
        return {row["case"]: True for row in self.review_rows() if row["flagged"]}

    # ---- runs -------------------------------------------------------------------------------------------------
    def runs(self) -> dict[str, Any]:
        """``{"runs": run_table, "best": best_runs, "pseudo": {method: runs}, "review": default_runs}``."""
        return self.http.request("GET", "/runs")

    def run_table(self) -> list[dict[str, Any]]:
        return self.runs()["runs"]

    def best_runs(self) -> dict[str, str]:
        return self.runs()["best"]

    def default_runs(self) -> dict[str, str]:
        return self.runs()["review"]

    def methods_with_pseudo_labels(self) -> list[str]:
        return sorted(self.runs()["pseudo"])

    def pseudo_runs(self, method: str) -> list[str]:
        return self.runs()["pseudo"].get(method, [])

    def download_weights(self, method: str, run: str, which: str = "best") -> Path:
        """A run's weights (``best.pt``; ``which="last"``: ``checkpoint.pt``) in the local cache."""
        return self.http.download(f"/runs/{method}/{run}/weights", ".pt", params={"which": which})[0]
