"""The review dock driven as a user would, on the real brain-tissue sample with hand-made pseudo labels
(napari viewer under Xvfb; no training needed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from backend.review.corrections import flags, load_draft
from backend.review.views import MAJORITY, disagreement, majority_vote, read_views
from backend.review.colors import label_color
from backend.io.volume import read_volume
from napari_semiseg.review import CORRECTION, DISAGREEMENT, KEEP, ReviewDock
from helpers.plugin_fixtures import FAKE_RUN, FAKE_VIEWS, sort_by

pytest_plugins = ["helpers.plugin_fixtures"]  # its fixtures: answers, docks, reviewed_project

pytestmark = pytest.mark.gui
REPO = Path(__file__).resolve().parents[2]
VIEW_NAMES = sorted(f"{m}:{v}" for m, views in FAKE_VIEWS.items() for v in views)


@pytest.fixture(autouse=True)
def _answered(answers):
    """Every question a dock asks in this module is answered by the ``answers`` fixture."""
    return answers


@pytest.fixture
def dock(make_napari_viewer, qtbot, reviewed_project):
    viewer = make_napari_viewer()
    widget = ReviewDock(viewer)
    viewer.window.add_dock_widget(widget, name="Review pseudo labels")
    with qtbot.waitSignal(widget.table_refreshed, timeout=20000):
        widget.open_project(reviewed_project.root)
    yield widget
    widget.editor.autosave.stop()
    widget._baseline = None  # nothing left to ask about at teardown


def load(qtbot, dock, case=None):
    with qtbot.waitSignal(dock.case_loaded, timeout=30000) as blocker:
        if case is None:
            dock.next_case()
        else:
            dock.select_case(case)
    return blocker.args[0]


def test_table_is_sorted_most_doubtful_first_and_filters(dock, qtbot, reviewed_project):
    project = reviewed_project
    sort_by(qtbot, dock, "mean")  # the agreement between each method's views
    cases = dock.table_cases()
    scores = {m: project.scores(m)["cases"] for m in FAKE_VIEWS}
    unlabeled = project.unlabeled_cases()
    expected = sorted(unlabeled, key=lambda c: min(scores[m][c]["agreement_mean"] for m in FAKE_VIEWS))
    assert cases == expected + project.labeled_cases()
    headers = [dock.table.horizontalHeaderItem(i).text() for i in range(dock.table.columnCount())]
    assert headers == ["case", "status", "diffcl\nagreement Dice\nmean (worst) \u25b2",
                       "genericssl\nagreement Dice\nmean (worst) \u25b2"]
    header = dock.table.horizontalHeader()  # no header or cell is cut: every column is as wide as its text
    metrics = dock.table.fontMetrics()
    for j, text in enumerate(headers):
        widest = max(metrics.horizontalAdvance(line) for line in text.splitlines())
        assert header.sectionSize(j) >= widest, (text, header.sectionSize(j), widest)
    first = expected[0]
    assert dock.table.item(0, 2).text() == (f"{scores['diffcl'][first]['agreement_mean']:.3f} "
                                            f"({scores['diffcl'][first]['agreement_worst']:.3f})")
    assert dock.table.item(len(cases) - 1, 1).text() == "labeled"
    assert dock.table.item(0, 1).text() == "to review"
    dock.filter_combo.setCurrentText("labeled")
    assert dock.table_cases() == project.labeled_cases()
    dock.filter_combo.setCurrentText("unlabeled")
    assert dock.table_cases() == expected
    dock.filter_combo.setCurrentText("all cases")
    assert f"{len(cases)} cases, {len(project.labeled_cases())} labeled" in dock.project_label.text()
    assert dock.run_combo.count() == 3  # latest of every method + one run per method
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):  # one method's run: only its scores
        dock.run_combo.setCurrentIndex(dock.run_combo.findData(f"diffcl/{FAKE_RUN}"))
    assert dock.methods_in_table() == ["diffcl"] and dock.table.columnCount() == 3


def test_case_layers_names_scale_dtype_and_colours(dock, qtbot, reviewed_project):
    project = reviewed_project
    case = load(qtbot, dock)
    assert case == dock.table_cases()[0]
    viewer = dock.viewer
    names = [layer.name for layer in viewer.layers]
    assert names == [case, *VIEW_NAMES, DISAGREEMENT]
    image = project.read_image(case)
    spacing_zyx = tuple(image.spacing[::-1])
    views = read_views(project, case)
    for layer in viewer.layers:
        assert tuple(layer.scale) == pytest.approx(spacing_zyx)
        assert layer.metadata["geometry"]["shape"] == list(image.shape)
        if layer.name in VIEW_NAMES:
            assert layer._type_string == "labels" and layer.data.dtype == np.uint8
            assert np.array_equal(layer.data, views[layer.name])
            for k in (1, 2):  # one colour per class, the same in every layer (the shared palette)
                assert np.allclose(layer.colormap.map(k)[:3], label_color(k), atol=1e-6)
    assert viewer.layers[case].data.shape == image.shape
    # the outline shows one method's disagreement (its own views), the first method's by default
    expected = disagreement([views["diffcl:cs"], views["diffcl:ds"]])
    layer = viewer.layers[DISAGREEMENT]
    assert dock.disagreement_shown() == "diffcl"
    assert layer.data.dtype == np.uint8 and layer.contour > 0 and layer.visible
    assert np.array_equal(layer.data, expected) and expected.any()
    assert f"{int(expected.sum())} voxels (diffcl)" in dock.status.text()
    only_first = [layer.name for layer in viewer.layers if layer.name in VIEW_NAMES and layer.visible]
    assert only_first == [VIEW_NAMES[0]]


def test_correct_and_accept_grows_the_labeled_set(dock, qtbot, reviewed_project):
    project = reviewed_project
    case = load(qtbot, dock)
    dock.start_from("diffcl:cs")
    layer = dock.viewer.layers[CORRECTION]
    start = read_views(project, case)["diffcl:cs"]
    assert layer.data.dtype == np.uint8 and np.array_equal(layer.data, start)
    assert dock.viewer.layers.selection.active is layer and layer.mode == "paint"
    assert not dock.has_unsaved_edits()
    # paint a 2 mm brush of WM in the middle slice, erase a block through the edit API, then undo the erase
    z = image_mid = start.shape[0] // 2
    layer.brush_size = 6
    layer.paint((z, start.shape[1] // 2, start.shape[2] // 2), 2)
    painted = layer.data.copy()
    idx = np.nonzero(layer.data[z] > 0)
    block = (np.full(50, image_mid), idx[0][:50], idx[1][:50])
    layer.data_setitem(block, 0)
    assert np.count_nonzero(layer.data[block]) == 0
    layer.undo()
    assert np.array_equal(layer.data, painted)
    assert dock.has_unsaved_edits()
    edited = int(np.count_nonzero(painted != start))
    assert edited > 0
    before = len(project.labeled_cases())
    dock.advance_check.setChecked(False)
    with qtbot.waitSignal(dock.accepted, timeout=30000) as blocker, \
            qtbot.waitSignal(dock.table_refreshed, timeout=30000):
        dock.accept()
    record = blocker.args[1]
    assert record["started_from"] == "diffcl:cs" and record["voxels_edited"] == edited
    assert record["seconds_spent"] >= 0
    assert len(project.labeled_cases()) == before + 1 and project.is_labeled(case)
    written = read_volume(project.label_path(case))
    assert project.read_image(case).geometry_mismatch(written) is None
    assert np.array_equal(written.array, painted)
    assert project.history(case)[-1]["voxels_edited"] == edited
    assert f"{before + 1} labeled" in dock.project_label.text()
    row = dock.table_cases().index(case)
    assert dock.table.item(row, 1).text() == "labeled"
    assert not dock.has_unsaved_edits()


def test_accept_moves_on_to_the_next_doubtful_case(dock, qtbot, reviewed_project):
    first = load(qtbot, dock)
    second = [c for c in dock.table_cases() if c != first and not reviewed_project.is_labeled(c)][0]
    dock.view_combo.setCurrentIndex(dock.view_combo.findData("genericssl:combined"))
    with qtbot.waitSignal(dock.case_loaded, timeout=60000) as blocker:
        dock.accept()  # no correction yet: the chosen view as it is
    assert blocker.args[0] == second
    assert reviewed_project.history(first)[-1]["source"] == "genericssl:combined"


def test_majority_vote_start_and_flag(dock, qtbot, reviewed_project):
    case = load(qtbot, dock)
    with qtbot.waitSignal(dock.correction_started, timeout=20000):
        dock.start_from(MAJORITY)
    views = read_views(reviewed_project, case)
    expected = majority_vote(list(views.values()), reviewed_project.num_classes)
    assert np.array_equal(dock.viewer.layers[CORRECTION].data, expected)
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
        dock.toggle_flag()
    assert case in flags(reviewed_project)
    dock.filter_combo.setCurrentText("flagged")
    assert dock.table_cases() == [case]
    assert dock.table.item(0, 1).text() == "to review, flagged"


def test_keyboard_shortcut_goes_to_the_next_case(dock, qtbot):
    from napari.utils.key_bindings import KeyBinding

    bindings = {str(KeyBinding.from_str(k)) if not isinstance(k, KeyBinding) else str(k): v
                for k, v in dock.viewer.keymap.items()}
    handler = bindings[str(KeyBinding.from_str("Shift-N"))]
    with qtbot.waitSignal(dock.case_loaded, timeout=30000) as blocker:
        handler(dock.viewer)
    assert blocker.args[0] == dock.table_cases()[0]


def test_switching_case_with_edits_asks_and_keeps_a_draft(dock, qtbot, reviewed_project, answers):
    project = reviewed_project
    case = load(qtbot, dock)
    dock.start_from("genericssl:diffusion")
    layer = dock.viewer.layers[CORRECTION]
    layer.data_setitem((np.array([1, 2]), np.array([3, 3]), np.array([4, 5])), 2)
    edited = layer.data.copy()
    other = dock.table_cases()[1]
    answers.queue = ["Cancel"]
    assert dock.select_case(other) is False  # the user stays
    assert dock.case == case and answers.asked[-1][0] == "Unsaved correction"
    answers.queue = [KEEP]
    with qtbot.waitSignal(dock.case_loaded, timeout=30000):
        assert dock.select_case(other)
    volume, info = load_draft(project, case)
    assert np.array_equal(volume.array, edited) and info["started_from"] == "genericssl:diffusion"
    # back to the first case: the draft is offered and restored
    answers.queue = ["Restore"]
    load(qtbot, dock, case)
    assert answers.asked[-1][0] == "Unsaved correction found"
    assert np.array_equal(dock.viewer.layers[CORRECTION].data, edited)


def test_autosave_writes_a_draft_while_editing(dock, qtbot, reviewed_project):
    dock.autosave_ms = 200
    case = load(qtbot, dock)
    dock.start_from("diffcl:ds")
    layer = dock.viewer.layers[CORRECTION]
    with qtbot.waitSignal(dock.draft_saved, timeout=10000):
        layer.paint((10, 40, 40), 1)
    volume, _info = load_draft(reviewed_project, case)
    assert np.array_equal(volume.array, layer.data)


def test_closing_with_unsaved_edits_asks(dock, qtbot, reviewed_project, answers):
    case = load(qtbot, dock)
    dock.start_from("diffcl:cs")
    dock.viewer.layers[CORRECTION].data_setitem((np.array([5]), np.array([5]), np.array([5])), 1)
    window = dock.viewer.window._qt_window
    window.show()
    qtbot.waitExposed(window)
    answers.queue = ["Cancel"]
    assert window.close() is False  # the user cancels: the window stays open
    assert answers.asked[-1][0] == "Unsaved correction" and window.isVisible()
    assert load_draft(reviewed_project, case) is None
    # "keep as draft": the close goes ahead (the event filter lets the event through) and the draft is written;
    # the event goes to the filter directly so that the viewer fixture can still close the window itself
    from qtpy.QtGui import QCloseEvent

    answers.queue = [KEEP]
    assert dock._close_guard.eventFilter(window, QCloseEvent()) is False
    assert len(answers.asked) == 2
    assert load_draft(reviewed_project, case) is not None


DRAFT_SCRIPT = textwrap.dedent("""
    import sys, time
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_semiseg.review import ReviewDock

    root = sys.argv[1]
    viewer = napari.Viewer(show=False)
    dock = ReviewDock(viewer)
    dock.autosave_ms = 100
    app = QApplication.instance()
    dock.open_project(root)
    def wait(cond, timeout=60):
        end = time.time() + timeout
        while not cond() and time.time() < end:
            app.processEvents(); time.sleep(0.01)
    wait(lambda: dock.table_cases())
    dock.next_case()
    wait(lambda: dock.case is not None)
    dock.start_from("diffcl:cs")
    layer = viewer.layers["correction"]
    layer.data_setitem((layer.data.nonzero()[0][:300], layer.data.nonzero()[1][:300], layer.data.nonzero()[2][:300]), 0)
    saved = []
    dock.draft_saved.connect(saved.append)
    wait(lambda: saved)
    print("DRAFT", dock.case, int(layer.data.sum()), flush=True)
    while True:  # edits on screen, the process then gets killed
        app.processEvents(); time.sleep(0.01)
""")


def test_draft_survives_a_killed_viewer(make_napari_viewer, qtbot, reviewed_project, answers, tmp_path):
    script = tmp_path / "edit_then_die.py"
    script.write_text(DRAFT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(reviewed_project.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=os.environ.copy())
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("DRAFT") or not line and proc.poll() is not None:
                break
        assert line.startswith("DRAFT"), f"the child did not save a draft: {line!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, case, total = line.split()
    assert proc.returncode == -signal.SIGKILL
    viewer = make_napari_viewer()
    dock = ReviewDock(viewer)
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
        dock.open_project(reviewed_project.root)
    assert "draft" in dock.table.item(dock.table_cases().index(case), 1).text()
    answers.queue = ["Restore"]
    load(qtbot, dock, case)
    assert answers.asked[-1][0] == "Unsaved correction found"
    correction = viewer.layers[CORRECTION].data
    assert int(correction.sum()) == int(total)
    start = read_views(reviewed_project, case)["diffcl:cs"]
    assert np.count_nonzero(correction != start) == 300
    dock._baseline = None


def test_event_loop_keeps_running_while_a_case_loads_and_is_accepted(dock, qtbot):
    """Reading volumes, voting and writing labels run in threads, layers are reused from case to case: the
    event loop keeps ticking (a 10 ms timer) while the next case loads, a correction starts and is accepted."""
    from qtpy.QtCore import QTimer

    dock.advance_check.setChecked(False)
    load(qtbot, dock)  # warm-up: napari builds each layer's visual once (shader compilation, imports)
    dock.start_from("diffcl:cs")
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)
    t0 = time.perf_counter()
    load(qtbot, dock, dock.table_cases()[1])
    with qtbot.waitSignal(dock.correction_started, timeout=20000):
        dock.start_from(MAJORITY)
    dock.correction_layer.paint((20, 40, 40), 2)
    with qtbot.waitSignal(dock.accepted, timeout=30000):
        dock.accept()
    timer.stop()
    print(f"wall {time.perf_counter() - t0:.2f} s")
    worst = max(gaps)
    print(f"event-loop gaps while loading/correcting/accepting ({sum(gaps):.2f} s): max {worst * 1000:.0f} ms, "
          f"median {np.median(gaps) * 1000:.0f} ms over {len(gaps)} ticks")
    assert np.median(gaps) < 0.05
    assert worst < 0.5


def test_export_accepted_labels_as_slicer_segmentation(dock, qtbot, reviewed_project, tmp_path):
    import SimpleITK as sitk

    dock.export_source.setCurrentIndex(dock.export_source.findData("labels"))
    dock.export_format.setCurrentText("seg.nrrd")
    with qtbot.waitSignal(dock.exported, timeout=30000) as blocker:
        dock.export_to(tmp_path / "out")
    paths = blocker.args[0]  # one file per labeled case
    assert sorted(Path(p).name for p in paths) == sorted(f"{c}.seg.nrrd" for c in reviewed_project.labeled_cases())
    case = reviewed_project.labeled_cases()[0]
    path = next(p for p in paths if Path(p).name == f"{case}.seg.nrrd")
    back = read_volume(path)
    assert reviewed_project.read_image(case).geometry_mismatch(back) is None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    assert reader.GetMetaData("Segment1_Name") == "WM"
    # a method's pseudo labels, as NIfTI
    dock.export_source.setCurrentIndex(dock.export_source.findData("diffcl"))
    dock.export_format.setCurrentText("nii.gz")
    with qtbot.waitSignal(dock.exported, timeout=30000) as blocker:
        dock.export_to(tmp_path / "pseudo")
    assert sorted(Path(p).name for p in blocker.args[0]) == sorted(
        f"{c}.nii.gz" for c in reviewed_project.unlabeled_cases())


def test_open_sample_copies_it_once(make_napari_viewer, qtbot, tmp_path):
    from backend.project.sample import sample_root

    viewer = make_napari_viewer()
    dock = ReviewDock(viewer)
    before = sorted(p.name for p in (sample_root() / "lesions").rglob("*"))
    with qtbot.waitSignal(dock.table_refreshed, timeout=20000):
        project = dock.open_sample("lesions", dest=tmp_path / "my-sample")
    assert project.root == (tmp_path / "my-sample").resolve() and len(project.case_ids()) == 2
    assert dock.table_cases() == ["radiomics_lung2", "radiomics_brain1"]  # unlabeled first
    (tmp_path / "my-sample" / "semiseg" / "marker").write_text("kept")
    dock.open_sample("lesions", dest=tmp_path / "my-sample")  # already there: opened, not copied over
    assert (tmp_path / "my-sample" / "semiseg" / "marker").is_file()
    assert sorted(p.name for p in (sample_root() / "lesions").rglob("*")) == before


def test_main_opens_napari_with_both_docks_on_the_first_case(qtbot, reviewed_project):
    from napari_semiseg.__main__ import open_viewer

    viewer, review_dock, training_dock = open_viewer(reviewed_project.root, show=False)
    try:
        qtbot.waitUntil(lambda: review_dock.case is not None, timeout=30000)
        assert review_dock.case == review_dock.table_cases()[0]
        assert training_dock.state is review_dock.state
        assert set(viewer.window.dock_widgets) >= {"Review pseudo labels", "Train and infer"}
    finally:
        review_dock._baseline = None
        training_dock._choices_process.kill()
        training_dock._choices_process.waitForFinished(5000)
        viewer.close()
