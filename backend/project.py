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

Every label is validated against its image (shape, geometry, declared values) before it is written, and
written atomically (see :func:`backend.volume.write_volume`).
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import InputError
from backend.volume import Volume, read_geometry, read_volume, write_volume

IMAGE_SUFFIX = "_0000.nii.gz"
FILE_ENDING = ".nii.gz"
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODALITIES = ("MR", "CT", "other")


def check_case_name(case: str, source: str | Path | None = None) -> str:
    """Return ``case`` if it is a safe file name; names that could leave the project folder are refused."""
    if not CASE_NAME.match(case) or ".." in case:
        raise InputError(source or case, f"invalid case name '{case}' (letters, digits, '_', '-', '.'; no '..' or '/')")
    return case


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return dict(sorted(out.items()))


def check_image(volume: Volume, source: str | Path) -> None:
    """Refuse images whose intensities hold NaN or infinity."""
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise InputError(source, "image holds NaN or infinite intensities")
    if volume.array.dtype.kind not in "iuf b":
        raise InputError(source, f"unsupported voxel type {volume.array.dtype}")


def check_label(label: Volume, image: Volume, label_values: dict[int, str], source: str | Path) -> np.ndarray:
    """Validate ``label`` against its ``image`` and the declared values; return it as a uint8 array."""
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
    if lo >= 0 and hi <= 255:  # the usual case: a histogram is ten times faster than np.unique
        array = array.astype(np.uint8, copy=False)
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=hi + 1))
    else:
        values = np.unique(array)
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(label_values))
    if unknown:
        raise InputError(source, f"label values {unknown} are not declared in dataset.json {sorted(label_values)}")
    return array.astype(np.uint8)


class Project:
    """A project folder.  Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.dataset_path = self.root / "dataset.json"
        if not self.dataset_path.is_file():
            raise InputError(self.root, "not a project folder (no dataset.json)")
        try:
            self.dataset: dict = json.loads(self.dataset_path.read_text())
            self.labels = parse_labels(self.dataset["labels"])
        except (ValueError, KeyError) as exc:
            raise InputError(self.dataset_path, f"invalid dataset.json ({exc})") from exc

    # ---- creation ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, *, labels: dict[int, str], modality: str = "MR", name: str | None = None,
               description: str = "") -> "Project":
        root = Path(root)
        if (root / "dataset.json").exists():
            raise InputError(root, "already a project (dataset.json exists)")
        labels = dict(sorted({int(k): str(v) for k, v in labels.items()}.items()))
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
        return cls(root)

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
        return self.semiseg / "pseudo" / method / run

    def model_dir(self, method: str, run: str) -> Path:
        return self.semiseg / "models" / method / run

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
        if self.image_path(case).exists():
            raise InputError(source or case, f"duplicate case '{case}': the project already has it")
        check_image(image, source)
        label_array = None if label is None else check_label(label, image, self.labels, source)
        write_volume(image, self.image_path(case))
        if label_array is not None:
            write_volume(image.like(label_array), self.label_path(case))
        self._sync_dataset_json()

    def _sync_dataset_json(self) -> None:
        labeled = self.labeled_cases()
        self.dataset["numTraining"] = len(labeled)
        self.dataset["training"] = [
            {"image": f"./imagesTr/{c}{FILE_ENDING}", "label": f"./labelsTr/{c}{FILE_ENDING}"} for c in labeled
        ]
        write_json_atomic(self.dataset_path, self.dataset)

    # ---- the labeled set grows -----------------------------------------------------------------------------
    def accept(self, case: str, label: Volume | np.ndarray, *, source: str = "manual", user: str | None = None,
               label_file: str | Path | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Validate and write a human-verified label for ``case``; record it in the case's history.

        ``label`` is a :class:`Volume` (checked against the image geometry) or an array in the image's
        ``[z, y, x]`` grid.  ``source`` says where it came from (``"diffrect:rectified"``, a file, ``"manual"``).
        Returns the history record.
        """
        where = label_file or case
        check_case_name(case, where)
        if case not in self.case_ids():
            raise InputError(where, f"no case '{case}' in project {self.root}")
        image = self.image_geometry(case)  # header only: accepting must not decompress the scan
        if isinstance(label, np.ndarray):
            if label.shape != image.shape:
                raise InputError(where, f"label shape {label.shape} differs from the image's {image.shape}")
            label = image.like(label)
        array = check_label(label, image, self.labels, where)
        previous = self.read_label(case)
        now = _dt.datetime.now(_dt.timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        counts = np.bincount(array.ravel(), minlength=self.num_classes)
        record: dict[str, Any] = {
            "time": now.isoformat(),
            "case": case,
            "source": source,
            "user": user or _user_name(),
            "voxels_per_class": {self.labels.get(i, str(i)): int(n) for i, n in enumerate(counts)},
            "voxels_changed": int(array.size if previous is None else np.count_nonzero(previous.array != array)),
            "snapshot": f"{case}/{stamp}{FILE_ENDING}",
        }
        record.update(extra or {})
        path = write_volume(image.like(array), self.label_path(case))
        history = self.history_path(case)
        snapshot = history.parent / record["snapshot"]
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, snapshot)  # the bytes just written, not a second compression
        with open(history, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._sync_dataset_json()
        return record

    def history(self, case: str) -> list[dict[str, Any]]:
        path = self.history_path(case)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

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
        return json.loads(path.read_text()) if path.is_file() else {}

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
