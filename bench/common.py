"""What the evaluation benchmarks share: a real brain-tissue task with ground truth for every case, training +
inference of a method, and held-out metrics.

The sample project has only two volumes with GM/WM ground truth (``mni152_t1`` and ``itk_kmeans_t1``), too few for a
labeled set, an unlabeled pool and a test split.  :func:`build_slab_task` cuts each real volume into axial slabs
(each slab keeps its exact geometry: the origin moves along the slice normal) so that every slab is a case with a
real reference label.  Slabs of one volume are correlated, which the reports say.
"""
from __future__ import annotations

import os
import platform
import re
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.project import Project
from backend.project.sample import reference_label_path, sample_root
from backend.io.volume import Volume, read_volume

SOURCES = ("mni152_t1", "itk_kmeans_t1")
# --budget of ssl_gain and review_loop -> (preset, steps); None: the paper's settings
BUDGETS = {"smoke": ("tiny", 100), "small": ("quick", 400), "full": (None, None)}


@dataclass
class SlabTask:
    project: Project
    references: dict[str, Path]  # case -> ground-truth label file (kept outside the project)
    test_cases: list[str]


def _slab(volume: Volume, z0: int, z1: int) -> Volume:
    origin = np.asarray(volume.origin) + volume.direction @ (np.array([0.0, 0.0, z0]) * np.asarray(volume.spacing))
    return Volume(np.ascontiguousarray(volume.array[z0:z1]), volume.spacing, tuple(origin), volume.direction)


def build_slab_task(dest: Path, slabs: int = 3, labeled: int = 1, test: int = 2, seed: int = 0) -> SlabTask:
    """A project of ``2 * slabs`` real slab cases: ``labeled`` of them labeled, ``test`` held out (not in the
    project at all), the rest unlabeled; every case's ground truth is returned in ``references``."""
    shutil.rmtree(dest, ignore_errors=True)
    root = sample_root() / "brain_tissue"
    project = Project.create(dest, labels={0: "background", 1: "GM", 2: "WM"}, modality="MR", name="slabs")
    refs_dir = dest.parent / f"{dest.name}-references"
    shutil.rmtree(refs_dir, ignore_errors=True)
    refs_dir.mkdir(parents=True)
    cases: list[tuple[str, Volume, Volume]] = []
    for source in SOURCES:
        image = read_volume(root / "imagesTr" / f"{source}_0000.nii.gz")
        ref_path = root / "labelsTr" / f"{source}.nii.gz"
        label = read_volume(ref_path if ref_path.is_file() else reference_label_path("brain_tissue", source))
        bounds = np.linspace(0, image.shape[0], slabs + 1).astype(int)
        for i in range(slabs):
            cases.append((f"{source}_slab{i}", _slab(image, bounds[i], bounds[i + 1]),
                          _slab(label, bounds[i], bounds[i + 1])))
    rng = random.Random(seed)
    rng.shuffle(cases)
    references: dict[str, Path] = {}
    test_cases = [c[0] for c in cases[:test]]
    test_dir = dest.parent / f"{dest.name}-test"
    shutil.rmtree(test_dir, ignore_errors=True)
    for index, (case, image, label) in enumerate(cases):
        from backend.io.volume import write_volume

        references[case] = write_volume(label, refs_dir / f"{case}.nii.gz")
        if case in test_cases:
            write_volume(image, test_dir / f"{case}_0000.nii.gz")
            continue
        is_labeled = index < test + labeled
        project.add_case(case, image, label if is_labeled else None)
    return SlabTask(project, references, test_cases)


def build_sample_task(dest: Path) -> SlabTask:
    """The shipped sample task as it is (``sample_data/brain_tissue``: 2 labeled and 2 unlabeled real T1 volumes,
    brain-masked) scored on its held-out cases (``sample_data/heldout``: never in the project, not even unlabeled),
    the same split the pretrained table uses."""
    from backend.project.sample import copy_sample, heldout_cases

    shutil.rmtree(dest, ignore_errors=True)
    project = copy_sample(dest)
    test_dir = dest.parent / f"{dest.name}-test"
    shutil.rmtree(test_dir, ignore_errors=True)
    test_dir.mkdir(parents=True)
    references: dict[str, Path] = {}
    for case, (image, label) in heldout_cases().items():
        shutil.copyfile(image, test_dir / f"{case}_0000.nii.gz")
        references[case] = label
    return SlabTask(project, references, sorted(references))


TASKS = {"sample": build_sample_task, "slabs": build_slab_task}


def evaluate_on_test(task: SlabTask, method: str, run: str, device: str = "auto") -> dict[str, float]:
    """Dice, Jaccard, HD95 and ASD (mm, MONAI) over the held-out slabs and foreground classes.

    Dice and Jaccard average every (slab, class).  A surface distance is undefined where a class is predicted
    but absent from the reference or the other way round (an untrained model that predicts no WM at all):
    HD95 and ASD average the defined pairs only, and ``undefined`` counts the others out of ``pairs``, so that
    a model is not flattered by the classes it missed.
    """
    from backend.engine.inference import load_trained
    from backend.engine.intensity import normalize_intensity
    from backend.engine.metrics import segmentation_metrics
    import torch

    project = task.project
    model, _, _ = load_trained(project, method, run, device=device)
    test_dir = project.root.parent / f"{project.root.name}-test"
    per_pair: dict[str, list[float | None]] = {k: [] for k in ("dice", "jaccard", "hd95", "asd")}
    for case in task.test_cases:
        image = read_volume(test_dir / f"{case}_0000.nii.gz")
        volume = torch.from_numpy(normalize_intensity(image.array, project.modality))[None]
        pred = model.predict(volume)
        ref = read_volume(task.references[case]).array
        metrics = segmentation_metrics(pred, ref, project.num_classes, image.spacing[::-1])
        for key, values in per_pair.items():
            values.extend(metrics[key].values())
    out = {k: float(np.mean([v for v in vals if v is not None])) if any(v is not None for v in vals)
           else float("nan") for k, vals in per_pair.items()}
    out["undefined"] = sum(v is None for v in per_pair["hd95"])
    out["pairs"] = len(per_pair["hd95"])
    return out


def host_kind(device: str = "auto") -> str:
    """A file-name tag for the machine kind a table was measured on: ``cpu-2core``, ``cuda-nvidia-h200``, ``mps``."""
    import torch

    from backend.engine.devices import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")
    if dev.type == "mps":
        return "mps"
    return f"cpu-{os.cpu_count()}core"


def machine_lines(device: str = "auto") -> list[str]:
    """The Markdown header lines every table starts with: device, CPU, threads, versions."""
    import monai
    import torch

    from backend.engine.devices import pick_device

    dev = pick_device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "-"
    return [f"- device: {dev} (GPU: {gpu}); CPU: {cpu}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}",
            f"- python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}, "
            f"CUDA {torch.version.cuda or '-'}"]


def write_result(name: str, text: str, folder: Path | None = None) -> Path:
    """Write a table to ``folder`` (default ``bench/results/``); returns its path."""
    out = (folder or Path(__file__).resolve().parent / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def mean_spread(values: list[float]) -> str:
    """``mean ± std`` over seeds (seeds where the value is undefined left out), or ``undefined``."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return "undefined"
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"
