"""Do the agreement scores point reviewers at the right cases?  A simulated review loop, ground truth as clinician.

On the brain-tissue slab task (bench/common.py), each round: train the method, infer pseudo labels and agreement
scores on the unlabeled slabs, then "review" K of them by accepting their reference labels, picked (a) lowest
agreement first (the top of the review dock's table) or (b) at random; report held-out Dice per round for both,
mean and spread over seeds (each seed trains differently and draws its own random picks; the slab split is fixed).

It also measures the scores directly: after every inference, each unlabeled slab's agreement is paired with the
true Dice of the method's primary pseudo label against the slab's reference.  Reported: Spearman's rank correlation
over all those pairs, and how often the lowest-agreement slab was a slab with the worst pseudo label (chance: the
share of unlabeled slabs that tie for worst, averaged over rounds).

Usage: python bench/review_loop.py --loop [--method diffrect] [--rounds 2] [--k 1] [--budget smoke|small] [--seeds 0,1,2]

Without ``--loop`` (the default) it measures every review score instead, on the held-out cases with the shipped
pretrained models: bench/review_scores.py (Spearman and hit rate per score and per method).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (BUDGETS, build_slab_task, evaluate_on_test, machine_lines, mean_spread,  # noqa: E402
                          write_result)
from backend.review.queue import review_rows  # noqa: E402

STRATEGIES = ("lowest-agreement", "random")


def pick_cases(queue: list[str], k: int, strategy: str, rng: random.Random) -> list[str]:
    """The ``k`` unlabeled cases to review next from ``queue`` (the review table's unlabeled cases, in its order:
    lowest agreement first): its top, or a random draw."""
    if strategy == "random":
        return rng.sample(queue, min(k, len(queue)))
    return queue[:k]


def review_queue(project, method: str, run: str) -> list[tuple[str, float | None]]:
    """``(case, agreement)`` of every unlabeled case, in the review dock's order for ``run``
    (:func:`backend.review.queue.review_rows`)."""
    return [(row["case"], (row["scores"].get(method) or {}).get("mean"))
            for row in review_rows(project, {method: run}) if not row["labeled"]]


def pseudo_label_dice(task, method: str, run: str, case: str) -> float:
    """Mean foreground Dice of the method's primary pseudo label of ``case`` against its reference (MONAI)."""
    from backend.methods import get_method
    from backend.engine.metrics import dice_per_class
    from backend.io.volume import read_volume

    project = task.project
    view = get_method(method).primary_view
    pseudo = read_volume(project.pseudo_dir(method, run) / case / f"{view}.nii.gz").array
    reference = read_volume(task.references[case]).array
    return float(dice_per_class(pseudo, reference, project.num_classes).mean())


def run_loop(task, method: str, strategy: str, *, rounds: int, k: int, seed: int, preset: str | None,
             steps: int | None, device: str, pairs: list[tuple[float, float]], hits: list[tuple[bool, float]]
             ) -> list[tuple[int, float]]:
    """One review loop; returns ``(labeled cases, held-out Dice)`` per round and appends to ``pairs`` (agreement,
    true pseudo-label Dice) and ``hits`` (the lowest-agreement slab has the worst pseudo label, the chance of that
    for a random pick)."""
    from backend.engine.inference import infer
    from backend.engine.training import train
    from backend.io.volume import read_volume

    project, rng, curve = task.project, random.Random(seed), []
    for round_ in range(rounds + 1):
        run = train(project, method, preset=preset, steps=steps, device=device, overrides={"seed": seed})
        dice = evaluate_on_test(task, method, run, device)["dice"]
        curve.append((len(project.labeled_cases()), dice))
        print(f"seed {seed} {strategy} round {round_}: {curve[-1][0]} labeled, held-out Dice {dice:.3f}", flush=True)
        if round_ == rounds or not project.unlabeled_cases():
            break
        infer(project, method, run=run, device=device)
        queue = review_queue(project, method, run)
        truth = {case: pseudo_label_dice(task, method, run, case) for case, _ in queue}
        pairs.extend((score, truth[case]) for case, score in queue if score is not None)
        if len(queue) > 1 and queue[0][1] is not None:
            worst = min(truth.values())  # ties: any of the worst slabs is a hit, and chance counts them all
            hits.append((truth[queue[0][0]] == worst, sum(d == worst for d in truth.values()) / len(truth)))
        for case in pick_cases([case for case, _ in queue], k, strategy, rng):
            project.accept(case, read_volume(task.references[case]), source=f"reference ({strategy})")
    return curve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--loop" not in argv:
        from bench.review_scores import main as measure_scores

        return measure_scores(argv)
    argv.remove("--loop")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="diffrect")
    parser.add_argument("--rounds", type=int, default=2,
                        help="review rounds (the task has 3 unlabeled slabs: after 3 rounds with K=1 both "
                             "strategies have labeled the same set, so the default stops one short)")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--budget", choices=BUDGETS, default="smoke")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    args = parser.parse_args(argv)
    from scipy.stats import spearmanr

    preset, steps = BUDGETS[args.budget]
    steps = args.steps or steps
    seeds = [int(s) for s in args.seeds.split(",")]
    curves: dict[str, list[list[tuple[int, float]]]] = {s: [] for s in STRATEGIES}
    pairs: list[tuple[float, float]] = []
    hits: list[tuple[bool, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for strategy in STRATEGIES:
                task = build_slab_task(Path(tmp) / f"{strategy}-{seed}", seed=0)
                curves[strategy].append(run_loop(task, args.method, strategy, rounds=args.rounds, k=args.k,
                                                 seed=seed, preset=preset, steps=steps, device=args.device,
                                                 pairs=pairs, hits=hits))
    lines = [f"# Review loop: {args.method}, {args.budget} budget (preset {preset or 'paper'}, {steps or 'paper'} "
             f"steps), K={args.k} per round, seeds {seeds}", "", *machine_lines(),
             f"- task: real brain-tissue slabs (bench/common.py), {len(task.test_cases)} held out; held-out Dice "
             "mean ± std over seeds, foreground classes averaged", "",
             "| round | labeled | held-out Dice, lowest agreement first | held-out Dice, random |", "|---|---|---|---|"]
    rounds = min(len(c) for c in curves["lowest-agreement"] + curves["random"])
    for i in range(rounds):
        cells = [mean_spread([c[i][1] for c in curves[s]]) for s in STRATEGIES]
        lines.append(f"| {i} | {curves['random'][0][i][0]} | {cells[0]} | {cells[1]} |")
    if len(pairs) >= 3:
        rho = spearmanr([a for a, _ in pairs], [d for _, d in pairs]).statistic
        rho_text = f"{rho:+.2f}" if np.isfinite(rho) else "undefined (a constant score or Dice)"
        lines += ["", f"Agreement vs the true Dice of the `{args.method}` pseudo label, over {len(pairs)} "
                      f"(slab, round, seed) pairs: Spearman rho {rho_text}."]
    if hits:
        chance = float(np.mean([c for _, c in hits]))
        lines.append(f"The lowest-agreement slab was the one with the worst pseudo label in "
                     f"{sum(h for h, _ in hits)} of {len(hits)} rounds (chance {chance:.2f}).")
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"written to {write_result(f'review_loop-{args.method}-{args.budget}.md', text, folder=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
