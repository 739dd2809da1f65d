"""A ``semiseg serve`` project as a local project folder, so code written for :class:`backend.project.Project` (the
review queue, the pseudo-label views, the run table, drafts, flags) works on a server's project unchanged.

:class:`MirrorProject` is a :class:`Project` over a folder in the client's cache
(``<cache>/project``: ``dataset.json``, ``semiseg/pseudo/<method>/<run>/scores.json``, ``semiseg/models/<method>/<run>
/run.json``, ``semiseg/flags.json``) that :meth:`MirrorProject.sync` refreshes from the server, and which fetches a
case's image and pseudo-label views (ETag-cached by :class:`backend.remote.RemoteProject`) when the case is read.
Reads that need the server (:meth:`sync`, :meth:`read_image`, :meth:`read_label`, :meth:`label_version`) belong in a
worker thread.  Writes go to the server: :meth:`accept` is its ``PUT`` with ``If-Match`` (409 ->
:class:`~backend.errors.LabelConflictError`, as a local accept); a flag set or cleared here is sent on the next
:meth:`sync`.  Drafts are local files (``semiseg/drafts``): a lost connection never loses an edit.
A model's weights are not copied (``checkpoint.pt`` here is an empty marker of "this run has weights";
:meth:`backend.remote.RemoteProject.download_weights` fetches them).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from backend.io.atomic import write_json_atomic
from backend.io.volume import Volume, read_volume
from backend.project import ANY, Project
from backend.project.checks import FILE_ENDING
from backend.project.runs import CHECKPOINT, SCORES
from backend.remote.project import RemoteProject
from backend.review.corrections import flags, flags_path

FOLDER = "project"


def _place(source: Path, target: Path) -> None:
    """``target`` becomes the content of ``source`` (a hard link when they share a file system), atomically."""
    if target.is_file() and os.path.samefile(source, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _write_json_if_changed(path: Path, data: Any) -> None:
    try:
        if json.loads(path.read_text()) == data:
            return
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, sync_dir=False)


class MirrorProject(Project):
    """The project of ``remote`` (a connected :class:`RemoteProject`) as a local folder; see the module docstring.
    Make one with :meth:`connect` (it talks to the server: call it in a worker)."""

    def __init__(self, root: str | Path, remote: RemoteProject):
        self.remote = remote
        self._rows: list[dict[str, Any]] = []
        self._server_flags: set[str] = set()
        self._sync_lock = threading.RLock()
        super().__init__(root)

    @classmethod
    def connect(cls, remote: RemoteProject, folder: str | Path | None = None) -> "MirrorProject":
        """Test the connection (the specific :mod:`backend.remote.errors` error if it fails), lay out the mirror
        folder (default ``<remote cache>/project``) and :meth:`sync` it."""
        info = remote.test_connection()
        root = Path(folder) if folder is not None else remote.http.cache_dir / FOLDER
        labels = {name: int(value) for value, name in info["labels"].items()}
        dataset = {"name": info["name"], "description": f"mirror of {remote.root}", "tensorImageSize": "3D",
                   "modality": {"0": info["modality"]}, "channel_names": {"0": info["modality"]}, "labels": labels,
                   "file_ending": FILE_ENDING, "training": [], "server": remote.root}
        for sub in ("imagesTr", "labelsTr", "semiseg"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _write_json_if_changed(root / "dataset.json", dataset)
        mirror = cls(root, remote)
        mirror._server_flags = set(flags(mirror))  # as the last sync left them
        mirror.sync(push_flags=False)
        return mirror

    @property
    def server(self) -> str:
        """The server URL (the folder is only a cache of it)."""
        return self.remote.root

    def recover(self) -> list[str]:
        return []  # nothing is accepted into this folder: the server journals its own accepts

    # ---- refreshing from the server ---------------------------------------------------------------------------------
    def sync(self, push_flags: bool = True) -> "MirrorProject":
        """Send the flags changed here, then fetch the case table, the run table and every pseudo-label run's
        scores (a few small JSON answers; images and views are fetched when a case is read)."""
        with self._sync_lock:
            if push_flags:
                self._push_flags()
            rows = self.remote.review_rows()
            runs = self.remote.runs()
            pseudo = {m: list(r) for m, r in runs["pseudo"].items()}
            for method, names in pseudo.items():
                for run in names:
                    _write_json_if_changed(self.pseudo_dir(method, run) / SCORES, self.remote.scores(method, run))
            self._prune(self.semiseg / "pseudo", pseudo, keep=SCORES)
            models: dict[str, list[str]] = {}
            for row in runs["runs"]:
                folder = self.model_dir(row["method"], row["run"])
                _write_json_if_changed(folder / "run.json", {k: v for k, v in row.items() if k != "has_checkpoint"})
                marker = folder / CHECKPOINT
                if row.get("has_checkpoint"):
                    marker.touch()
                else:
                    marker.unlink(missing_ok=True)
                models.setdefault(row["method"], []).append(row["run"])
            self._prune(self.semiseg / "models", models, keep="run.json")
            flagged = {row["case"] for row in rows if row.get("flagged")}
            _write_json_if_changed(flags_path(self), {c: {"reason": "", "via": "server"} for c in sorted(flagged)})
            self._server_flags = flagged
            self._rows = rows
        return self

    def _push_flags(self) -> None:
        local = flags(self)
        for case in sorted(set(local) - self._server_flags):
            self.remote.flag_case(case, str(local[case].get("reason", "")))
        for case in sorted(self._server_flags - set(local)):
            self.remote.unflag_case(case)

    @staticmethod
    def _prune(base: Path, keep_runs: dict[str, list[str]], keep: str) -> None:
        """Remove mirrored runs the server no longer has (only folders holding ``keep``: mirror files)."""
        if not base.is_dir():
            return
        for marker in base.glob(f"*/*/{keep}"):
            folder = marker.parent
            if folder.name not in keep_runs.get(folder.parent.name, []):
                shutil.rmtree(folder, ignore_errors=True)

    # ---- cases, from the last sync -----------------------------------------------------------------------------------
    def _row(self, case: str) -> dict[str, Any]:
        for row in self._rows:
            if row["case"] == case:
                return row
        raise KeyError(f"no case '{case}' on {self.server}")

    def case_ids(self) -> list[str]:
        return sorted(row["case"] for row in self._rows)

    def labeled_cases(self) -> list[str]:
        return sorted(row["case"] for row in self._rows if row["labeled"])

    def unlabeled_cases(self) -> list[str]:
        return sorted(row["case"] for row in self._rows if not row["labeled"])

    def is_labeled(self, case: str) -> bool:
        return bool(self._row(case)["labeled"])

    def image_header(self, case: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        row = self._row(case)
        return tuple(row["shape"]), tuple(row["spacing"])

    def case_table(self) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in row.items() if k not in ("flagged", "draft")}, "scores": {}} for row in self._rows]

    # ---- reads that need the server (worker threads) -----------------------------------------------------------------
    def label_version(self, case: str) -> str | None:
        return self.remote.label_version(case)

    def read_image(self, case: str) -> Volume:
        """The image (downloaded unless the cached copy's ETag still matches), after fetching the case's
        pseudo-label views of every run into the mirror, where :func:`backend.review.views.pseudo_views` finds them."""
        self.fetch_views(case)
        return read_volume(self._fetch_image(case))

    def image_geometry(self, case: str) -> Volume:
        path = self.image_path(case)
        return super().image_geometry(case) if path.is_file() else self.remote.image_geometry(case)

    def _fetch_image(self, case: str) -> Path:
        path = self.image_path(case)
        _place(self.remote.image_path(case), path)
        return path

    def fetch_views(self, case: str) -> dict[str, Path]:
        """Download the pseudo-label views of ``case`` of every run with pseudo labels into the mirror."""
        runs = {m: list(rs) for m, rs in self.remote.runs()["pseudo"].items()}
        out: dict[str, Path] = {}
        for index in range(max((len(r) for r in runs.values()), default=0)):
            chosen = {m: rs[index] for m, rs in runs.items() if index < len(rs)}
            views = self.remote.case_info(case, chosen)["views"]
            for name, view in views.items():
                source, _ = self.remote.http.download(
                    f"/cases/{case}/views/{view['method']}/{view['run']}/{view['view']}", FILE_ENDING)
                target = self.pseudo_dir(view["method"], view["run"]) / case / f"{view['view']}{FILE_ENDING}"
                _place(source, target)
                out[f"{view['method']}:{view['run']}:{view['view']}"] = target
        return out

    def read_label(self, case: str) -> Volume | None:
        volume, _version = self.remote.read_label_versioned(case)
        return volume

    # ---- writes go to the server -------------------------------------------------------------------------------------
    def accept(self, case: str, label: Volume | np.ndarray, *, source: str = "manual", user: str | None = None,
               label_file: str | Path | None = None, extra: dict[str, Any] | None = None,
               expected_version: str | None | object = ANY) -> dict[str, Any]:
        """The server's accept (``PUT`` with ``If-Match``; the history's user is the token's); ``extra``'s
        ``seconds_spent`` and ``voxels_edited`` go with it.  :class:`LabelConflictError` when the server's label is
        no longer ``expected_version``; a lost connection raises (the caller keeps the correction as a draft)."""
        from backend.errors import LabelConflictError
        from backend.io.volume import write_volume

        extra = extra or {}
        if isinstance(label, np.ndarray):
            label = self.image_geometry(case).like(label)
        array = np.asarray(label.array, dtype=np.uint8)
        params: dict[str, Any] = {"source": source, "seconds": float(extra.get("seconds_spent", 0.0))}
        if extra.get("voxels_edited") is not None:
            params["voxels_edited"] = int(extra["voxels_edited"])
        headers = ({"If-Match": "*"} if expected_version is ANY else {"If-None-Match": "*"}
                   if expected_version is None else {"If-Match": f'"{expected_version}"'})
        upload = self.tmp_dir / f"upload-{case}{FILE_ENDING}"
        upload.parent.mkdir(parents=True, exist_ok=True)
        write_volume(label.like(array), upload, sync_dir=False)
        try:
            record = self.remote.http.request("PUT", f"/cases/{case}/label", content=upload.read_bytes(),
                                              params=params, headers=headers, conflict=LabelConflictError)
        finally:
            upload.unlink(missing_ok=True)
        with self._sync_lock:  # the table shows it labeled before the next sync
            self._rows = [{**row, "labeled": True} if row["case"] == case else row for row in self._rows]
        return record
