"""The project folder: the single source of truth on disk (a Decathlon / nnU-Net raw layout plus ``semiseg/``).

::

    project/
      dataset.json                  Decathlon + nnU-Net v2 fields (name, channel_names, modality, labels, ...)
      imagesTr/<case>_0000.nii.gz   every image, labeled or not
      labelsTr/<case>.nii.gz        human-verified labels = the labeled set
      semiseg/pseudo/<method>/<run>/<case>/<view>.nii.gz and scores.json
      semiseg/models/<method>/<run>/checkpoint.pt, config.json, metrics.jsonl
      semiseg/history/<case>.jsonl and history/<case>/<timestamp>.nii.gz
      semiseg/jobs/<id>/spec.json, events.jsonl, log.txt
      semiseg/project.lock          held while a label is accepted or a case added (one writer at a time)
      semiseg/tmp/                  the temp files of the accept in progress and its journal

Every label is validated against its image (shape, geometry, declared values 0..255) before it is written.
Accepting a label is one transaction under the project lock (see :meth:`Project.accept`): every new file is
written and fsynced in ``semiseg/tmp/`` first, then a journal is committed, then the files are renamed into place.
After a crash at any point :meth:`Project.open` rolls an interrupted accept forward (journal present) or back
(no journal) and removes stale temp files, so the label, its snapshot, its history and ``dataset.json`` agree.
Files are created with the mode the umask allows (no private 0600 temp-file modes).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError, LabelConflictError
from backend.io.filelock import FileLock
from backend.io.atomic import read_json, write_json_atomic
from backend.io.volume import Volume, read_geometry, read_volume, write_volume
from backend.project.checks import (FILE_ENDING, IMAGE_SUFFIX, check_case_name, check_image, check_label,
                                    check_label_counts, check_label_values, check_name, parse_labels)
from backend.project.journal import AcceptJournal
from backend.project.runs import methods_with_pseudo_labels, pseudo_runs

LOCK_TIMEOUT_S = 120.0
ANY: Any = object()  # ``expected_version`` default of :meth:`Project.accept`: accept whatever is on disk


class ProjectLock(FileLock):
    """The project's writer lock (``semiseg/project.lock``): an advisory lock the kernel drops when its process
    dies, so a killed accept never leaves the project locked.  Blocking, with a timeout."""

    def acquire(self, timeout: float | None = LOCK_TIMEOUT_S) -> bool:
        """Take the lock; wait at most ``timeout`` s (0: do not wait).  False when it could not be taken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def __enter__(self) -> "ProjectLock":
        if not self.acquire():
            raise InputError(self.path, f"the project is locked by another writer for over {LOCK_TIMEOUT_S:g} s")
        return self


class Project(AcceptJournal):
    """A project folder.  Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.dataset_path = self.root / "dataset.json"
        if not self.dataset_path.is_file():
            raise InputError(self.root, "not a project folder (no dataset.json)")
        self.dataset: dict = self._read_dataset()
        self.labels = self._parse_dataset_labels(self.dataset)

    def _read_dataset(self) -> dict:
        dataset = read_json(self.dataset_path, "dataset.json")
        if not isinstance(dataset, dict):
            raise InputError(self.dataset_path, "invalid dataset.json (not a JSON object)")
        return dataset

    def _parse_dataset_labels(self, dataset: dict) -> dict[int, str]:
        try:
            return parse_labels(dataset["labels"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(self.dataset_path, f"invalid dataset.json ({exc})") from exc

    # ---- creation ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, *, labels: dict[int, str], modality: str = "MR", name: str | None = None,
               description: str = "") -> "Project":
        root = Path(root)
        if (root / "dataset.json").exists():
            raise InputError(root, "already a project (dataset.json exists)")
        check_label_values(list(labels), root)
        labels = dict(sorted({int(k): str(v) for k, v in labels.items()}.items()))
        if 0 not in labels:
            raise InputError(root, "labels must declare 0 (background)")
        dataset = {
            "name": name or root.resolve().name,
            "description": description,
            "tensorImageSize": "3D",
            "modality": {"0": modality},
            "channel_names": {"0": modality},
            "labels": {v: k for k, v in labels.items()},
            "numTraining": 0,
            "file_ending": FILE_ENDING,
            "training": [],
        }
        for sub in ("imagesTr", "labelsTr", "semiseg"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "dataset.json", dataset)
        return cls(root)

    @classmethod
    def open(cls, root: str | Path) -> "Project":
        """Open a project; an accept that a crash interrupted is completed or rolled back first (:meth:`recover`)."""
        project = cls(root)
        project.recover()
        return project

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.dataset.get("name", self.root.name))

    @property
    def modality(self) -> str:
        channels = self.dataset.get("channel_names") or self.dataset.get("modality") or {"0": "MR"}
        return str(channels.get("0", "MR"))

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def semiseg(self) -> Path:
        return self.root / "semiseg"

    def image_path(self, case: str) -> Path:
        return self.root / "imagesTr" / f"{check_case_name(case)}{IMAGE_SUFFIX}"

    def label_path(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{check_case_name(case)}{FILE_ENDING}"

    def pseudo_dir(self, method: str, run: str) -> Path:
        """``semiseg/pseudo/<method>/<run>``; names that could leave the project folder are refused."""
        base = self.semiseg / "pseudo"
        return base / check_name(method, "method", base) / check_name(run, "run", base / method)

    def model_dir(self, method: str, run: str) -> Path:
        """``semiseg/models/<method>/<run>``; names that could leave the project folder are refused."""
        base = self.semiseg / "models"
        return base / check_name(method, "method", base) / check_name(run, "run", base / method)

    @property
    def tmp_dir(self) -> Path:
        """The project's own temp folder (same file system as the labels: a rename into place is atomic)."""
        return self.semiseg / "tmp"

    def lock(self) -> ProjectLock:
        """The writer lock (``with project.lock(): ...``); accept and add_case hold it."""
        return ProjectLock(self.semiseg / "project.lock")

    @property
    def jobs_dir(self) -> Path:
        return self.semiseg / "jobs"

    def history_path(self, case: str) -> Path:
        return self.semiseg / "history" / f"{check_case_name(case)}.jsonl"

    # ---- cases -------------------------------------------------------------------------------------------
    def case_ids(self) -> list[str]:
        return sorted(p.name[: -len(IMAGE_SUFFIX)] for p in (self.root / "imagesTr").glob(f"*{IMAGE_SUFFIX}"))

    def labeled_cases(self) -> list[str]:
        return [c for c in self.case_ids() if self.label_path(c).is_file()]

    def unlabeled_cases(self) -> list[str]:
        return [c for c in self.case_ids() if not self.label_path(c).is_file()]

    def is_labeled(self, case: str) -> bool:
        return self.label_path(case).is_file()

    def read_image(self, case: str) -> Volume:
        return read_volume(self.image_path(case))

    def read_label(self, case: str) -> Volume | None:
        path = self.label_path(case)
        return read_volume(path) if path.is_file() else None

    def image_geometry(self, case: str) -> Volume:
        """The image's size and geometry from its header alone (see :func:`backend.io.volume.read_geometry`)."""
        return read_geometry(self.image_path(case))

    def image_header(self, case: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """``(shape [z, y, x], spacing (x, y, z))`` without reading voxels."""
        geometry = self.image_geometry(case)
        return geometry.shape, tuple(round(s, 6) for s in geometry.spacing)

    def add_case(self, case: str, image: Volume, label: Volume | None = None, *, source: str | Path = "") -> None:
        """Add one case (validated first; nothing is written when it fails)."""
        check_case_name(case, source)
        check_image(image, source)
        with self.lock():
            if self.image_path(case).exists():
                raise InputError(source or case, f"duplicate case '{case}': the project already has it")
            label_array = None if label is None else check_label(label, image, self.labels, source)
            write_volume(image, self.image_path(case))
            if label_array is not None:
                write_volume(image.like(label_array), self.label_path(case))
            write_json_atomic(self.dataset_path, self._dataset_with())

    def _dataset_with(self, *extra_labeled: str) -> dict:
        """``dataset.json`` as on disk, its ``training`` list made of the labeled cases (plus ``extra_labeled``)."""
        dataset = self._read_dataset()  # as on disk: another process may have written it since we opened
        labeled = sorted(set(self.labeled_cases()) | set(extra_labeled))
        dataset["numTraining"] = len(labeled)
        dataset["training"] = [
            {"image": f"./imagesTr/{c}{FILE_ENDING}", "label": f"./labelsTr/{c}{FILE_ENDING}"} for c in labeled
        ]
        self.dataset = dataset
        return dataset

    def _sync_dataset_json(self) -> None:
        write_json_atomic(self.dataset_path, self._dataset_with())

    # ---- the labeled set grows -----------------------------------------------------------------------------
    def label_version(self, case: str) -> str | None:
        """A token that changes whenever ``labelsTr/<case>.nii.gz`` changes on disk (None: no label).

        Every accept renames a new file into place, so its inode, time and size make the token; pass it back
        as ``accept(..., expected_version=...)`` to refuse overwriting a label someone else accepted meanwhile.
        """
        try:
            st = os.stat(self.label_path(case))
        except FileNotFoundError:
            return None
        return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"

    def accept(self, case: str, label: Volume | np.ndarray, *, source: str = "manual", user: str | None = None,
               label_file: str | Path | None = None, extra: dict[str, Any] | None = None,
               expected_version: str | None | object = ANY) -> dict[str, Any]:
        """Validate and write a human-verified label for ``case``; record it in the case's history.

        ``label`` is a :class:`Volume` (checked against the image geometry) or an array in the image's
        ``[z, y, x]`` grid.  ``source`` says where it came from (``"diffrect:rectified"``, a file, ``"manual"``).
        ``expected_version`` (a :meth:`label_version` token, or None for "no label yet"): when given, the accept
        is refused with :class:`LabelConflictError` if the label on disk is no longer that version (checked
        under the project lock).  Returns the history record.

        One transaction under the project lock: the label, its history snapshot, the new history file and the
        new ``dataset.json`` are written and fsynced in ``semiseg/tmp/``; a journal naming them is committed (the
        point of no return); then each is renamed into place and the journal removed.  A crash before the
        journal leaves the project as it was, after it :meth:`recover` completes the renames.
        """
        where = label_file or case
        check_case_name(case, where)
        if not self.image_path(case).is_file():
            raise InputError(where, f"no case '{case}' in project {self.root}")
        image = self.image_geometry(case)  # header only: accepting must not decompress the scan
        if isinstance(label, np.ndarray):
            if label.shape != image.shape:
                raise InputError(where, f"label shape {label.shape} differs from the image's {image.shape}")
            label = image.like(label)
        array, counts = check_label_counts(label, image, self.labels, where)
        with self.lock():
            self._recover_locked()
            if expected_version is not ANY and self.label_version(case) != expected_version:
                raise LabelConflictError(self.label_path(case), f"the label of case '{case}' changed on disk since "
                                                                 f"it was opened; reload the case and accept again")
            history = self.history(case)  # a corrupt history is refused here, before anything is written
            return self._accept_locked(case, image, array, counts, history, source, user, extra)

    def history(self, case: str) -> list[dict[str, Any]]:
        """The case's accept records, oldest first; a corrupt history file is an :class:`InputError`."""
        path = self.history_path(case)
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise InputError(path, f"corrupt history: line {number} is not a JSON record; fix or remove it")
            records.append(record)
        return records

    # ---- runs and scores -----------------------------------------------------------------------------------
    def scores(self, method: str, run: str | None = None) -> dict[str, Any]:
        """``scores.json`` of a run (the latest when ``run`` is None); ``{}`` when there is none."""
        runs = pseudo_runs(self, method)
        if not runs:
            return {}
        run = run or runs[-1]
        path = self.pseudo_dir(method, run) / "scores.json"
        if not path.is_file():
            return {}
        scores = read_json(path, "scores.json")
        if not isinstance(scores, dict) or not isinstance(scores.get("cases", {}), dict):
            raise InputError(path, "corrupt scores.json (no 'cases' table)")
        return scores

    def case_table(self) -> list[dict[str, Any]]:
        """One row per case: labeled or not, shape, spacing, and each method's latest agreement scores."""
        all_scores = {m: self.scores(m) for m in methods_with_pseudo_labels(self)}
        rows = []
        for case in self.case_ids():
            shape, spacing = self.image_header(case)
            row: dict[str, Any] = {"case": case, "labeled": self.is_labeled(case), "shape": list(shape),
                                   "spacing": list(spacing), "scores": {}}
            for method, scores in all_scores.items():
                case_scores = scores.get("cases", {}).get(case)
                if case_scores:
                    row["scores"][method] = {"run": scores.get("run"), "mean": case_scores.get("agreement_mean"),
                                             "worst_class": case_scores.get("agreement_worst")}
            rows.append(row)
        return rows


