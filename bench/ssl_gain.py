"""What semi-supervision buys on real data: each method vs the supervised baseline, same steps, same seeds.

On the brain-tissue slab task (bench/common.py: real GM/WM volumes cut into slabs, one labeled slab, the rest
unlabeled, two held out), train ``supervised`` (labeled only) and each semi-supervised method (labeled +
unlabeled) with the same step budget and seeds, then report held-out Dice, Jaccard, HD95 and ASD (MONAI, mm):
mean and spread over seeds.  ``--budget`` scales from a CPU smoke run (minutes) to a GPU run (hours).

Usage: python bench/ssl_gain.py [--budget smoke|small|full] [--seeds 0,1] [--methods ...] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import build_slab_task, evaluate_on_test, machine_header, write_result  # noqa: E402

# budget -> (preset, steps)
BUDGETS = {"smoke": ("tiny", 40), "small": ("quick", 400), "full": (None, None)}
METHODS = ("supervised", "supervised2d", "diffrect", "diffcl", "genericssl")
# the labeled-only baseline each method is compared against: same dimensionality, same backbone family
BASELINE = {"diffrect": "supervised2d", "diffcl": "supervised", "genericssl": "supervised"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=BUDGETS, default="smoke")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    args = parser.parse_args(argv)
    from backend.training import train

    preset, steps = BUDGETS[args.budget]
    steps = args.steps or steps
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        task = build_slab_task(Path(tmp) / "task")
        print(f"task: {len(task.project.labeled_cases())} labeled, {len(task.project.unlabeled_cases())} unlabeled, "
              f"{len(task.test_cases)} held-out slabs", flush=True)
        for method in args.methods.split(","):
            for seed in seeds:
                start = time.perf_counter()
                run = train(task.project, method, preset=preset, steps=steps, device=args.device,
                            overrides={"seed": seed})
                results.setdefault(method, []).append(evaluate_on_test(task, method, run, args.device))
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
                print(f"{method} seed {seed}: {results[method][-1]}", flush=True)
    lines = [f"# SSL gain ({args.budget} budget: preset {preset or 'paper'}, {steps or 'paper'} steps, "
             f"seeds {seeds})", "", machine_header(), "",
             "| method | Dice | Jaccard | HD95 (mm) | ASD (mm) | train+eval s |", "|---|---|---|---|---|---|"]
    for method, rows in results.items():
        cells = []
        for key in ("dice", "jaccard", "hd95", "asd"):
            values = np.array([r[key] for r in rows], dtype=float)
            cells.append(f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds[method]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"written to {write_result(f'ssl_gain-{args.budget}.md', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
