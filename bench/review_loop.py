"""Do the agreement scores point reviewers at the right cases?  A simulated review loop, ground truth as clinician.

On the brain-tissue slab task (bench/common.py), each round: train the method, infer pseudo labels and agreement
scores on the unlabeled slabs, then "review" K of them by accepting their reference labels, picked (a) lowest
agreement first (what the review dock's table suggests) or (b) at random; report held-out Dice per round for both.

Usage: python bench/review_loop.py [--method diffrect] [--rounds 3] [--k 1] [--budget smoke|small] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import build_slab_task, evaluate_on_test, machine_lines, write_result  # noqa: E402
from bench.ssl_gain import BUDGETS  # noqa: E402
from backend.review import review_rows  # noqa: E402


def pick_cases(project, method: str, run: str, k: int, strategy: str, rng: random.Random) -> list[str]:
    """The ``k`` unlabeled cases to review next: the top of the review dock's table for ``run``
    (:func:`backend.review.review_rows`, lowest agreement first) or a random draw."""
    if strategy == "random":
        unlabeled = project.unlabeled_cases()
        return rng.sample(unlabeled, min(k, len(unlabeled)))
    return [row["case"] for row in review_rows(project, {method: run}) if not row["labeled"]][:k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="diffrect")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--budget", choices=BUDGETS, default="smoke")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    args = parser.parse_args(argv)
    from backend.inference import infer
    from backend.training import train
    from backend.volume import read_volume

    preset, steps = BUDGETS[args.budget]
    steps = args.steps or steps
    table: dict[str, list[tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("lowest-agreement", "random"):
            task = build_slab_task(Path(tmp) / strategy, seed=args.seed)
            rng = random.Random(args.seed)
            for round_ in range(args.rounds + 1):
                run = train(task.project, args.method, preset=preset, steps=steps, device=args.device,
                            overrides={"seed": args.seed})
                dice = evaluate_on_test(task, args.method, run, args.device)["dice"]
                table.setdefault(strategy, []).append((len(task.project.labeled_cases()), dice))
                print(f"{strategy} round {round_}: {len(task.project.labeled_cases())} labeled, held-out Dice "
                      f"{dice:.3f}", flush=True)
                if round_ == args.rounds or not task.project.unlabeled_cases():
                    break
                infer(task.project, args.method, run=run, device=args.device)
                for case in pick_cases(task.project, args.method, run, args.k, strategy.split("-")[0], rng):
                    reference = read_volume(task.references[case])
                    task.project.accept(case, reference, source=f"reference ({strategy})")
    lines = [f"# Review loop: {args.method}, {args.budget} budget, K={args.k} per round, seed {args.seed}", "",
             *machine_lines(), "", "| round | labeled | held-out Dice, lowest agreement first | held-out Dice, random |",
             "|---|---|---|---|"]
    for i, ((n, a), (_, b)) in enumerate(zip(table["lowest-agreement"], table["random"])):
        lines.append(f"| {i} | {n} | {a:.3f} | {b:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"written to {write_result(f'review_loop-{args.method}-{args.budget}.md', text, folder=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
