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

import datetime as _dt
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError, LabelConflictError
from backend.filelock import FileLock
from backend.volume import Volume, fsync_dir, fsync_file, read_geometry, read_volume, write_volume

IMAGE_SUFFIX = "_0000.nii.gz"
FILE_ENDING = ".nii.gz"
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODALITIES = ("MR", "CT", "other")
MAX_LABEL = 255  # labels are stored as uint8
LOCK_TIMEOUT_S = 120.0
JOURNAL = "accept.journal.json"
# The steps of an accept, in order (fault points of the test suite); from COMMIT_STEP on, an interrupted accept
# is completed by recovery, before it, rolled back.
ACCEPT_STEPS = ("label_written", "snapshot_written", "prepared", "journal_committed", "renamed_snapshot",
                "renamed_history", "renamed_label", "renamed_dataset", "journal_removed")
COMMIT_STEP = "journal_committed"
ANY: Any = object()  # ``expected_version`` default of :meth:`Project.accept`: accept whatever is on disk


def check_case_name(case: str, source: str | Path | None = None) -> str:
    """Return ``case`` if it is a safe file name; names that could leave the project folder are refused."""
    if not isinstance(case, str) or not CASE_NAME.match(case) or ".." in case:
        raise InputError(source or case, f"invalid case name '{case}' (letters, digits, '_', '-', '.'; no '..' or '/')")
    return case


def check_name(name: str, what: str, source: str | Path | None = None) -> str:
    """Return a method or run name if it is a safe folder name (same rule as case names)."""
    if not isinstance(name, str) or not CASE_NAME.match(name) or ".." in name:
        raise InputError(source, f"invalid {what} name '{name}' (letters, digits, '_', '-', '.'; no '..' or '/')")
    return name


def _fault_point(step: str) -> None:
    """Test hook of the fault-injection suite: SIGKILL this process when ``SEMISEG_FAULT_AT`` names ``step``."""
    if os.environ.get("SEMISEG_FAULT_AT") == step:  # pragma: no cover - the process dies here
        os.kill(os.getpid(), signal.SIGKILL)


def _new_file(path: Path) -> int:
    """Create ``path`` exclusively with the umask's mode (``tempfile.mkstemp`` would force 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def write_json_atomic(path: Path, data: Any, *, sync_dir: bool = True) -> None:
    """Write JSON to a temp file beside ``path``, fsync it, and rename it over ``path`` (then fsync the folder,
    unless ``sync_dir`` is False: a caller that fsyncs it itself afterwards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(6)}.json"
    try:
        with os.fdopen(_new_file(tmp), "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file the project wrote; a corrupt one is an :class:`InputError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise InputError(path, f"cannot read {what} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(path, f"corrupt {what} ({str(exc).splitlines()[0][:120]})") from exc


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


def check_label_values(values: Any, source: str | Path) -> None:
    """Refuse label values that a uint8 label file cannot hold (negative, over 255, not integers)."""
    bad = []
    for value in values:
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not integer or not 0 <= value <= MAX_LABEL:
            bad.append(value)
    if bad:
        shown = ", ".join(str(int(v)) if isinstance(v, (int, np.integer)) else repr(v) for v in bad[:5])
        raise InputError(source, f"label values must be integers 0..{MAX_LABEL}; found {shown}")


def parse_labels(labels: dict) -> dict[int, str]:
    """Label map ``{value: name}`` from either the Decathlon (``{"0": "background"}``) or nnU-Net v2
    (``{"background": 0}``) form of ``dataset.json``'s ``labels``."""
    out: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and not str(key).isdigit()):
            out[int(value)] = str(key)
        else:
            out[int(key)] = str(value)
    if 0 not in out:
        raise ValueError("labels must declare 0 (background)")
    bad = sorted(v for v in out if not 0 <= v <= MAX_LABEL)
    if bad:
        raise ValueError(f"label values must be 0..{MAX_LABEL} (a label file stores uint8); found {bad}")
    return dict(sorted(out.items()))


def check_image(volume: Volume, source: str | Path) -> None:
    """Refuse images whose intensities hold NaN or infinity."""
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise InputError(source, "image holds NaN or infinite intensities")
    if volume.array.dtype.kind not in "iuf b":
        raise InputError(source, f"unsupported voxel type {volume.array.dtype}")


def label_histogram(array: np.ndarray) -> np.ndarray:
    """Voxel count of each value 0..255 of a uint8 label (in slabs: twice as fast as one ``np.bincount``,
    which would first widen the whole volume to int64)."""
    flat = array.ravel()
    counts = np.zeros(MAX_LABEL + 1, np.int64)
    for start in range(0, flat.size, 1 << 18):
        counts += np.bincount(flat[start:start + (1 << 18)], minlength=MAX_LABEL + 1)
    return counts


def check_label(label: Volume, image: Volume, label_values: dict[int, str], source: str | Path) -> np.ndarray:
    """Validate ``label`` against its ``image`` and the declared values; return it as a uint8 array."""
    return _check_label_counts(label, image, label_values, source)[0]


def _check_label_counts(label: Volume, image: Volume, label_values: dict[int, str],
                        source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    mismatch = image.geometry_mismatch(label)
    if mismatch:
        raise InputError(source, f"label does not match its image: {mismatch}")
    array = label.array
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.mod(array, 1) == 0):
            raise InputError(source, "label holds non-integer values")
    elif array.dtype.kind not in "iub":
        raise InputError(source, f"label has unsupported voxel type {array.dtype}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > MAX_LABEL:
        values = np.unique(array[(array < 0) | (array > MAX_LABEL)])
        shown = ", ".join(str(int(v)) for v in values[:5])
        raise InputError(source, f"label values must be integers 0..{MAX_LABEL}; found {shown}")
    array = np.array(array, dtype=np.uint8)  # a copy: the caller may go on editing its array
    counts = label_histogram(array)  # within 0..255: a histogram is ten times faster than np.unique
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - set(label_values))
    if unknown:
        raise InputError(source, f"label values {unknown} are not declared in dataset.json {sorted(label_values)}")
    return array, counts


class Project:
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
        """The image's size and geometry from its header alone (see :func:`backend.volume.read_geometry`)."""
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
        array, counts = _check_label_counts(label, image, self.labels, where)
        with self.lock():
            self._recover_locked()
            if expected_version is not ANY and self.label_version(case) != expected_version:
                raise LabelConflictError(self.label_path(case), f"the label of case '{case}' changed on disk since "
                                                                 f"it was opened; reload the case and accept again")
            history = self.history(case)  # a corrupt history is refused here, before anything is written
            return self._accept_locked(case, image, array, counts, history, source, user, extra)

    def _accept_locked(self, case: str, image: Volume, array: np.ndarray, counts: np.ndarray,
                       history: list[dict[str, Any]], source: str, user: str | None,
                       extra: dict[str, Any] | None) -> dict[str, Any]:
        previous = self.read_label(case)
        now = _dt.datetime.now(_dt.timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        counts = counts[: self.num_classes]
        tx = f"{stamp}-{secrets.token_hex(4)}"
        record: dict[str, Any] = {
            "time": now.isoformat(),
            "case": case,
            "source": source,
            "user": user or _user_name(),
            "voxels_per_class": {self.labels.get(i, str(i)): int(n) for i, n in enumerate(counts)},
            "voxels_changed": int(array.size if previous is None else np.count_nonzero(previous.array != array)),
            "snapshot": f"{case}/{stamp}{FILE_ENDING}",
            "tx": tx,
        }
        record.update(extra or {})
        tmp = self.tmp_dir
        tmp.mkdir(parents=True, exist_ok=True)
        names = {key: f"{tx}.{key}{suffix}" for key, suffix in
                 (("label", FILE_ENDING), ("snapshot", FILE_ENDING), ("history", ".jsonl"), ("dataset", ".json"))}
        try:
            write_volume(image.like(array), tmp / names["label"], sync_dir=False)  # the journal syncs tmp/
            _fault_point("label_written")
            shutil.copyfile(tmp / names["label"], tmp / names["snapshot"])  # the same bytes, no second compression
            fsync_file(tmp / names["snapshot"])
            _fault_point("snapshot_written")
            lines = "".join(json.dumps(r) + "\n" for r in [*history, record])
            with os.fdopen(_new_file(tmp / names["history"]), "w") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
            write_json_atomic(tmp / names["dataset"], self._dataset_with(case), sync_dir=False)
            _fault_point("prepared")
            write_json_atomic(tmp / JOURNAL, {"tx": tx, "case": case, "files": names, "snapshot": record["snapshot"]})
        except OSError as exc:  # a full disk, a read-only folder: roll back, nothing changed
            self._clean_tmp()
            raise InputError(tmp, f"cannot write ({exc.strerror or exc}); nothing was changed") from exc
        except BaseException:
            self._clean_tmp()
            raise
        _fault_point("journal_committed")
        self._apply_journal()
        return record

    def _journal_targets(self, journal: dict[str, Any]) -> list[tuple[str, Path]]:
        case = check_case_name(journal["case"], self.tmp_dir / JOURNAL)
        snapshot = self.semiseg / "history" / journal["snapshot"]
        if snapshot.parent.name != case or ".." in journal["snapshot"]:
            raise InputError(self.tmp_dir / JOURNAL, "corrupt journal (snapshot outside the case's history)")
        return [("snapshot", snapshot), ("history", self.history_path(case)), ("label", self.label_path(case)),
                ("dataset", self.dataset_path)]

    def _apply_journal(self) -> None:
        """Rename a committed accept's files into place (idempotent: a file already moved is skipped)."""
        tmp = self.tmp_dir
        journal = read_json(tmp / JOURNAL, "accept journal")
        try:
            targets = self._journal_targets(journal)
            files = {key: tmp / Path(journal["files"][key]).name for key, _ in targets}
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(tmp / JOURNAL, f"corrupt accept journal ({exc})") from exc
        for key, target in targets:
            if files[key].exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(files[key], target)
            _fault_point(f"renamed_{key}")
        for folder in dict.fromkeys(target.parent for _, target in targets):
            fsync_dir(folder)  # every rename on disk before the journal goes (else recovery replays them)
        (tmp / JOURNAL).unlink()
        self.dataset = self._read_dataset()
        _fault_point("journal_removed")

    def _clean_tmp(self) -> list[str]:
        """Remove every temp file of the project (call under the lock, with no journal to complete)."""
        removed = []
        folders = [self.tmp_dir, self.root, self.root / "imagesTr", self.root / "labelsTr", self.semiseg / "history"]
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if (folder == self.tmp_dir or entry.name.startswith(".tmp-")) and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.path)
        return removed

    def _has_leftovers(self) -> bool:
        try:
            if any(os.scandir(self.tmp_dir)):
                return True
        except OSError:
            pass
        for folder in (self.root, self.root / "labelsTr", self.root / "imagesTr"):
            try:
                if any(e.name.startswith(".tmp-") for e in os.scandir(folder)):
                    return True
            except OSError:
                continue
        return False

    def _recover_locked(self) -> list[str]:
        done = []
        if (self.tmp_dir / JOURNAL).is_file():
            self._apply_journal()
            done.append("completed an interrupted accept")
        removed = self._clean_tmp()
        if removed:
            done.append(f"removed {len(removed)} stale temp files")
        return done

    def recover(self) -> list[str]:
        """Complete (journal committed) or roll back (not committed) an accept a crash interrupted, and remove
        stale temp files.  Cheap when there is nothing to do; skipped while another process holds the lock (its
        accept is alive and finishes itself).  Returns what was done, for a log line."""
        if not self._has_leftovers():
            return []
        lock = self.lock()
        if not lock.acquire(timeout=0):
            return []
        try:
            return self._recover_locked()
        finally:
            lock.release()

    def verify(self) -> list[str]:
        """What is inconsistent on disk (empty when nothing is): leftover temp files or journal, ``dataset.json``
        not listing exactly the labeled cases, unreadable labels or history, a label that differs from the
        snapshot its last history record names.  Used by the fault-injection tests and ``bench/faults.py``."""
        problems = []
        if self._has_leftovers():
            problems.append("temp files or an accept journal left over")
        labeled = self.labeled_cases()
        dataset = read_json(self.dataset_path, "dataset.json")
        listed = sorted(Path(item["label"]).name[: -len(FILE_ENDING)] for item in dataset.get("training", []))
        if listed != labeled or dataset.get("numTraining") != len(labeled):
            problems.append(f"dataset.json lists {listed}, labelsTr holds {labeled}")
        for case in labeled:
            try:
                history = self.history(case)
                read_volume(self.label_path(case))
            except InputError as exc:
                problems.append(str(exc))
                continue
            if not history:
                continue  # a label imported with the project (init) has no history
            snapshot = self.semiseg / "history" / history[-1]["snapshot"]
            if not snapshot.is_file():
                problems.append(f"{case}: the snapshot of its last accept is missing")
            elif snapshot.read_bytes() != self.label_path(case).read_bytes():
                problems.append(f"{case}: the label differs from the snapshot of its last accept")
        return problems

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
    def runs(self, method: str) -> list[str]:
        """Runs of ``method`` that have pseudo labels, oldest first (run names sort by time)."""
        folder = self.semiseg / "pseudo" / method
        return sorted(p.name for p in folder.iterdir() if (p / "scores.json").is_file()) if folder.is_dir() else []

    def methods_with_pseudo_labels(self) -> list[str]:
        folder = self.semiseg / "pseudo"
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and self.runs(p.name)) if folder.is_dir() else []

    def scores(self, method: str, run: str | None = None) -> dict[str, Any]:
        """``scores.json`` of a run (the latest when ``run`` is None); ``{}`` when there is none."""
        runs = self.runs(method)
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
        all_scores = {m: self.scores(m) for m in self.methods_with_pseudo_labels()}
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


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return os.environ.get("USER", "unknown")
