"""The evaluation benchmarks: the real slab task they share, and ssl_gain / review_loop / ui end to end at a
budget of a few steps (real subprocesses writing their tables)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.io.volume import read_volume

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout: float = 600) -> str:
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _rows(text: str, start: str) -> list[list[str]]:
    """The cells of every table row whose first cell starts with ``start``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    return [r for r in rows if r[0].startswith(start)]


def test_slab_task_cuts_real_volumes_into_cases_that_keep_their_geometry(tmp_path):
    from bench.common import SOURCES, build_slab_task
    from backend.project.sample import sample_root

    task = build_slab_task(tmp_path / "task", slabs=3, labeled=1, test=2, seed=0)
    project = task.project
    assert len(project.labeled_cases()) == 1 and len(project.unlabeled_cases()) == 3 and len(task.test_cases) == 2
    assert not set(task.test_cases) & set(project.case_ids())  # held out: not in the project at all
    assert sorted(task.references) == sorted(project.case_ids() + task.test_cases)
    sources = {s: read_volume(sample_root() / "brain_tissue" / "imagesTr" / f"{s}_0000.nii.gz") for s in SOURCES}
    for case in project.case_ids():
        source_name, slab = case.rsplit("_slab", 1)
        source, image = sources[source_name], project.read_image(case)
        bounds = np.linspace(0, source.shape[0], 4).astype(int)
        z0 = bounds[int(slab)]
        assert image.shape == (bounds[int(slab) + 1] - z0, *source.shape[1:])
        np.testing.assert_array_equal(image.array, source.array[z0:z0 + image.shape[0]])
        # voxel (x, y, 0) of the slab is voxel (x, y, z0) of its source volume, in world (LPS) coordinates
        np.testing.assert_allclose(image.affine_lps @ [3, 5, 0, 1], source.affine_lps @ [3, 5, z0, 1], atol=1e-4)
        reference = read_volume(task.references[case])
        assert reference.geometry_mismatch(image) is None and set(np.unique(reference.array)) <= {0, 1, 2}
    (labeled,) = project.labeled_cases()
    np.testing.assert_array_equal(project.read_label(labeled).array, read_volume(task.references[labeled]).array)


@pytest.mark.slow
def test_ssl_gain_reports_every_method_against_its_baseline(tmp_path):
    out = _bench("ssl_gain.py", "--methods", "supervised2d,diffrect", "--seeds", "0", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path))
    text = (tmp_path / "ssl_gain-smoke.md").read_text()
    assert text.strip() in out and "torch" in text and "2 held out" in text
    (base,) = _rows(text, "supervised2d")
    (method,) = _rows(text, "diffrect")
    for row in (base, method):
        assert 0.0 <= float(row[1].split("±")[0]) <= 1.0
        # two steps of training may predict no voxel of a class: its distance is undefined and counted so
        hd95 = row[4]
        assert hd95 == "undefined" or float(hd95.split("±")[0]) >= 0.0
    gain = float(method[2].split()[0])
    assert method[2].endswith("vs supervised2d")
    assert gain == pytest.approx(float(method[1].split("±")[0]) - float(base[1].split("±")[0]), abs=2e-3)


@pytest.mark.slow
def test_review_loop_grows_the_labeled_set_each_round_for_both_strategies(tmp_path):
    out = _bench("review_loop.py", "--loop", "--method", "diffrect", "--rounds", "2", "--k", "1", "--steps", "2",
                 "--seeds", "0", "--device", "cpu", "--out", str(tmp_path))
    text = (tmp_path / "review_loop-diffrect-smoke.md").read_text()
    assert text.strip() in out
    rows = [_rows(text, str(i)) for i in range(3)]
    assert [int(row[1]) for (row,) in rows] == [1, 2, 3]  # labeled cases per round
    for (row,) in rows:
        assert all(0.0 <= float(cell.split("±")[0]) <= 1.0 for cell in row[2:4])
    assert "seed 0 random round 2" in out
    # agreement vs truth: 3 then 2 unlabeled slabs scored per loop, two loops -> 10 pairs, 4 rounds with a pick
    rho = re.search(r"over 10 \(slab, round, seed\) pairs: Spearman rho ([+-][0-9]+\.[0-9]+|undefined)", text)
    assert rho and (rho.group(1) == "undefined" or -1.0 <= float(rho.group(1)) <= 1.0)
    hits = re.search(r"worst pseudo label in (\d) of 4 rounds \(chance ([0-9.]+)\)", text)
    assert hits and 0 <= int(hits.group(1)) <= 4 and 5 / 12 <= float(hits.group(2)) <= 1.0  # 1/3, 1/3, 1/2, 1/2


@pytest.mark.slow
@pytest.mark.gui
def test_ui_bench_times_a_real_viewer_and_a_training_job(tmp_path):
    """bench/ui.py in a child process on the display pytest-xvfb started (its DISPLAY is inherited)."""
    assert os.environ.get("DISPLAY")
    out = _bench("ui.py", "--methods", "supervised2d", "diffrect", "--steps", "2", "--train-method", "supervised2d",
                 "--seconds", "3", "--rounds", "1", "--out", str(tmp_path), timeout=900)
    (written,) = tmp_path.glob("ui-*.md")
    text = written.read_text()
    assert text.strip() in out
    (accept,) = _rows(text, "accept a corrected label")
    assert int(accept[1]) == 2 and float(accept[2].split()[0]) > 0  # both unlabeled sample cases accepted
    (stalls,) = _rows(text, "3 s of a training job")
    assert int(stalls[1]) > 30  # the 10 ms timer kept ticking while the job trained
    assert float(stalls[2].split()[0]) <= float(stalls[3].split()[0]) <= float(stalls[4].split()[0])
    assert "4 pseudo-label views" in text  # supervised2d's prediction; diffrect's weak, strong, rectified
    idle, busy = _rows(text, "show a case")
    # the sample's 4 cases (2 labeled, 2 to review): the first shown on its own, then all again with a job
    assert int(idle[1]) == 3 and int(busy[1]) == 4
    loaded, drawn = (float(v.split()[0]) for v in idle[2].split("/"))
    assert 0 < loaded <= drawn


@pytest.mark.slow
def test_review_scores_bench_ranks_every_score_for_every_method_on_held_out_cases(tmp_path):
    """`python bench/review_loop.py` (its default mode): every review score, every SSL method, Spearman and hit
    rate against the true Dice of the shipped models' pseudo labels on the held-out volumes."""
    from backend.engine.scores import SCORES
    from backend.review.queue import DEFAULT_SORT_SCORE

    # about 2.5 min on an idle 2-core CPU (inference of 4 shipped models on 2 volumes, with flip TTA)
    out = _bench("review_loop.py", "--slabs", "3", "--draws", "40", "--k", "3", "--out", str(tmp_path), timeout=850)
    text = (tmp_path / "review_loop.md").read_text()
    assert text.strip() in out and "avg152_t1, pydeface_mean" in text
    for score in (*SCORES, "size"):
        (row,) = _rows(text, f"`{score}`")
        cells = row[2:5]  # diffrect, diffcl, genericssl
        for cell in cells:
            rho, hits, chance = re.fullmatch(r"([+-][0-9.]+) / ([0-9.]+) \(([0-9.]+)\)", cell).groups()
            assert -1.0 <= float(rho) <= 1.0 and 0.0 <= float(hits) <= 1.0
            assert float(chance) == pytest.approx(1 / 3, abs=0.2)  # k=3, ties aside
        assert int(row[5]) >= 12  # 3 methods x 2 cases x the slabs that hold brain
    best = re.search(r"Best measured \(highest worst-method Spearman\): `(\w+)`", text).group(1)
    assert best in SCORES and f"sorts by `{DEFAULT_SORT_SCORE}` by default" in text


@pytest.mark.slow
@pytest.mark.gui
def test_server_ui_bench_connects_the_dock_to_a_real_server_and_times_remote_case_loads(tmp_path):
    """bench/server_ui.py: `semiseg serve` in a subprocess, the review dock connected through its panel, every
    case of the queue shown over HTTP; the table has the connect time, the case loads and the event-loop gaps."""
    assert os.environ.get("DISPLAY")
    out = _bench("server_ui.py", "--rounds", "1", "--out", str(tmp_path), timeout=600)
    text = (tmp_path / "server-ui-cpu-2core.md").read_text()
    assert text.strip() in out and "the sample's 4 cases, 1 pseudo-label view(s)" in text
    (connect,) = _rows(text, "connect (Connect click")
    assert float(connect[2].split()[0]) > 0
    (first,) = _rows(text, "show a remote case, first time")
    assert int(first[1]) == 4  # every case of the queue came over HTTP
    loaded, drawn = (float(v.split()[0]) for v in first[2].split("/"))
    assert 0 < loaded <= drawn
    (gaps,) = _rows(text, "while cases load, first time")
    p50, p99, peak = (float(gaps[i].split()[0]) for i in (2, 3, 4))
    assert int(gaps[1]) > 0 and p50 <= p99 <= peak
