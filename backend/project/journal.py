"""The accept transaction of :meth:`backend.project.Project.accept` and its crash recovery.

Every new file is written and fsynced in ``semiseg/tmp/``; a journal naming them is committed (the point of no
return); then each is renamed into place and the journal removed.  After a crash :meth:`AcceptJournal.recover`
completes a committed accept and rolls back one that was not, and removes stale temp files.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError
from backend.io.atomic import fsync_dir, fsync_file, new_file, read_json, write_json_atomic
from backend.io.volume import Volume, read_volume, write_volume
from backend.project.checks import FILE_ENDING, check_case_name

JOURNAL = "accept.journal.json"
# The steps of an accept, in order (fault points of the test suite); from COMMIT_STEP on, an interrupted accept
# is completed by recovery, before it, rolled back.
ACCEPT_STEPS = ("label_written", "snapshot_written", "prepared", "journal_committed", "renamed_snapshot",
                "renamed_history", "renamed_label", "renamed_dataset", "journal_removed")
COMMIT_STEP = "journal_committed"


def _fault_point(step: str) -> None:
    """Test hook of the fault-injection suite: SIGKILL this process when ``SEMISEG_FAULT_AT`` names ``step``."""
    if os.environ.get("SEMISEG_FAULT_AT") == step:  # pragma: no cover - the process dies here
        os.kill(os.getpid(), signal.SIGKILL)



class AcceptJournal:
    """The journaled accept and recovery of a :class:`backend.project.Project` (its base class)."""

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
            "user": user or user_name(),
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
            with os.fdopen(new_file(tmp / names["history"]), "w") as handle:
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



def user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return os.environ.get("USER", "unknown")
