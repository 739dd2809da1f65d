"""Which review score finds the bad pseudo labels?  Every score of backend/engine/scores.py against the true Dice.

The shipped pretrained models (sample_data/pretrained, trained on the sample's labeled cases) review the sample's
held-out cases (sample_data/heldout: never trained on, not even as unlabeled images), through the same code the
review dock's inference runs (:func:`backend.engine.inference.review_case`).  Each held-out volume is cut into
``--slabs`` axial slabs; for every (slab, method) pair every score is computed on the slab's slices
(:func:`backend.engine.scores.slab_scores`) and paired with the true Dice of the method's primary pseudo label
against the slab's reference label.  Slabs whose reference has no structure are left out.

Reported per method and score: Spearman's rank correlation with the true Dice (positive = the score ranks the
bad slabs low, as the queue needs), and the hit rate of "lowest first = worst": over ``--draws`` random sets of
``--k`` slabs of that method, how often the lowest-scored slab of the set has the worst true Dice (chance:
1/k, counted with ties).  A control row, ``size`` (the share of the slab the pseudo label marks), shows how much
of a correlation slab position alone gives (edge slabs hold little brain and score low on everything).  Usage: python bench/review_loop.py [--slabs 10] [--k 5] (this module's ``main``).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_lines, write_result  # noqa: E402

METHODS = ("diffrect", "diffcl", "genericssl")
ENSEMBLE_ONLY = ("supervised",)  # inferred too: its primary view joins the cross-method ensemble


def measure(slab_count: int, device: str = "cpu") -> list[dict]:
    """One row per (method, case, slab): ``{"method", "case", "slab", "dice", <score>: value}``."""
    from backend.engine.inference import load_trained, review_case
    from backend.engine.scores import mean_dice, slab_scores, slabs
    from backend.io.volume import read_volume
    from backend.project.sample import PRETRAINED_RUN, add_heldout, copy_sample, heldout_cases, install_pretrained

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="semiseg-review-scores-") as tmp:
        project = copy_sample(Path(tmp) / "project")
        cases = add_heldout(project)
        install_pretrained(project, "brain_tissue", [*METHODS, *ENSEMBLE_ONLY])
        references = {c: read_volume(lab).array for c, (_, lab) in heldout_cases().items()}
        reviews: dict[str, dict] = {}
        for method in (*METHODS, *ENSEMBLE_ONLY):
            model, _, _ = load_trained(project, method, PRETRAINED_RUN, device)
            reviews[method] = {c: review_case(model, project, c) for c in cases}
            print(f"{method}: reviewed {', '.join(cases)}", flush=True)
        k = project.num_classes
        for method in METHODS:
            primary = _primary(method)
            for case in cases:
                review = reviews[method][case]
                others = [reviews[m][case].views[_primary(m)] for m in reviews if m != method]
                for i, (z0, z1) in enumerate(slabs(review.image.shape[0], slab_count)):
                    ref = references[case][z0:z1]
                    if not ref.any():
                        continue
                    row = {"method": method, "case": case, "slab": i,
                           "dice": mean_dice(review.views[primary][z0:z1], ref, k)}
                    row["size"] = float((review.views[primary][z0:z1] > 0).mean())  # naive control
                    row.update(slab_scores(review.views, primary, k, z0, z1, entropy=review.entropy,
                                           tta_label=review.tta_label, others=others))
                    rows.append(row)
    return rows


def _primary(method: str) -> str:
    from backend.methods import get_method

    return get_method(method).primary_view


def hit_rate(scores: list[float], dice: list[float], k: int, draws: int, seed: int = 0) -> tuple[float, float]:
    """``(hits, chance)`` of "the lowest-scored of k random slabs has the worst true Dice" over ``draws`` draws."""
    rng = random.Random(seed)
    hits, chance = [], []
    for _ in range(draws):
        pick = rng.sample(range(len(scores)), min(k, len(scores)))
        worst = min(dice[i] for i in pick)
        lowest = min(pick, key=lambda i: (scores[i], i))
        hits.append(dice[lowest] == worst)
        chance.append(sum(dice[i] == worst for i in pick) / len(pick))
    return float(np.mean(hits)), float(np.mean(chance))


def table(rows: list[dict], k: int, draws: int) -> tuple[list[str], dict[str, dict[str, tuple]]]:
    """Markdown lines and ``{score: {method: (rho, hits, chance, n)}}``."""
    from scipy.stats import spearmanr

    from backend.engine.scores import SCORES
    from backend.review.queue import SORT_SCORES

    stats: dict[str, dict[str, tuple]] = {}
    lines = ["| score | what it is | " + " | ".join(f"{m}: Spearman / hit rate (chance)" for m in METHODS)
             + " | pairs |", "|---|---|" + "---|" * len(METHODS) + "---|"]
    for score in (*SCORES, "size"):
        cells, n_all = [], 0
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method and r.get(score) is not None]
            n_all += len(mine)
            if len(mine) < 3:
                cells.append("-")
                continue
            values, dice = [r[score] for r in mine], [r["dice"] for r in mine]
            rho = spearmanr(values, dice).statistic
            hits, chance = hit_rate(values, dice, k, draws)
            stats.setdefault(score, {})[method] = (rho, hits, chance, len(mine))
            cells.append(f"{rho:+.2f} / {hits:.2f} ({chance:.2f})")
        what = SORT_SCORES.get(score, "control, not a review score: share of the slab the pseudo label marks")
        lines.append(f"| `{score}` | {what} | " + " | ".join(cells) + f" | {n_all} |")
    return lines, stats


def best_score(stats: dict[str, dict[str, tuple]]) -> str | None:
    """The score whose worst per-method Spearman is highest (every method must rank well, not the mean)."""
    full = {s: v for s, v in stats.items() if len(v) == len(METHODS) and s != "size"}
    return max(full, key=lambda s: min(v[0] for v in full[s].values())) if full else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slabs", type=int, default=10, help="axial slabs per held-out volume")
    parser.add_argument("--k", type=int, default=5, help="slabs per draw of the hit rate")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    args = parser.parse_args(argv)
    from backend.review.queue import DEFAULT_SORT_SCORE

    rows = measure(args.slabs, args.device)
    lines, stats = table(rows, args.k, args.draws)
    best = best_score(stats)
    cases = sorted({r["case"] for r in rows})
    text = "\n".join([
        "# Review scores vs the true Dice of the pseudo label (held-out cases, shipped pretrained models)", "",
        *machine_lines(args.device),
        f"- held-out cases {', '.join(cases)} (sample_data/heldout), {args.slabs} axial slabs each; "
        f"hit rate over {args.draws} random sets of {args.k} slabs per method", "",
        *lines, "",
        f"Best measured (highest worst-method Spearman): `{best}`. The review dock sorts by `{DEFAULT_SORT_SCORE}` "
        "by default (backend/review/queue.py, SORT_SCORES).", ""])
    print(text)
    print(f"written to {write_result('review_loop.md', text, folder=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
