"""backend.remote.mirror: a ``semiseg serve`` project (a subprocess on 127.0.0.1, a copy of the real brain-tissue
sample with pseudo labels of two methods) mirrored into a local folder gives the review floor's free functions the
server's answers, fetches a case's views when the case is read, and writes through the server."""
from __future__ import annotations

import numpy as np
import pytest

from backend.errors import LabelConflictError
from backend.project import Project
from backend.project.runs import best_runs, methods_with_pseudo_labels, pseudo_runs, run_table
from backend.project.sample import copy_sample
from backend.remote.mirror import MirrorProject
from backend.review.corrections import accept_correction, flag_case, flags, list_drafts, save_draft
from backend.review.queue import review_rows
from backend.review.views import read_views
from helpers.plugin_fixtures import FAKE_RUN, write_fake_pseudo_labels
from helpers.semiseg_server import serving


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mirror")
    project = copy_sample(folder / "project", "brain_tissue")
    write_fake_pseudo_labels(project)
    # a trained run (no real weights: the run table only needs its run.json and a checkpoint file)
    (project.model_dir("diffcl", FAKE_RUN)).mkdir(parents=True)
    (project.model_dir("diffcl", FAKE_RUN) / "run.json").write_text('{"labeled_count": 2, "best": {"dice": 0.7}}')
    (project.model_dir("diffcl", FAKE_RUN) / "checkpoint.pt").write_bytes(b"x")
    with serving(project.root, folder / "server") as server:
        yield server, project


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("label_version", "draft")} for r in rows]


def test_the_mirror_answers_as_the_server_project(served, tmp_path):
    server, project = served
    mirror = MirrorProject.connect(server.client("boss"), tmp_path / "m")
    assert isinstance(mirror, Project) and mirror.name == project.name and mirror.labels == project.labels
    assert mirror.case_ids() == project.case_ids() and mirror.labeled_cases() == project.labeled_cases()
    assert methods_with_pseudo_labels(mirror) == ["diffcl", "genericssl"]
    assert pseudo_runs(mirror, "diffcl") == [FAKE_RUN]
    assert _strip(review_rows(mirror)) == _strip(review_rows(project))
    assert _strip(review_rows(mirror, score="confidence")) == _strip(review_rows(project, score="confidence"))
    assert best_runs(mirror) == best_runs(project) == {"diffcl": FAKE_RUN}
    assert [r["run"] for r in run_table(mirror)] == [FAKE_RUN]
    case = project.unlabeled_cases()[0]
    image = mirror.read_image(case)
    assert np.array_equal(image.array, project.read_image(case).array)
    views = read_views(mirror, case, image=image)
    expected = read_views(project, case)
    assert sorted(views) == sorted(expected) == ["diffcl:cs", "diffcl:ds", "genericssl:combined",
                                                 "genericssl:diffusion"]
    assert all(np.array_equal(views[k], expected[k]) for k in views)


def test_accept_flags_and_drafts_go_where_they_belong(served, tmp_path):
    server, project = served
    mirror = MirrorProject.connect(server.client("ann"), tmp_path / "m")
    case = project.unlabeled_cases()[-1]
    start = read_views(mirror, case, image=mirror.read_image(case))["diffcl:cs"]
    label = start.copy()
    label[label.shape[0] // 2, 10:20, 10:20] = 1
    version = mirror.label_version(case)
    assert version is None
    save_draft(mirror, case, mirror.image_geometry(case).like(label))
    assert list_drafts(mirror) == [case] and not (project.semiseg / "drafts").exists()  # drafts stay local
    record = accept_correction(mirror, case, label, source="diffcl:cs", start=start, seconds=12.0,
                               expected_version=version)
    assert np.array_equal(project.read_label(case).array, label)  # on the server's disk
    history = project.history(case)[-1]
    edited = int(np.count_nonzero(start != label))
    assert edited > 0 and history["user"] == "ann" and history["voxels_edited"] == record["voxels_edited"] == edited
    assert history["seconds_spent"] == 12.0 and history["started_from"] == "diffcl:cs"
    assert list_drafts(mirror) == [] and mirror.is_labeled(case)
    with pytest.raises(LabelConflictError):  # the version it started from is gone: 409
        accept_correction(mirror, case, label, source="diffcl:cs", expected_version=None)
    # a flag set on the mirror reaches the server on the next sync, and one cleared there comes back
    other = project.unlabeled_cases()[0]
    flag_case(mirror, other, "check the thalamus")
    mirror.sync()
    assert other in flags(project) and flags(project)[other]["user"] == "ann"
    from backend.review.corrections import unflag_case

    unflag_case(project, other)
    mirror.sync()
    assert other not in flags(mirror)
