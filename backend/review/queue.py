"""The review queue: which run's pseudo labels the review shows (each method's best run by validation), the case
table restricted to them, and its order (unlabeled first, the most doubtful case first)."""
from __future__ import annotations

from typing import Any

from backend.project import Project
from backend.project.runs import best_runs, methods_with_pseudo_labels, pseudo_runs
from backend.review.corrections import flags, list_drafts


# Review scores the queue can sort by: key in ``row["scores"][method]`` -> what it is, for the dock's chooser.
# Every score is oriented "higher = more trustworthy"; the first entry is the default sort.
# What each score is: backend/engine/scores.py.  The default is the best-measured by bench/review_loop.py
# (rank correlation with the true Dice of the pseudo label on held-out cases: bench/results/review_loop.md).
SORT_SCORES: dict[str, str] = {
    "cross": "agreement with the other methods (Dice of primary views)",
    "mean": "agreement between one method's own views",
    "tta": "agreement under a left-right mirror (test-time augmentation)",
    "confidence": "1 - softmax entropy of the primary view",
}
DEFAULT_SORT_SCORE = next(iter(SORT_SCORES))


def sort_review_queue(rows: list[dict[str, Any]], score: str = DEFAULT_SORT_SCORE) -> list[dict[str, Any]]:
    """Unlabeled cases first, then the lowest ``score`` (a key of :data:`SORT_SCORES`) of any method first (the most
    doubtful case leads); cases without that score come after the scored ones; ties by case name."""
    if score not in SORT_SCORES:
        raise KeyError(f"unknown review score '{score}' (scores: {', '.join(SORT_SCORES)})")

    def key(row: dict[str, Any]):
        values = [s[score] for s in row["scores"].values() if s.get(score) is not None]
        return (bool(row["labeled"]), min(values) if values else 2.0, row["case"])
    return sorted(rows, key=key)


def default_runs(project: Project) -> dict[str, str]:
    """``{method: run}`` whose pseudo labels the review shows by default, for every method that has pseudo labels:
    the run inference uses by default (the best by validation, :func:`best_runs`) when it has pseudo labels, else
    the newest run with pseudo labels.  So a newer, worse model's pseudo labels never replace a better one's in the
    review queue."""
    best = best_runs(project)
    out = {}
    for method in methods_with_pseudo_labels(project):
        runs = pseudo_runs(project, method)
        out[method] = best[method] if best.get(method) in runs else runs[-1]
    return out


def cross_score(scores: dict[str, dict], runs: dict[str, str], method: str, case: str) -> float | None:
    """Mean Dice of ``method``'s primary view of ``case`` against each other shown method's (``runs``): each pair
    as whichever of the two runs inferred later recorded it (``cross_agreement`` in its ``scores.json``)."""
    values = []
    for other, run in runs.items():
        if other == method:
            continue
        mine = (scores[method].get("cases", {}).get(case) or {}).get("cross_agreement") or {}
        theirs = (scores[other].get("cases", {}).get(case) or {}).get("cross_agreement") or {}
        value = mine.get(f"{other}:{run}", theirs.get(f"{method}:{runs[method]}"))
        if value is not None:
            values.append(float(value))
    return round(sum(values) / len(values), 6) if values else None


def review_rows(project: Project, runs: dict[str, str] | None = None,
                score: str = DEFAULT_SORT_SCORE) -> list[dict[str, Any]]:
    """The case table of :meth:`Project.case_table` restricted to ``runs`` (``{method: run}``; default
    :func:`default_runs`, each method's best run), plus ``flagged`` and ``draft`` columns, in review order
    by ``score`` (:func:`sort_review_queue`)."""
    runs = default_runs(project) if runs is None else runs
    scores = {m: project.scores(m, r) for m, r in runs.items()}
    flagged = flags(project)
    drafts = set(list_drafts(project))
    rows = []
    for row in project.case_table():
        case = row["case"]
        row["scores"] = {}
        for method, run_scores in scores.items():
            case_scores = run_scores.get("cases", {}).get(case)
            if case_scores:
                row["scores"][method] = {"run": runs[method], "mean": case_scores.get("agreement_mean"),
                                         "worst_class": case_scores.get("agreement_worst"),
                                         "tta": case_scores.get("tta_agreement"),
                                         "confidence": case_scores.get("confidence"),
                                         "cross": cross_score(scores, runs, method, case)}
        row["flagged"] = case in flagged
        row["draft"] = case in drafts
        rows.append(row)
    return sort_review_queue(rows, score)
