"""The review dock's *Sort by* box: filled from ``backend.review.queue.SORT_SCORES`` (its first key the default),
the table follows the chosen score and its headers say which score sorts."""
from __future__ import annotations

import json

import pytest

from backend.review.queue import SORT_SCORES, review_rows
from napari_semiseg.review import ReviewDock
from helpers.plugin_fixtures import FAKE_RUN, FAKE_VIEWS, sort_by

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project

pytestmark = pytest.mark.gui


def _write_scores(project) -> list[str]:
    """Rewrite each method's scores.json so the scores disagree on the order: the agreement between a method's
    views rises case by case, its confidence falls.  Returns the unlabeled cases in rising-agreement order."""
    cases = sorted(project.unlabeled_cases())
    n = len(cases)
    for mi, method in enumerate(FAKE_VIEWS):
        path = project.pseudo_dir(method, FAKE_RUN) / "scores.json"
        scores = json.loads(path.read_text())
        others = [m for m in FAKE_VIEWS if m != method]
        for i, case in enumerate(cases):
            mean = 0.40 + 0.1 * i + 0.01 * mi
            scores["cases"][case].update({
                "agreement_mean": mean, "agreement_worst": mean - 0.05,
                "confidence": 0.95 - 0.1 * i - 0.01 * mi,
                "tta_agreement": 0.6 + 0.05 * ((i + 1) % n),
                "cross_agreement": {f"{o}:{FAKE_RUN}": 0.5 + 0.02 * i for o in others}})
        path.write_text(json.dumps(scores))
    return cases


def test_sort_by_another_score_reorders_the_table(make_napari_viewer, qtbot, reviewed_project):
    project = reviewed_project
    rising = _write_scores(project)
    assert len(rising) >= 2, "the sample needs two unlabeled cases for orders to differ"
    viewer = make_napari_viewer()
    dock = ReviewDock(viewer)
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
        dock.open_project(project.root)
    keys = [dock.sort_combo.itemData(i) for i in range(dock.sort_combo.count())]
    assert keys == list(SORT_SCORES) and dock.sort_combo.currentData() == keys[0]  # the first key is the default
    assert [dock.sort_combo.itemText(i) for i in range(dock.sort_combo.count())] == list(SORT_SCORES.values())
    labeled = sorted(project.labeled_cases())
    orders = {}
    for key in [k for k in keys if k != keys[0]] + [keys[0]]:
        sort_by(qtbot, dock, key)
        cases = dock.table_cases()
        assert cases == [r["case"] for r in review_rows(project, None, key)], key  # as the backend orders it
        assert sorted(cases[len(rising):]) == labeled  # unlabeled first, whatever the score
        headers = [dock.table.horizontalHeaderItem(j).text() for j in range(dock.table.columnCount())]
        title = "agreement Dice" if key == "mean" else key
        assert [h.split("\n")[0] for h in headers[2:]] == sorted(FAKE_VIEWS) and all(title in h for h in headers[2:])
        assert SORT_SCORES[key] in dock.table.horizontalHeaderItem(0).toolTip()
        orders[key] = cases[:len(rising)]
    # built so that the scores disagree: lowest agreement first, but lowest confidence first is the reverse
    assert orders["mean"] == rising and orders["confidence"] == rising[::-1]
    first_mean = json.loads((project.pseudo_dir("diffcl", FAKE_RUN) / "scores.json").read_text())
    sort_by(qtbot, dock, "confidence")
    assert dock.table.item(0, 2).text() == f"{first_mean['cases'][rising[-1]]['confidence']:.3f}"
    dock._baseline = None
