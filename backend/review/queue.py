"""The review queue: which run's pseudo labels the review shows (each method's best run by validation), the case
table restricted to them, and its order (unlabeled first, the most doubtful case first)."""
from __future__ import annotations

from typing import Any

from backend.project import Project
from backend.project.runs import best_runs, methods_with_pseudo_labels, pseudo_runs
from backend.review.corrections import flags, list_drafts


def sort_review_queue(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unlabeled cases first, then the lowest agreement of any method first (the most doubtful case leads);
    cases without a score come after the scored ones; ties by case name."""
    def key(row: dict[str, Any]):
        means = [s["mean"] for s in row["scores"].values() if s.get("mean") is not None]
        return (bool(row["labeled"]), min(means) if means else 2.0, row["case"])
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


def review_rows(project: Project, runs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The case table of :meth:`Project.case_table` restricted to ``runs`` (``{method: run}``; default
    :func:`default_runs`, each method's best run), plus ``flagged`` and ``draft`` columns, in review order."""
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
                                         "worst_class": case_scores.get("agreement_worst")}
        row["flagged"] = case in flagged
        row["draft"] = case in drafts
        rows.append(row)
    return sort_review_queue(rows)
