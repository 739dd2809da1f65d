"""The real sample projects shipped with the package (``sample_data/`` in the repository)."""
from __future__ import annotations

import shutil
from pathlib import Path

from backend.errors import InputError
from backend.project import Project


def sample_root() -> Path:
    from semiseg_sample_data import ROOT

    return ROOT


def reference_label_path(task: str, case: str) -> Path | None:
    """The held-aside ground truth of an unlabeled sample case (benchmarks play the clinician with it)."""
    path = sample_root() / "reference" / task / f"{case}.nii.gz"
    return path if path.is_file() else None


def copy_sample(dest: str | Path, task: str = "brain_tissue") -> Project:
    """Copy sample project ``task`` to ``dest`` (which must not exist or be empty) and open it."""
    from semiseg_sample_data import TASKS

    if task not in TASKS:
        raise InputError(None, f"no sample task '{task}' (tasks: {', '.join(TASKS)})")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(dest, "destination exists and is not empty")
    shutil.copytree(sample_root() / task, dest, dirs_exist_ok=True)
    (dest / "semiseg").mkdir(exist_ok=True)
    return Project.open(dest)
