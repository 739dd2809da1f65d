"""Train the small pretrained checkpoints shipped for the brain-tissue sample project.

    .venv/bin/python sample_data/train_pretrained.py [--methods supervised,diffrect,...] [--threads 2]

For each method this trains an ordinary run with the engine (``backend.engine.training.train``) on a fresh copy of the
sample project (its labeled cases; the unlabeled cases feed the semi-supervised methods),
then writes ``sample_data/pretrained/brain_tissue/<method>/``:

* ``checkpoint.pt``: the run's checkpoint (its best validation, which is the last step here: validation runs
  once, at the end) slimmed for shipping: network weights and buffers stored as float16 (they load into the
  float32 networks), no optimizer state (a run fine-tuned from it starts SGD momentum afresh);
  ``torch.load(..., weights_only=True)`` loads it;
* ``config.json`` and ``run.json``: the run's own, with ``pretrained`` added (script, date, torch version,
  weight dtype, and the Dice of the shipped weights' pseudo labels on the held-out cases, ``sample_data/heldout/``).

Then it installs the shipped checkpoints into another fresh copy (``backend.project.sample.install_pretrained``, as the
demo does) with the held-out cases added unlabeled, infers those and writes ``sample_data/pretrained/README.md``:
every semi-supervised method next to its labeled-only baseline (:data:`BASELINE`, same steps). ``NOTES.md`` next
to it (hand-written: the analysis of a method that does not gain) is appended to the README.
Configurations are the ``tiny`` presets with validation once at the end (and V-Net width 4 for the two 3D
diffusion methods, so that the checkpoints stay a few MB and infer a volume in seconds on a CPU).
Rerun after a method's networks change: ``tests/backend/test_first_run.py`` fails when a shipped checkpoint no longer
loads into the current method code.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backend.engine.metrics import dice_per_class  # noqa: E402
from backend.io.atomic import write_json_atomic  # noqa: E402
from backend.project.sample import (PRETRAINED_RUN, RUN_FILES, add_heldout, copy_sample, heldout_cases,  # noqa: E402
                                    install_pretrained, reference_label_path)
from backend.io.volume import read_volume  # noqa: E402

TASK = "brain_tissue"
OUT = Path(__file__).resolve().parent / "pretrained" / TASK
# method -> (preset, training steps, config overrides); validation once, at the last step. Each semi-supervised
# method gets the same step budget as its labeled-only baseline (BASELINE), so the table compares like with like.
SPEC: dict[str, tuple[str, int, dict]] = {
    "supervised": ("tiny", 800, {}),
    "supervised2d": ("tiny", 1500, {}),
    "diffrect": ("tiny", 1500, {}),
    "diffcl": ("tiny", 800, {"features": 4}),
    "genericssl": ("tiny", 800, {"features": 4}),
}
BASELINE = {"diffrect": "supervised2d", "diffcl": "supervised", "genericssl": "supervised"}


def slim_checkpoint(state: dict) -> dict:
    """A training checkpoint for shipping: float tensors of the networks as float16, optimizer state dropped."""
    method = state["method"]
    modules = {name: {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
               for name, sd in method["modules"].items()}
    return {**state, "method": {"modules": modules, "optimizers": [], "extra": method.get("extra", {}),
                                "scaler": None}}


def train_one(method: str, work: Path, log) -> dict:
    """Train ``method`` on a fresh sample copy under ``work``; write its shipped run folder; return run.json."""
    from backend.engine.training import train

    preset, steps, overrides = SPEC[method]
    project = copy_sample(work / f"train-{method}", TASK)
    started = time.perf_counter()
    last = [0.0]

    def show(event: dict) -> None:
        now = time.perf_counter()
        if event.get("type") == "progress" and (now - last[0] > 15 or event["step"] == event["total"]):
            last[0] = now
            log(f"  {method} step {event['step']}/{event['total']}  {now - started:.0f} s  eta {event['eta_s']:.0f} s")
        elif event.get("type") == "validation":
            log(f"  {method} validation Dice {event['mean']:.3f} (on the training case)")

    run = train(project, method, preset=preset, steps=steps, device="cpu",
                overrides={**overrides, "val_every": steps, "checkpoint_every": steps}, on_event=show)
    folder = project.model_dir(method, run)
    info = json.loads((folder / "run.json").read_text())
    if info.get("status") != "done":
        raise RuntimeError(f"{method}: run {run} ended {info.get('status')}")
    best = folder / "best.pt"
    source = best if best.is_file() else folder / "checkpoint.pt"
    state = torch.load(source, map_location="cpu", weights_only=True)
    dest = OUT / method
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".checkpoint.pt.tmp"
    torch.save(slim_checkpoint(state), tmp)
    tmp.replace(dest / "checkpoint.pt")
    write_json_atomic(dest / "config.json", json.loads((folder / "config.json").read_text()))
    info.update(run=PRETRAINED_RUN, steps_done=int(state["step"]), training_seconds=round(time.perf_counter() - started, 1),
                pretrained={"script": "sample_data/train_pretrained.py", "trained": _dt.date.today().isoformat(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "weights": "float16", "source_checkpoint": source.name})
    write_json_atomic(dest / "run.json", info)
    log(f"{method}: {steps} steps in {info['training_seconds']:.0f} s, "
        f"{(dest / 'checkpoint.pt').stat().st_size / 1e6:.2f} MB")
    return info


def evaluate(methods: list[str], work: Path, log) -> dict[str, dict]:
    """Install the shipped runs into a fresh copy (as the demo does) with the held-out cases added unlabeled,
    infer those, score the primary view against their labels (``heldout/``) and the unlabeled project cases
    against their references (``reference/``)."""
    from backend.engine.inference import infer
    from backend.methods import get_method

    project = copy_sample(work / "evaluate", TASK)
    heldout = add_heldout(project, TASK)
    labels = {c: lab for c, (_, lab) in heldout_cases(TASK).items()}
    labels.update({c: reference_label_path(TASK, c) for c in project.unlabeled_cases() if c not in labels
                   and reference_label_path(TASK, c) is not None})
    install_pretrained(project, TASK, methods, source=OUT)
    results: dict[str, dict] = {}
    for method in methods:
        tic = time.perf_counter()
        infer(project, method, run=PRETRAINED_RUN, device="cpu", cases=heldout)
        seconds = time.perf_counter() - tic
        scores = project.scores(method, PRETRAINED_RUN)["cases"]
        primary = get_method(method).primary_view
        dice = {}
        for case in heldout:
            pred = read_volume(project.pseudo_dir(method, PRETRAINED_RUN) / case / f"{primary}.nii.gz").array
            dice[case] = round(float(np.mean(dice_per_class(pred, read_volume(labels[case]).array,
                                                            project.num_classes))), 4)
        results[method] = {"heldout_dice": dice, "primary_view": primary, "inference_seconds": round(seconds, 1),
                           "agreement": {c: _round(s.get("agreement_mean")) for c, s in scores.items()}}
        log(f"{method}: inferred {len(heldout)} held-out cases in {seconds:.0f} s; Dice of '{primary}' {dice}")
    return results


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _validation_dice(info: dict) -> float | None:
    """The run's best validation mean Dice (``best``; else its last validation)."""
    if (info.get("best") or {}).get("dice") is not None:
        return float(info["best"]["dice"])
    return (info.get("last_validation") or {}).get("mean")


def write_readme(infos: dict[str, dict], results: dict[str, dict]) -> None:
    cases = sorted(heldout_cases(TASK))
    lines = [
        "# Pretrained checkpoints of the brain-tissue sample",
        "",
        "Written by `sample_data/train_pretrained.py` (do not edit by hand; rerun it after a method's networks",
        "change). Each folder is an ordinary training run of the engine on the sample's labeled cases",
        f"({', '.join(f'`{c}`' for c in infos[next(iter(infos))]['labeled_cases'])}; grey/white matter; the "
        "unlabeled project cases feed the semi-supervised methods), slimmed for shipping (float16 weights, no",
        "optimizer state). `backend.project.sample.install_pretrained` (the demo, `scripts/run.sh`) installs them",
        f"into a project as run `{PRETRAINED_RUN}` of each method.",
        "",
        f"Held-out Dice: mean over grey and white matter of the method's primary view on the held-out cases "
        f"({', '.join(f'`{c}`' for c in cases)}; `sample_data/heldout/`, never trained on, not even as unlabeled",
        "images; labels: k-means tissue classes in the brain mask, see `sample_data/build.py`). Each semi-supervised",
        "method is compared with its labeled-only baseline (same labeled cases, same steps, same dimensionality).",
        "Agreement: the mean agreement Dice between the method's views on the held-out cases (`-`: one view).",
        "",
        "| method | preset (overrides) | steps | train s | MB | validation Dice (labeled, trained on) | "
        + " | ".join(f"Dice {c}" for c in cases) + " | held-out mean | vs labeled-only baseline | agreement mean |",
        "|---|---|---|---|---|---|" + "---|" * len(cases) + "---|---|---|",
    ]

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def mean(method: str) -> float | None:
        dice = results.get(method, {}).get("heldout_dice", {})
        return float(np.mean([dice[c] for c in cases])) if dice and all(c in dice for c in cases) else None

    for method, info in infos.items():
        preset, steps, overrides = SPEC[method]
        res = results.get(method, {})
        dice = res.get("heldout_dice", {})
        agree = [v for c, v in res.get("agreement", {}).items() if c in cases and v is not None]
        size = (OUT / method / "checkpoint.pt").stat().st_size / 1e6
        extra = f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""
        base = BASELINE.get(method)
        gain = "-"
        if base and mean(method) is not None and mean(base) is not None:
            gain = f"{mean(method) - mean(base):+.3f} vs {base}"
        lines.append(f"| {method} | {preset}{extra} | {info['steps_done']} | {info['training_seconds']:.0f} | "
                     f"{size:.1f} | {num(_validation_dice(info))} | "
                     + " | ".join(num(dice.get(c)) for c in cases)
                     + f" | {num(mean(method))} | {gain} | {num(float(np.mean(agree)) if agree else None)} |")
    info0 = next(iter(infos.values()))
    lines += ["", f"Trained {info0['pretrained']['trained']} with torch {info0['pretrained']['torch']} on "
                  f"{info0['pretrained']['threads']} CPU thread(s) of a 2-core machine shared with other jobs (train "
                  "seconds are wall time there). Training is deterministic on the CPU: a rerun on unchanged "
                  "method code writes byte-identical checkpoints."]
    notes = OUT.parent / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (OUT.parent / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(SPEC), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, help="train every method this many steps (a smoke run)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="train nothing: score the shipped runs again and rewrite the README")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    OUT = args.out.resolve()
    if args.steps:
        for name, (preset, _, overrides) in list(SPEC.items()):
            SPEC[name] = (preset, args.steps, overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SPEC]
    if unknown:
        parser.error(f"no pretrained spec for {', '.join(unknown)} (known: {', '.join(SPEC)})")
    torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, flush=True)

    infos: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="semiseg-pretrain-") as tmp:
        for method in methods:
            if args.evaluate_only:
                infos[method] = json.loads((OUT / method / "run.json").read_text())
            else:
                infos[method] = train_one(method, Path(tmp), log)
        results = evaluate(methods, Path(tmp), log)
    for method, res in results.items():
        run_json = OUT / method / "run.json"
        info = json.loads(run_json.read_text())
        info["pretrained"].update(heldout_dice=res["heldout_dice"], agreement=res["agreement"],
                                  inference_seconds=res["inference_seconds"])
        write_json_atomic(run_json, info)
        infos[method] = info
    # the README covers every shipped method (those not retrained this time keep their recorded numbers)
    all_infos = {}
    for method in SPEC:
        if (OUT / method / "run.json").is_file() and all((OUT / method / n).is_file() for n in RUN_FILES):
            all_infos[method] = infos.get(method) or json.loads((OUT / method / "run.json").read_text())
            if method not in results:
                p = all_infos[method]["pretrained"]
                results[method] = {"heldout_dice": p.get("heldout_dice", {}), "agreement": p.get("agreement", {}),
                                   "inference_seconds": p.get("inference_seconds", 0)}
    write_readme(all_infos, results)
    total = sum((OUT / m / "checkpoint.pt").stat().st_size for m in all_infos) / 1e6
    log(f"wrote {OUT} ({total:.1f} MB of checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
