"""The training loop every method shares: data, learning rate, checkpoints, validation, events, cancel, resume.

A run lives in ``semiseg/models/<method>/<run>/``:

* ``checkpoint.pt``: ``{"format", "method_name", "method": Method.state_dict(), "step", "config", "rng",
  "sampler"}``, plain containers and tensors only, so it loads with ``torch.load(..., weights_only=True)``;
  written to a temp file and renamed, so a crash never leaves half a checkpoint.
* ``best.pt``: the same contents at the validation whose mean Dice is the highest so far (written, atomically,
  each time validation improves; ``run.json`` records ``{"best": {"step", "dice"}}``).  Inference uses it by
  default (:func:`best_run`, ``backend.engine.inference.load_trained``): a run that overfits or collapses late keeps
  its best weights.
* ``config.json``: the method config; ``run.json``: method, preset, cases, device, status
  (``running``/``done``/``cancelled``/``failed``), steps done; ``metrics.jsonl``: one line per logged step
  (``{"type": "train", "step", "lr", <losses>}``) and per validation (``{"type": "validation", "step", "dice",
  "mean"}``).

Steps are counted from 1 in events, files and checkpoints (``step`` = steps done); ``Method.train_step`` and
``Method.lr_at`` get the 0-based index of the step being taken.

Determinism: python, numpy and torch are seeded from ``config.seed`` before the networks are built, batches are
a pure function of ``(seed, step)`` (see :mod:`backend.engine.data`), and validation runs under a forked torch RNG so it
never shifts the training stream.  On the CPU a run cancelled and resumed ends bit-identical to an
uninterrupted one.  On CUDA cuDNN autotuning is on (speed first), so runs agree only to float tolerance.

CPU threads: :func:`backend.engine.devices.cpu_thread_policy` (one fewer than the cores, measured reason there).

Data-parallel training (``torch.distributed`` initialised by :mod:`backend.engine.distributed`): see
:func:`distributed_setup` for why methods are not wrapped in ``DistributedDataParallel``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backend.engine.data import CaseArrays, load_case, make_sampler
from backend.engine.checkpoints import (RunFiles, load_checkpoint, save_checkpoint, seed_everything,
                                       set_rng_state)
from backend.engine.devices import cpu_thread_policy, pick_device
from backend.engine.distributed import any_rank, broadcast_buffers, dist_info, distributed_setup
from backend.errors import InputError
from backend.methods import get_method
from backend.methods.base import BaseConfig, Method
from backend.engine.metrics import dice_per_class
from backend.io.atomic import read_json, write_json_atomic
from backend.project import Project
from backend.project.runs import CHECKPOINT, latest_run, new_run_name

PROGRESS_INTERVAL_S = 0.5  # progress events at most twice a second (plus the first and the last step)
MAX_LOG_LINES = 2000  # metrics.jsonl holds about this many training lines per run (losses averaged between)


Event = Callable[[dict], None]


# ---- validation ------------------------------------------------------------------------------------------------
def validate(method: Method, cases: list[CaseArrays], labels: dict[int, str]) -> dict[str, Any]:
    """Whole-volume Dice (MONAI ``compute_dice``, the function behind ``DiceMetric``) per foreground class,
    averaged over ``cases``.  Runs under a forked torch RNG (stochastic predictors leave training untouched)."""
    num_classes = method.config.num_classes
    scores = []
    devices = [method.device.index or 0] if method.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        method.eval()
        try:
            for case in cases:
                pred = method.predict(torch.from_numpy(case.image))
                scores.append(dice_per_class(pred, case.label, num_classes))
        finally:
            method.train()
    mean_per_class = np.mean(scores, axis=0) if scores else np.zeros(num_classes - 1)
    dice = {labels.get(k, str(k)): round(float(v), 6) for k, v in zip(range(1, num_classes), mean_per_class)}
    return {"dice": dice, "mean": round(float(np.mean(mean_per_class)), 6) if len(mean_per_class) else None}


# ---- the loop --------------------------------------------------------------------------------------------------
def split_labeled(labeled: list[str], seed: int, hold_out_from: int | None = 5
                  ) -> tuple[list[str], list[str], bool]:
    """``(train cases, validation cases, val_on_train)``: from ``hold_out_from`` labeled cases on one of them,
    picked by ``seed``, is held out for validation; below that (or with None) every case is trained on and
    validated on (see ``BaseConfig.hold_out_from``)."""
    if hold_out_from is not None and len(labeled) >= max(2, hold_out_from):
        held = random.Random(seed).choice(labeled)
        return [c for c in labeled if c != held], [held], False
    return list(labeled), list(labeled), True


def _split_cases(project: Project, config: BaseConfig) -> dict[str, Any]:
    """Labeled cases to train on and to validate on; every unlabeled case for the unlabeled stream."""
    labeled = project.labeled_cases()
    if not labeled:
        raise InputError(project.root, "no labeled case: label (accept) at least one case before training")
    train_cases, val_cases, val_on_train = split_labeled(labeled, config.seed, config.hold_out_from)
    return {"labeled_cases": train_cases, "val_cases": val_cases, "val_on_train": val_on_train,
            "unlabeled_cases": project.unlabeled_cases()}


def train(project: Project | str | Path, method: str, *, preset: str | None = "quick", steps: int | None = None,
          device: str = "auto", run: str | None = None, resume: bool = False, overrides: dict | None = None,
          on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None) -> str:
    """Train ``method`` on the project's labeled (and unlabeled) cases; return the run name.

    ``preset`` picks the method's preset (None: the paper's defaults), ``overrides`` change config fields on
    top, ``steps`` sets ``config.max_steps`` (so the poly schedule ends with the run).  ``run`` names a new run
    (default: a UTC timestamp); with ``resume=True`` it names the run to continue (default: the latest), whose
    saved config and case split are reused, ``steps`` may extend it.  ``on_event`` receives ``start``,
    ``progress``, ``validation``, ``checkpoint``, ``done`` and ``cancelled`` events; ``should_stop`` is polled
    every step and, when it returns True, the run checkpoints, is marked ``cancelled`` and returns.
    """
    return train_method(project, method, preset=preset, steps=steps, device=device, run=run, resume=resume,
                        overrides=overrides, on_event=on_event, should_stop=should_stop)[0]


def train_method(project: Project | str | Path, method: str, *, preset: str | None = "quick",
                 steps: int | None = None, device: str = "auto", run: str | None = None, resume: bool = False,
                 overrides: dict | None = None, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[str, Method]:
    """:func:`train`, returning ``(run name, the trained method instance)``."""
    dev = pick_device(device)
    with cpu_thread_policy(dev) as threads:
        return _train_method(project, method, preset=preset, steps=steps, dev=dev, threads=threads, run=run,
                             resume=resume, overrides=overrides, on_event=on_event, should_stop=should_stop)


@dataclasses.dataclass
class _Setup:
    """What a run starts from: its config, preset, case split, name and files (and, resuming, its checkpoint)."""

    config: BaseConfig
    preset: str | None
    split: dict[str, Any]
    run: str
    files: RunFiles
    ckpt: dict[str, Any] | None = None


def _resume_setup(project: Project, cls: type[Method], method: str, run: str | None, steps: int | None,
                  overrides: dict) -> _Setup:
    """The saved config (``overrides`` on top, ``steps`` extends it) and case split of the run to continue."""
    run = run or latest_run(project, method)
    files = RunFiles(project.model_dir(method, run))
    if not files.checkpoint.is_file():
        raise InputError(files.folder, f"run '{run}' of '{method}' has no checkpoint to resume from")
    info = read_json(files.run_json, "run.json")
    saved = read_json(files.folder / "config.json", "config.json")
    saved.update({k: v for k, v in overrides.items() if v is not None})
    config = cls.config_class.from_dict(saved)
    if steps is not None:
        config.max_steps = int(steps)
    split = {k: info[k] for k in ("labeled_cases", "val_cases", "val_on_train", "unlabeled_cases")}
    missing = [c for c in split["labeled_cases"] + split["val_cases"] if not project.is_labeled(c)]
    if missing:
        raise InputError(project.root, f"cases {missing} of run '{run}' are no longer labeled")
    return _Setup(config, info.get("preset"), split, run, files, load_checkpoint(files.checkpoint))


def _new_setup(project: Project, cls: type[Method], method: str, preset: str | None, run: str | None,
               steps: int | None, overrides: dict, rank: int, world: int) -> _Setup:
    """A new run: the preset's config (``steps`` rescales every run-length schedule), the case split, and the run
    folder claimed by rank 0 (its name broadcast to the other ranks)."""
    config = cls.make_config(preset, **overrides)
    config.num_classes = project.num_classes
    config.in_channels = 1
    if steps is not None:  # a shortened (or longer) paper run: every run-length schedule scales with it
        config = config.with_steps(int(steps))
    if config.max_steps < 1:
        raise InputError(None, f"steps must be at least 1 (got {config.max_steps})")
    split = _split_cases(project, config)
    if rank == 0:
        if run is None:
            run = new_run_name(project, method)
        else:
            folder = project.model_dir(method, run)
            if (folder / CHECKPOINT).exists() or (folder / "run.json").exists():
                raise InputError(folder, f"run '{run}' exists; resume it (--resume) or pick another name")
            folder.mkdir(parents=True, exist_ok=True)
    if world > 1:
        import torch.distributed as dist

        box = [run]
        dist.broadcast_object_list(box, src=0)
        run = box[0]
    return _Setup(config, preset, split, run, RunFiles(project.model_dir(method, run)))


class _Recorder:
    """Rank 0's bookkeeping of a run: ``run.json``, ``metrics.jsonl``, checkpoints, the best weights, events.
    On other ranks every method is a no-op (only rank 0 writes)."""

    def __init__(self, project: Project, method: str, model: Method, setup: _Setup, sampler: Any,
                 val_data: list[CaseArrays], rank: int, emit: Event) -> None:
        self.project, self.method, self.model, self.sampler = project, method, model, sampler
        self.files, self.split, self.val_data, self.rank, self.emit = setup.files, setup.split, val_data, rank, emit
        self.info: dict[str, Any] = {}

    def begin(self, info: dict[str, Any], config: BaseConfig, start: int, resume: bool) -> None:
        """Write the run's ``config.json`` and ``run.json``; resuming, keep what predates the checkpoint (its
        start time, last validation, best weights) and drop what came after it."""
        self.info = info
        if self.rank != 0:
            return
        files = self.files
        files.folder.mkdir(parents=True, exist_ok=True)
        if resume:
            previous = json.loads(files.run_json.read_text())
            info["started"] = previous.get("started", info["started"])
            last_val = previous.get("last_validation")
            info["last_validation"] = last_val if last_val and last_val.get("step", 0) <= start else None
            best = previous.get("best")
            if best and best.get("step", 0) <= start and files.best.is_file():
                info["best"] = best
            else:  # a best from past the checkpoint belongs to the discarded continuation
                files.best.unlink(missing_ok=True)
            files.truncate_metrics(start)
        else:
            files.metrics.unlink(missing_ok=True)
            files.best.unlink(missing_ok=True)
        write_json_atomic(files.folder / "config.json", json.loads(config.to_json()))
        write_json_atomic(files.run_json, info)

    def update(self, **changes: Any) -> None:
        if self.rank == 0:
            self.info.update(changes, updated=_now())
            write_json_atomic(self.files.run_json, self.info)

    def log_train(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.files.append_metrics(record)

    def checkpoint(self, step: int) -> None:
        if self.rank == 0:
            path = save_checkpoint(self.files, self.model, self.method, step, self.sampler.state_dict())
            self.update(steps_done=step)
            self.emit({"type": "checkpoint", "step": step, "path": str(path)})

    def validate(self, step: int) -> None:
        """Validate; when the mean Dice is the first or strictly the best so far, keep these weights as ``best.pt``."""
        if self.rank != 0:
            return
        result = validate(self.model, self.val_data, self.project.labels)
        record = {"type": "validation", "step": step, **result, "val_on_train": self.split["val_on_train"]}
        self.files.append_metrics(record)
        best = self.info.get("best")
        if result["mean"] is not None and (not best or result["mean"] > best["dice"]):
            save_checkpoint(self.files, self.model, self.method, step, self.sampler.state_dict(),
                            path=self.files.best)
            record = {**record, "best": True}
            self.update(last_validation=record, best={"step": step, "dice": result["mean"]})
        else:
            self.update(last_validation=record)
        self.emit(record)


def _train_method(project: Project | str | Path, method: str, *, preset: str | None, steps: int | None,
                  dev: torch.device, threads: int, run: str | None, resume: bool, overrides: dict | None,
                  on_event: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None
                  ) -> tuple[str, Method]:
    project = project if isinstance(project, Project) else Project.open(project)
    cls = get_method(method)
    rank, world = dist_info()
    emit: Event = on_event if (on_event is not None and rank == 0) else (lambda event: None)
    overrides = dict(overrides or {})
    if steps is not None and int(steps) < 1:
        raise InputError(None, f"steps must be at least 1 (got {steps})")
    setup = (_resume_setup(project, cls, method, run, steps, overrides) if resume
             else _new_setup(project, cls, method, preset, run, steps, overrides, rank, world))
    config, split, run = setup.config, setup.split, setup.run

    # ---- method, data ----
    seed_everything(config.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = cls(config, dev)
    if world > 1 and rank > 0:
        torch.manual_seed(config.seed + rank)  # different dropout / noise per rank
    cache: dict[str, CaseArrays] = {}
    sampler = make_sampler(project, config, split["labeled_cases"], split["unlabeled_cases"],
                           seed=config.seed + 1_000_003 * rank, device=dev, cache=cache)
    val_data = [cache[c] if c in cache else load_case(project, c, config=config)
                for c in split["val_cases"]] if rank == 0 else []
    start = 0
    if setup.ckpt is not None:
        model.load_state_dict(setup.ckpt["method"])
        start = int(setup.ckpt["step"])
        sampler.index = int(setup.ckpt.get("sampler", {}).get("index", start))
        if rank == 0:
            set_rng_state(setup.ckpt["rng"], dev)
        else:
            torch.manual_seed(config.seed + rank + start)
        setup.ckpt = None
    if world > 1:
        distributed_setup(model, world)

    cpu_threads = threads if dev.type == "cpu" else None
    recorder = _Recorder(project, method, model, setup, sampler, val_data, rank, emit)
    recorder.begin({
        "method": method, "preset": setup.preset, "run": run,
        "labeled_cases": split["labeled_cases"], "labeled_count": len(split["labeled_cases"]),
        "val_cases": split["val_cases"], "val_on_train": split["val_on_train"],
        "unlabeled_cases": split["unlabeled_cases"], "unlabeled_count": len(split["unlabeled_cases"]),
        "unlabeled_from_labeled": sampler.unlabeled_from_labeled,
        "views": list(cls.views), "primary_view": cls.primary_view,
        "device": str(dev), "world_size": world, "cpu_threads": cpu_threads,
        "status": "running", "steps_done": start,
        "max_steps": config.max_steps, "started": _now(), "updated": _now(),
    }, config, start, resume)
    emit({"type": "start", "run": run, "method": method, "preset": setup.preset, "device": str(dev),
          "step": start, "total": config.max_steps, "resumed": bool(resume), "world_size": world,
          "cpu_threads": cpu_threads, "labeled_cases": split["labeled_cases"], "val_cases": split["val_cases"],
          "unlabeled_cases": split["unlabeled_cases"]})
    return run, _loop(model, sampler, recorder, config, start, run, should_stop, world, dev)


def _loop(model: Method, sampler: Any, recorder: _Recorder, config: BaseConfig, start: int, run: str,
          should_stop: Callable[[], bool] | None, world: int, dev: torch.device) -> Method:
    """Steps ``start`` .. ``config.max_steps``: learning rate, batch, ``train_step``, logging, progress events,
    validation and checkpoints on their schedules; a stop request checkpoints and marks the run cancelled."""
    emit = recorder.emit
    log_every = max(1, math.ceil(config.max_steps / MAX_LOG_LINES))
    pending: dict[str, list[float]] = {}
    step_times: list[float] = []
    ema: float | None = None
    last_emit = 0.0
    step = start
    model.train()
    try:
        while step < config.max_steps:
            stop = bool(should_stop()) if should_stop is not None else False
            if world > 1:
                stop = any_rank(stop, dev)
            if stop:
                recorder.checkpoint(step)
                recorder.update(status="cancelled", steps_done=step)
                emit({"type": "cancelled", "step": step, "run": run})
                return model
            tic = time.perf_counter()
            lr = model.lr_at(step)
            for optimizer in model.optimizers():
                for group in optimizer.param_groups:
                    group["lr"] = lr
            labeled, unlabeled = sampler.next()
            if world > 1:
                broadcast_buffers(model)
            losses = model.train_step(labeled, unlabeled, step)
            step += 1
            elapsed = time.perf_counter() - tic
            step_times.append(elapsed)
            if step - start > 1:  # the first step holds one-off warm-up (allocations, cuDNN autotuning)
                ema = elapsed if ema is None else 0.9 * ema + 0.1 * elapsed
            for key, value in losses.items():
                pending.setdefault(key, []).append(float(value))
            last = step == config.max_steps
            if step % log_every == 0 or last:
                recorder.log_train({"type": "train", "step": step, "lr": lr,
                                    **{k: round(float(np.mean(v)), 6) for k, v in pending.items()}})
                pending.clear()
            now = time.perf_counter()
            if last or step == start + 1 or now - last_emit >= PROGRESS_INTERVAL_S:
                last_emit = now
                per_step = ema if ema is not None else elapsed
                emit({"type": "progress", "step": step, "total": config.max_steps,
                      "losses": {k: round(float(v), 6) for k, v in losses.items()}, "lr": lr,
                      "seconds_per_step": round(per_step, 4),
                      "eta_s": round(per_step * (config.max_steps - step), 1)})
            if step % config.val_every == 0 or last:
                recorder.validate(step)
            if step % config.checkpoint_every == 0 and not last:
                recorder.checkpoint(step)
        recorder.checkpoint(step)
        timed = step_times[1:] or step_times
        recorder.update(status="done", steps_done=step,
                        seconds_per_step=round(float(np.median(timed)), 4) if timed else None)
        emit({"type": "done", "run": run, "step": step})
        return model
    except BaseException as exc:
        recorder.update(status="failed", steps_done=step, error=f"{type(exc).__name__}: {exc}"[:500])
        raise


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
