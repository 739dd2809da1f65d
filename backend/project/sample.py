"""The real sample projects shipped with the package (``sample_data/`` in the repository), and the small
pretrained checkpoints shipped for them (``sample_data/pretrained/<task>/<method>/``).

The pretrained checkpoints are ordinary training runs of the engine (written by
``sample_data/train_pretrained.py`` on the sample's labeled cases), slimmed for shipping: the networks' weights
stored as float16 (loaded into the float32 networks), no optimizer state.  :func:`install_pretrained` copies
them into a project as the run :data:`PRETRAINED_RUN` of every method, so inference, the review dock and
``semiseg infer`` use them like any trained run; training a new run does not touch them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from backend.errors import InputError
from backend.io.atomic import write_json_atomic
from backend.project import Project

# The run name of the shipped checkpoints in a project.  Run names sort by time (UTC timestamps such as
# 20261203-190501 are what training writes, and the latest run is the last name), so this one starts with "0":
# it sorts before every trained run, and a run the user trains is always the latest.
PRETRAINED_RUN = "0-pretrained"
RUN_FILES = ("checkpoint.pt", "config.json", "run.json")


def sample_root() -> Path:
    from semiseg_sample_data import ROOT

    return ROOT


def reference_label_path(task: str, case: str) -> Path | None:
    """The held-aside ground truth of an unlabeled sample case (benchmarks play the clinician with it)."""
    path = sample_root() / "reference" / task / f"{case}.nii.gz"
    return path if path.is_file() else None


def heldout_cases(task: str = "brain_tissue") -> dict[str, tuple[Path, Path]]:
    """The sample's held-out cases, ``case -> (image, label)`` paths (``heldout/<task>/{imagesTs,labelsTs}``):
    never part of the project, never trained on (not even as unlabeled images); benchmarks score on them."""
    root = sample_root() / "heldout" / task
    images = sorted((root / "imagesTs").glob("*_0000.nii.gz")) if root.is_dir() else []
    return {p.name[: -len("_0000.nii.gz")]: (p, root / "labelsTs" / p.name.replace("_0000", "")) for p in images}


def add_heldout(project: Project, task: str = "brain_tissue") -> list[str]:
    """Add the held-out cases of sample ``task`` to ``project`` as unlabeled cases (benchmarks infer them there);
    return their names. Their labels stay outside (read them with :func:`heldout_cases`)."""
    from backend.io.volume import read_volume

    cases = heldout_cases(task)
    for case, (image, _) in cases.items():
        project.add_case(case, read_volume(image), source=image)
    return list(cases)


def pretrained_root(task: str = "brain_tissue") -> Path:
    """``sample_data/pretrained/<task>``: one folder per method with ``checkpoint.pt``, ``config.json``,
    ``run.json``."""
    return sample_root() / "pretrained" / task


def pretrained_methods(task: str = "brain_tissue", source: Path | None = None) -> list[str]:
    """Methods with a shipped checkpoint for sample ``task`` (sorted; [] when none is shipped).  ``source``:
    another folder laid out as :func:`pretrained_root` (the training script checks what it wrote)."""
    root = pretrained_root(task) if source is None else Path(source)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if all((p / name).is_file() for name in RUN_FILES))


def install_pretrained(project: Project, task: str = "brain_tissue", methods: list[str] | None = None,
                       source: Path | None = None) -> dict[str, str]:
    """Copy the shipped checkpoints of sample ``task`` into ``project`` as run :data:`PRETRAINED_RUN` of each
    method (``methods``: a subset; default all shipped); return ``{method: run}`` of the runs installed.

    The project must hold the sample's cases: a shipped run names the labeled cases it was trained on, and they
    must be labeled here.  A method that already has the run keeps it (nothing is overwritten).
    """
    root = pretrained_root(task) if source is None else Path(source)
    shipped = pretrained_methods(task, root)
    wanted = shipped if methods is None else [m for m in methods if m in shipped]
    installed: dict[str, str] = {}
    for method in wanted:
        src = root / method
        info = json.loads((src / "run.json").read_text())
        missing = [c for c in info.get("labeled_cases", []) if not project.is_labeled(c)]
        if missing:
            raise InputError(project.root, f"the pretrained '{method}' run was trained on {', '.join(missing)}, "
                                           "which this project does not have labeled")
        dest = project.model_dir(method, PRETRAINED_RUN)
        if not (dest / "checkpoint.pt").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "checkpoint.pt", dest / ".checkpoint.pt.tmp")
            shutil.copyfile(src / "config.json", dest / "config.json")
            info.update(run=PRETRAINED_RUN, unlabeled_cases=project.unlabeled_cases(),
                        unlabeled_count=len(project.unlabeled_cases()))
            write_json_atomic(dest / "run.json", info)
            (dest / ".checkpoint.pt.tmp").replace(dest / "checkpoint.pt")  # last: a run with a checkpoint is whole
        installed[method] = PRETRAINED_RUN
    return installed


def copy_sample(dest: str | Path, task: str = "brain_tissue", *, pretrained: bool = False) -> Project:
    """Copy sample project ``task`` to ``dest`` (which must not exist or be empty) and open it; with
    ``pretrained``, also install the shipped checkpoints (:func:`install_pretrained`)."""
    from semiseg_sample_data import TASKS

    if task not in TASKS:
        raise InputError(None, f"no sample task '{task}' (tasks: {', '.join(TASKS)})")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(dest, "destination exists and is not empty")
    shutil.copytree(sample_root() / task, dest, dirs_exist_ok=True)
    (dest / "semiseg").mkdir(exist_ok=True)
    project = Project.open(dest)
    if pretrained:
        install_pretrained(project, task)
    return project
