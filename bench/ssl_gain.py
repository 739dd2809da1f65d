"""What semi-supervision buys on real data: each method vs the supervised baseline, same steps, same seeds.

On the shipped sample task (``--task sample``, the default: sample_data/brain_tissue's 2 labeled and 2 unlabeled
real T1 volumes, scored on the 2 held-out volumes of sample_data/heldout) or the older slab task (``--task slabs``:
two real volumes cut into slabs, one labeled slab, two held out; bench/common.py), train ``supervised`` (labeled only) and each semi-supervised method (labeled +
unlabeled) with the same step budget and seeds, then report held-out Dice, Jaccard, HD95 and ASD (MONAI, mm):
mean and spread over seeds.  ``--budget`` scales from a CPU smoke run (minutes) to a GPU run (hours).

Usage: python bench/ssl_gain.py [--budget smoke|small|full] [--seeds 0,1,2] [--methods ...] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (BUDGETS, TASKS, evaluate_on_test, machine_lines, mean_spread,  # noqa: E402
                          write_result)

METHODS = ("supervised", "supervised2d", "diffrect", "diffcl", "genericssl")
# the labeled-only baseline each method is compared against: same dimensionality, same backbone family
BASELINE = {"diffrect": "supervised2d", "diffcl": "supervised", "genericssl": "supervised"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=BUDGETS, default="smoke")
    parser.add_argument("--task", choices=TASKS, default="sample",
                        help="sample: the shipped task and its held-out volumes; slabs: the older slab task")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    args = parser.parse_args(argv)
    from backend.engine.training import train

    preset, steps = BUDGETS[args.budget]
    steps = args.steps or steps
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        task = TASKS[args.task](Path(tmp) / "task")
        task_line = (f"{args.task} task, real brain tissue (GM/WM): {len(task.project.labeled_cases())} labeled, "
                     f"{len(task.project.unlabeled_cases())} unlabeled, {len(task.test_cases)} held out "
                     f"({', '.join(task.test_cases)}); mean ± std over seeds, foreground classes averaged")
        print(task_line, flush=True)
        for method in args.methods.split(","):
            for seed in seeds:
                start = time.perf_counter()
                run = train(task.project, method, preset=preset, steps=steps, device=args.device,
                            overrides={"seed": seed})
                results.setdefault(method, []).append(evaluate_on_test(task, method, run, args.device))
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
                print(f"{method} seed {seed}: {results[method][-1]}", flush=True)
    lines = [f"# SSL gain ({args.budget} budget: preset {preset or 'paper'}, {steps or 'paper'} steps, "
             f"seeds {seeds})", "", *machine_lines(), f"- task: {task_line}", "",
             "| method | Dice | vs its labeled-only baseline | Jaccard | HD95 (mm) | ASD (mm) | train+eval s |",
             "|---|---|---|---|---|---|---|"]
    dice = {m: np.nanmean([r["dice"] for r in rows]) for m, rows in results.items()}
    for method, rows in results.items():
        cells = [mean_spread([r[key] for r in rows]) for key in ("dice", "jaccard", "hd95", "asd")]
        undefined, pairs = sum(r["undefined"] for r in rows), sum(r["pairs"] for r in rows)
        if 0 < undefined < pairs:
            cells[2] += f" ({undefined}/{pairs} undefined)"
        base = BASELINE.get(method)
        gain = f"{dice[method] - dice[base]:+.3f} vs {base}" if base in dice else "-"
        lines.append(f"| {method} | {cells[0]} | {gain} | " + " | ".join(cells[1:]) + f" | {seconds[method]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = f"ssl_gain-{args.budget}.md" if args.task == "sample" else f"ssl_gain-{args.task}-{args.budget}.md"
    print(f"written to {write_result(name, text, folder=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
