"""The review dock: go through the cases most doubtful first, compare the pseudo-label views of every method,
correct one and accept it into the labeled set.

What the reviewer sees: a class legend (name and colour, the same colours in every layer); the table with each
method's agreement Dice between its views; the views of a case, one at a time (*Next view*, Shift+V, cycles
through them); where one method's views (or all views) disagree, as an outline (Shift+D toggles it, hidden in 3D,
where an outline cannot be drawn); and the disagreement per slice, a click (or *Worst slice*, Shift+W) away.

Before writing, the dock asks when the label is empty or drops a class that the views or the accepted label have
(:func:`backend.review.corrections.accept_warnings`), and when the case's label changed on disk since the case was opened
(another viewer, the CLI: ``Project.label_version`` is recorded when a case is shown and checked by
``Project.accept``): overwrite it, or keep the correction as a draft.

All file reading, voting and writing runs in napari ``thread_worker`` threads; the main thread only builds
layers and widgets.  The logic lives in :mod:`backend.review`; this module is the Qt layer over it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from backend.errors import LabelConflictError

from backend.review.corrections import accept_correction, accept_warnings, discard_draft, flag_case, flags, load_draft, save_draft, unflag_case
from backend.review.queue import review_rows
from backend.review.views import ALL_METHODS, MAJORITY, disagreement_by_method, majority_vote, read_views, slice_profile, worst_slice
from backend.errors import InputError
from backend.project import Project
from backend.io.volume import Volume
from backend.project.runs import methods_with_pseudo_labels, pseudo_runs
from napari_semiseg import _state
from napari_semiseg._layers import (
    geometry_metadata,
    label_colormap,
    label_rgb,
    layer_scale,
    set_if_changed,
    single_colormap,
)
from napari_semiseg._plot import DISAGREEMENT_BAR, ProfilePlot
from napari_semiseg._state import ProjectState, alive, start_worker

CORRECTION = "correction"
DISAGREEMENT = "disagreement"
DISAGREEMENT_RGB = DISAGREEMENT_BAR
OUTLINE = 1  # the disagreement layer's contour width (napari Labels ``contour``; 0 would fill)
FILTERS = ("all cases", "unlabeled", "labeled", "flagged")
SAMPLE_HOME = Path.home() / "semiseg-sample"
KEEP, DISCARD, CANCEL = "Keep as draft", "Discard edits", "Cancel"
ACCEPT_ANYWAY, OVERWRITE = "Accept anyway", "Overwrite"


class ReviewDock(QWidget):
    """Review and correct pseudo labels, most doubtful case first (see the module docstring)."""

    table_refreshed = Signal()
    case_loaded = Signal(str)
    correction_started = Signal(str)
    accepted = Signal(str, dict)
    draft_saved = Signal(str)
    exported = Signal(list)
    busy_changed = Signal(bool)

    #: autosave a draft this many ms after the first unsaved edit
    autosave_ms = 5000

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumWidth(440)
        self.viewer = napari_viewer
        self.state = ProjectState.for_viewer(napari_viewer)
        self.case: str | None = None
        self.image: Volume | None = None
        self.views: dict[str, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.correction_layer = None
        self._layers: dict[str, Any] = {}  # the layers this dock made, by role
        self._baseline: np.ndarray | None = None    # what the correction is compared to for "unsaved"
        self._start: np.ndarray | None = None       # the view the correction started from
        self._start_source = ""
        self._case_t0 = time.monotonic()
        self._seconds_before = 0.0                  # time spent in earlier sessions (from a draft)
        self._load_token = 0
        self._pending_case: str | None = None
        self._busy = False
        self._disagreement: dict[str, np.ndarray] = {}  # per method (and all methods) of the open case
        self._profiles: dict[str, np.ndarray] = {}      # their per-slice voxel counts
        self._accepted: np.ndarray | None = None        # the case's accepted label when it was opened
        self._label_version: Any = None                 # Project.label_version of the case when it was opened
        self._version_known = False
        self._wanted_disagreement: str | None = None    # whose disagreement the reviewer chose (kept across cases)
        self._build_ui()
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.timeout.connect(self.save_draft)
        self.state.project_changed.connect(self._on_project_changed)
        self.state.pseudo_changed.connect(self.refresh)
        self.state.labels_changed.connect(self._on_labels_changed)
        self._close_guard = _CloseGuard(self)
        window = getattr(getattr(napari_viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._close_guard)
        self._bind_keys()
        dims = getattr(napari_viewer, "dims", None)
        if dims is not None:
            dims.events.ndisplay.connect(self._on_ndisplay)
            dims.events.current_step.connect(self._on_step)
        if self.state.project is not None:
            self._on_project_changed(self.state.project)

    # ---- UI --------------------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        top = QHBoxLayout()
        self.open_button = QPushButton("Open project...")
        self.open_button.clicked.connect(self._choose_project)
        self.sample_combo = QComboBox()
        self.sample_combo.addItems(["brain_tissue", "lesions"])
        self.sample_button = QPushButton("Open sample copy")
        self.sample_button.setToolTip(f"Copy the sample project to {SAMPLE_HOME}/<name> (once) and open it")
        self.sample_button.clicked.connect(lambda: self.open_sample(self.sample_combo.currentText()))
        top.addWidget(self.open_button)
        top.addWidget(self.sample_combo)
        top.addWidget(self.sample_button)
        layout.addLayout(top)

        self.project_label = QLabel("No project open")
        self.project_label.setWordWrap(True)
        layout.addWidget(self.project_label)

        grid = QGridLayout()
        grid.addWidget(QLabel("Run"), 0, 0)
        self.run_combo = QComboBox()
        self.run_combo.currentIndexChanged.connect(lambda _i: self.refresh())
        grid.addWidget(self.run_combo, 0, 1)
        grid.addWidget(QLabel("Show"), 1, 0)
        self.filter_combo = QComboBox()
        self.filter_combo.addItems(FILTERS)
        self.filter_combo.currentIndexChanged.connect(lambda _i: self._fill_table())
        grid.addWidget(self.filter_combo, 1, 1)
        layout.addLayout(grid)

        self.table = QTableWidget(0, 3)
        self.table.setToolTip("Agreement Dice between the views of each method (mean over classes, and the worst "
                              "class); unlabeled cases first, the least agreed on at the top")
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.cellDoubleClicked.connect(lambda row, _col: self._select_row(row))
        self.table.itemSelectionChanged.connect(self._on_table_selection)
        layout.addWidget(self.table, stretch=1)

        self.legend_box = QGroupBox("Classes")
        self.legend_layout = QGridLayout(self.legend_box)
        self.legend_layout.setHorizontalSpacing(10)
        layout.addWidget(self.legend_box)

        compare = QGroupBox("Compare views")
        compare_layout = QGridLayout(compare)
        self.disagreement_check = QCheckBox("Disagreement outline  [Shift+D]")
        self.disagreement_check.setChecked(True)
        self.disagreement_check.setToolTip("Outline where the views of the chosen method differ (not drawn in 3D)")
        self.disagreement_check.toggled.connect(lambda _on: self._apply_disagreement())
        self.disagreement_combo = QComboBox()
        self.disagreement_combo.setToolTip("Whose views the outline and the slice profile compare")
        self.disagreement_combo.currentIndexChanged.connect(self._on_disagreement_chosen)
        compare_layout.addWidget(self.disagreement_check, 0, 0)
        compare_layout.addWidget(self.disagreement_combo, 0, 1)
        self.cycle_button = QPushButton("Next view  [Shift+V]")
        self.cycle_button.setToolTip("Show the next pseudo-label view alone (the others hidden)")
        self.cycle_button.clicked.connect(lambda: self.cycle_view())
        self.worst_button = QPushButton("Worst slice  [Shift+W]")
        self.worst_button.setToolTip("Go to the slice where the views disagree most")
        self.worst_button.clicked.connect(lambda: self.go_to_worst_slice())
        compare_layout.addWidget(self.cycle_button, 1, 0)
        compare_layout.addWidget(self.worst_button, 1, 1)
        self.profile_plot = ProfilePlot()
        self.profile_plot.slice_clicked.connect(self.go_to_slice)
        compare_layout.addWidget(self.profile_plot, 2, 0, 1, 2)
        layout.addWidget(compare)

        nav = QHBoxLayout()
        self.next_button = QPushButton("Next case  [Shift+N]")
        self.next_button.clicked.connect(self.next_case)
        self.skip_button = QPushButton("Skip")
        self.skip_button.clicked.connect(self.skip)
        self.flag_button = QPushButton("Flag")
        self.flag_button.setToolTip("Put this case aside for a second look (semiseg/flags.json); again to unflag")
        self.flag_button.clicked.connect(self.toggle_flag)
        for button in (self.next_button, self.skip_button, self.flag_button):
            nav.addWidget(button)
        layout.addLayout(nav)

        edit = QGroupBox("Correct")
        edit_layout = QGridLayout(edit)
        edit_layout.addWidget(QLabel("Start from"), 0, 0)
        self.view_combo = QComboBox()
        edit_layout.addWidget(self.view_combo, 0, 1)
        self.start_button = QPushButton("Start from view")
        self.start_button.setToolTip("Copy this view (or the majority vote of all views) into the editable "
                                     "'correction' layer; paint, erase, fill and undo (Ctrl+Z) edit it")
        self.start_button.clicked.connect(lambda: self.start_from(self.view_combo.currentData()))
        edit_layout.addWidget(self.start_button, 0, 2)
        self.accept_button = QPushButton("Accept  [Shift+A]")
        self.accept_button.setToolTip("Validate the correction and add it to the labeled set")
        self.accept_button.clicked.connect(self.accept)
        edit_layout.addWidget(self.accept_button, 1, 0, 1, 2)
        self.advance_check = QCheckBox("then next case")
        self.advance_check.setChecked(True)
        edit_layout.addWidget(self.advance_check, 1, 2)
        layout.addWidget(edit)

        export = QGroupBox("Export")
        export_layout = QHBoxLayout(export)
        self.export_source = QComboBox()
        self.export_format = QComboBox()
        self.export_format.addItems(["nii.gz", "nrrd", "seg.nrrd"])
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(self._choose_export_dest)
        export_layout.addWidget(self.export_source)
        export_layout.addWidget(self.export_format)
        export_layout.addWidget(self.export_button)
        layout.addWidget(export)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self._update_buttons()

    def _bind_keys(self) -> None:
        bind = getattr(self.viewer, "bind_key", None)
        if bind is None:
            return
        bind("Shift-N", lambda _viewer: self.next_case() if alive(self) else None, overwrite=True)
        bind("Shift-A", lambda _viewer: self.accept() if alive(self) else None, overwrite=True)
        bind("Shift-V", lambda _viewer: self.cycle_view() if alive(self) else None, overwrite=True)
        bind("Shift-D", lambda _viewer: self.disagreement_check.toggle() if alive(self) else None, overwrite=True)
        bind("Shift-W", lambda _viewer: self.go_to_worst_slice() if alive(self) else None, overwrite=True)

    def _update_buttons(self) -> None:
        has_project = self.state.project is not None
        has_case = self.case is not None and not self._busy
        self.next_button.setEnabled(has_project and not self._busy)
        self.skip_button.setEnabled(has_case)
        self.flag_button.setEnabled(has_case)
        self.start_button.setEnabled(has_case and self.view_combo.count() > 0)
        self.accept_button.setEnabled(has_case and (self.correction_layer is not None or self.view_combo.count() > 0))
        self.cycle_button.setEnabled(has_case and len(self.views) > 0)
        self.worst_button.setEnabled(has_case and bool(self._disagreement))
        self.export_button.setEnabled(has_project and not self._busy)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._update_buttons()
        self.busy_changed.emit(busy)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ---- project ---------------------------------------------------------------------------------------------
    @property
    def project(self) -> Project | None:
        return self.state.project

    def _choose_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a project folder (with dataset.json)")
        if folder:
            self.open_project(folder)

    def open_project(self, root: str | Path) -> Project | None:
        """Open the project folder ``root`` (shared with the training dock of this viewer)."""
        if not self._resolve_unsaved("open another project"):
            return None
        try:
            project = Project.open(root)
        except InputError as exc:
            from napari.utils.notifications import show_error

            show_error(str(exc))
            return None
        current = self.state.project
        if current is not None and current.root == project.root:
            self.state.project = project  # the same folder again: re-read it, keep the open case
            self.refresh()
            return project
        self._clear_case()
        self.state.set_project(project)
        return project

    def open_sample(self, task: str = "brain_tissue", dest: str | Path | None = None) -> Project | None:
        """Open a copy of sample project ``task`` at ``dest`` (default ``~/semiseg-sample/<task>``), copying it
        there first unless a project is already there (the installed sample is never written to)."""
        from backend.project.sample import copy_sample

        dest = Path(dest) if dest is not None else SAMPLE_HOME / task
        if not (dest / "dataset.json").is_file():
            try:
                copy_sample(dest, task)
            except InputError as exc:
                from napari.utils.notifications import show_error

                show_error(str(exc))
                return None
        return self.open_project(dest)

    def _on_project_changed(self, project: Project | None) -> None:
        self._clear_case()
        self._remove_layers()
        self._available = None
        self.rows = []
        self._fill_table()
        if project is not None:
            self._rebuild_runs(project, {})
        self._fill_legend(project)
        self._update_buttons()
        self.refresh()

    def _fill_legend(self, project: Project | None) -> None:
        """One swatch and name per class (the colours every layer uses), then the disagreement outline."""
        while self.legend_layout.count():
            item = self.legend_layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.legend: list[tuple[str, tuple[float, float, float]]] = []
        if project is None:
            return
        entries = [(f"{value} {name}", label_rgb(value)) for value, name in project.labels.items() if value != 0]
        entries.append(("views disagree (outline)", DISAGREEMENT_RGB))
        for i, (text, rgb) in enumerate(entries):
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            r, g, b = (int(round(255 * c)) for c in rgb)
            swatch.setStyleSheet(f"background-color: rgb({r}, {g}, {b}); border: 1px solid #888;")
            name = QLabel(text)
            name.setObjectName("legend_entry")
            row, col = divmod(i, 3)
            self.legend_layout.addWidget(swatch, row, 2 * col)
            self.legend_layout.addWidget(name, row, 2 * col + 1)
            self.legend.append((text, rgb))

    def _on_labels_changed(self, _case: str) -> None:
        self.refresh()

    def selected_runs(self) -> dict[str, str] | None:
        """``{method: run}`` chosen in the run box (None: each method's best run, ``default_runs``)."""
        data = self.run_combo.currentData()
        if not data:
            return None
        method, run = data.split("/", 1)
        return {method: run}

    # ---- the table -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the case table (off the main thread) and redraw it."""
        project = self.project
        if project is None:
            self.rows = []
            self._fill_table()
            return
        start_worker(self, _table_data, project, self.selected_runs(), on_done=self._on_rows)

    def _rebuild_runs(self, project: Project, available: dict[str, list[str]]) -> None:
        """Fill the run and export-source boxes from ``available`` (``{method: runs}``), keeping the choice."""
        current = self.run_combo.currentData()
        current_export = self.export_source.currentData()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        self.run_combo.addItem("each method's best run (by validation)", "")
        self.export_source.clear()
        self.export_source.addItem("accepted labels", "labels")
        for method, runs in available.items():
            for run in reversed(runs):
                self.run_combo.addItem(f"{method} / {run}", f"{method}/{run}")
            self.export_source.addItem(f"{method} pseudo labels (latest run)", method)
        self.run_combo.setCurrentIndex(max(0, self.run_combo.findData(current)))
        self.export_source.setCurrentIndex(max(0, self.export_source.findData(current_export)))
        self.run_combo.blockSignals(False)
        self._available = available

    def _on_rows(self, data: tuple[Project, list[dict[str, Any]], dict[str, list[str]]]) -> None:
        project, rows, available = data
        if project is not self.project:
            return  # another project was opened meanwhile
        if available != getattr(self, "_available", None):
            self._rebuild_runs(project, available)
        self.rows = rows
        labeled = sum(1 for r in rows if r["labeled"])
        self.project_label.setText(f"{project.name}: {len(rows)} cases, {labeled} labeled, "
                                   f"{len(rows) - labeled} to review\n{project.root}")
        self._fill_table()
        self._update_buttons()
        self.table_refreshed.emit()

    def visible_rows(self) -> list[dict[str, Any]]:
        """The rows shown under the current filter, in review order."""
        which = self.filter_combo.currentText()
        if which == "unlabeled":
            return [r for r in self.rows if not r["labeled"]]
        if which == "labeled":
            return [r for r in self.rows if r["labeled"]]
        if which == "flagged":
            return [r for r in self.rows if r.get("flagged")]
        return list(self.rows)

    def methods_in_table(self) -> list[str]:
        return sorted({m for r in self.rows for m in r["scores"]})

    def _fill_table(self) -> None:
        rows = self.visible_rows()
        # a method with one view (the supervised baseline) has no agreement to show: no column of dashes
        methods = [m for m in self.methods_in_table()
                   if any(r["scores"].get(m, {}).get("mean") is not None for r in self.rows)]
        headers = ["case", "status"]
        for m in methods:  # one column per method keeps the table narrow enough for the dock
            headers.append(f"{m}\nagreement Dice\nmean (worst)")
        self.table.blockSignals(True)
        self.table.clearContents()
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        for j, m in enumerate(methods, start=2):
            self.table.horizontalHeaderItem(j).setToolTip(
                f"Dice between the pseudo-label views of {m}: the mean over classes, and in brackets the class "
                f"they agree on least. Low = the views disagree: a doubtful case")
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            notes = [n for n, on in (("flagged", row.get("flagged")), ("draft", row.get("draft"))) if on]
            cells = [row["case"], ", ".join(["labeled" if row["labeled"] else "to review", *notes])]
            for m in methods:
                s = row["scores"].get(m, {})
                cells.append(_fmt(s.get("mean")) if s.get("worst_class") is None
                             else f"{_fmt(s.get('mean'))} ({_fmt(s.get('worst_class'))})")
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row["case"])
                self.table.setItem(i, j, item)
            if row["case"] == self.case:
                self.table.selectRow(i)
        self.table.blockSignals(False)

    def _on_table_selection(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self._select_row(rows[0].row())

    def _select_row(self, index: int) -> None:
        item = self.table.item(index, 0)
        if item is not None and item.text() != self.case:
            self.select_case(item.text())

    def table_cases(self) -> list[str]:
        """Case names in the order the table shows them."""
        return [self.table.item(i, 0).text() for i in range(self.table.rowCount())]

    # ---- moving between cases ---------------------------------------------------------------------------------
    def next_case(self) -> str | None:
        """Go to the case after the current one in the table (the first when none is open)."""
        cases = self.table_cases()
        if not cases:
            return None
        if self.case in cases:
            i = cases.index(self.case) + 1
            if i >= len(cases):
                self._say("That was the last case in the table.")
                return None
        else:
            i = 0
        return cases[i] if self.select_case(cases[i]) else None

    def skip(self) -> str | None:
        """Leave this case as it is (a correction is kept as a draft after asking) and go to the next one."""
        return self.next_case()

    def toggle_flag(self) -> None:
        if self.project is None or self.case is None:
            return
        if self.case in flags(self.project):
            unflag_case(self.project, self.case)
            self._say(f"{self.case}: flag removed")
        else:
            flag_case(self.project, self.case)
            self._say(f"{self.case}: flagged for a second look")
        self.refresh()

    def select_case(self, case: str) -> bool:
        """Load ``case``: image, every pseudo-label view and their disagreement (read off the main thread).
        Returns False when the user chose to stay on the current case."""
        project = self.project
        if project is None:
            return False
        if case == self.case and self._pending_case is None:
            return True
        if not self._resolve_unsaved(f"open case {case}"):
            self._fill_table()  # put the selection back
            return False
        self._load_token += 1
        token = self._load_token
        self._pending_case = case
        self._say(f"Loading {case}...")
        self._set_busy(True)
        start_worker(self, _load_case, project, case, self.selected_runs(),
                     on_done=lambda payload: self._show_case(token, payload),
                     on_error=lambda exc: self._load_failed(token, exc))
        return True

    def _load_failed(self, token: int, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        if token == self._load_token:
            self._pending_case = None
            self._set_busy(False)
        show_error(f"Cannot open the case: {exc}")

    def _clear_case(self) -> None:
        """Forget the open case (its layers stay, to be reused by the next case: see :meth:`_show_case`)."""
        self._autosave.stop()
        self._retire_correction()
        self.case = None
        self.image = None
        self.views = {}
        self._baseline = self._start = None
        self._disagreement, self._profiles, self._accepted = {}, {}, None
        self._label_version, self._version_known = None, False
        self.view_combo.clear()
        self.disagreement_combo.blockSignals(True)
        self.disagreement_combo.clear()
        self.disagreement_combo.blockSignals(False)
        self.profile_plot.set_profile([])
        self._update_buttons()

    def _remove_layers(self) -> None:
        """Remove every layer this dock made (another project was opened)."""
        for layer in list(self._layers.values()):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._layers = {}
        self.correction_layer = None

    def _live(self, key: str):
        layer = self._layers.get(key)
        if layer is not None and layer not in self.viewer.layers:  # the user deleted it
            del self._layers[key]
            layer = None
        return layer

    # The layers of a case are updated in place when the previous case had a layer of the same name (setting
    # ``data`` costs a few ms); a new layer costs napari 50-300 ms of main-thread work (its vispy visual and
    # controls), so at most one is made per turn of the event loop and the viewer keeps drawing in between.
    def _layer_steps(self, payload: dict[str, Any]) -> list:
        project, case, image = self.project, payload["case"], payload["image"]
        scale = layer_scale(image)
        meta = geometry_metadata(image, project.image_path(case))
        label_meta = {**meta, "image_layer": case, "label_names": dict(project.labels)}
        steps = []

        def sync(key: str, data: np.ndarray | None, kind: str, **props: Any) -> None:
            layer = self._live(key)
            if data is None:  # this case has no such layer: hide it, empty (removing one costs more than a new one)
                if layer is not None:
                    set_if_changed(layer, "visible", False)
                    layer.data = np.zeros((1, 1, 1), np.uint8)
                    set_if_changed(layer, "name", f"{key} (none for this case)")
                return
            cmap_key = props.pop("cmap_key", None)
            contour = props.pop("contour", None)
            if layer is not None and layer._type_string == kind:
                layer.data = data
                colormap = props.pop("colormap", None)
                if colormap is not None and getattr(layer, "_semiseg_cmap", None) != cmap_key:
                    layer.colormap = colormap
                for name, value in props.items():
                    set_if_changed(layer, name, value)
            else:
                add = self.viewer.add_image if kind == "image" else self.viewer.add_labels
                layer = add(data, **props)
                self._layers[key] = layer
            if kind == "labels":
                layer._semiseg_cmap = cmap_key
                layer.editable = False
                if contour is not None:
                    set_if_changed(layer, "contour", contour)

        classes = ("classes", project.num_classes)
        steps.append(lambda: sync("image", image.array, "image", name=case, scale=scale, metadata=meta,
                                  contrast_limits=payload["contrast"]))
        steps.append(lambda: sync("accepted label", payload["label"], "labels", name="accepted label",
                                  scale=scale, metadata=label_meta, visible=False, cmap_key=classes,
                                  colormap=label_colormap(project.num_classes)))
        for i, (name, array) in enumerate(payload["views"].items()):
            steps.append(lambda name=name, array=array, i=i: sync(
                name, array, "labels", name=name, scale=scale, metadata=label_meta, opacity=0.5,
                visible=i == 0, cmap_key=classes, colormap=label_colormap(project.num_classes)))
        for key in [k for k in self._layers if ":" in k and k not in payload["views"]]:
            steps.append(lambda key=key: sync(key, None, "labels"))
        by_method = payload["disagreement"]
        shown = self._disagreement_choice(by_method)
        steps.append(lambda: sync(DISAGREEMENT, None if shown is None else by_method[shown], "labels",
                                  name=DISAGREEMENT, scale=scale, metadata=label_meta, opacity=1.0,
                                  visible=self._outline_wanted(), contour=OUTLINE, cmap_key="single",
                                  colormap=single_colormap(DISAGREEMENT_RGB)))
        return steps

    def _disagreement_choice(self, by_method: dict[str, np.ndarray]) -> str | None:
        """The disagreement to show: the one the reviewer chose when the case has it, else the first method's."""
        if self._wanted_disagreement in by_method:
            return self._wanted_disagreement
        return next(iter(by_method), None)

    def _on_disagreement_chosen(self, _index: int) -> None:
        self._wanted_disagreement = self.disagreement_combo.currentData()
        self._apply_disagreement(data=True)

    def _run_steps(self, token: int, steps: list, done) -> None:
        """Run ``steps`` a few at a time (at least one, then until 30 ms passed) per turn of the event loop."""
        t0 = time.perf_counter()
        while steps:
            if token != self._load_token:
                return
            steps.pop(0)()
            if time.perf_counter() - t0 > 0.03:
                break
        if steps:
            QTimer.singleShot(0, lambda: self._run_steps(token, steps, done) if alive(self) else None)
        elif token == self._load_token:
            done()

    def _show_case(self, token: int, payload: dict[str, Any]) -> None:
        if token != self._load_token:
            return  # a later selection won
        self._clear_case()
        self._run_steps(token, self._layer_steps(payload), lambda: self._case_shown(payload))

    def _case_shown(self, payload: dict[str, Any]) -> None:
        self._pending_case = None
        self._set_busy(False)
        case, image = payload["case"], payload["image"]
        self.case, self.image, self.views = case, image, payload["views"]
        self._disagreement, self._profiles = payload["disagreement"], payload["profiles"]
        self._accepted = payload["label"]
        self._label_version, self._version_known = payload["label_version"], True
        shown = self._disagreement_choice(self._disagreement)
        self.disagreement_combo.blockSignals(True)
        self.disagreement_combo.clear()
        for key in self._disagreement:
            self.disagreement_combo.addItem(f"of {key}" if key == ALL_METHODS else f"of {key}'s views", key)
        self.disagreement_combo.setCurrentIndex(max(0, self.disagreement_combo.findData(shown)))
        self.disagreement_combo.blockSignals(False)
        # layer order: image at the bottom, then views, disagreement, correction on top
        self.view_combo.clear()
        for name in self.views:
            self.view_combo.addItem(name, name)
        if len(self.views) > 1:
            self.view_combo.addItem("majority vote of all views", MAJORITY)
        if payload["label"] is not None:
            self.view_combo.addItem("accepted label", "accepted label")
        self._case_t0 = time.monotonic()
        self._seconds_before = 0.0
        first_view = self._live(next(iter(self.views), "image"))
        if first_view is not None:
            self.viewer.layers.selection.active = first_view
        scale = layer_scale(image)
        self.viewer.dims.set_point(0, image.shape[0] * scale[0] / 2)
        self.viewer.reset_view()
        self._apply_disagreement(data=False)
        n_dis = int(self._profiles[shown].sum()) if shown is not None else 0
        where = "" if shown is None else f" ({'all methods' if shown == ALL_METHODS else shown})"
        self._say(f"{case}: {len(self.views)} pseudo-label view(s)"
                  + (f", views disagree on {n_dis} voxels{where}" if self.views else ", no pseudo labels yet"))
        self._update_buttons()
        self._fill_table()
        self.case_loaded.emit(case)
        draft = payload.get("draft")
        if draft is not None:
            self._offer_draft(*draft)

    def _offer_draft(self, volume: Volume, info: dict[str, Any]) -> None:
        answer = _state.ask(self, "Unsaved correction found",
                            f"A draft correction of {self.case} was saved {info.get('time', '')[:19]} "
                            f"(started from {info.get('started_from', '?')}). Restore it?",
                            ["Restore", "Discard draft", "Not now"], default="Restore")
        if answer == "Restore":
            start = self.views.get(info.get("started_from", ""))
            self._make_correction(volume.array.astype(np.uint8), info.get("started_from", "draft"),
                                  start=start, baseline=volume.array.astype(np.uint8))
            self._seconds_before = float(info.get("seconds_spent", 0.0))
            self._say(f"{self.case}: draft restored")
        elif answer == "Discard draft":
            discard_draft(self.project, self.case)
            self.refresh()

    # ---- comparing views ------------------------------------------------------------------------------------------
    def _outline_wanted(self) -> bool:
        """The disagreement outline is drawn when asked for and the canvas is 2D (no outline in 3D)."""
        dims = getattr(self.viewer, "dims", None)
        return self.disagreement_check.isChecked() and (dims is None or dims.ndisplay == 2)

    def disagreement_shown(self) -> str | None:
        """Whose disagreement the outline and the slice profile show (None: the case has none)."""
        key = self.disagreement_combo.currentData()
        return key if key in self._disagreement else None

    def _apply_disagreement(self, data: bool = False) -> None:
        """Show the chosen method's disagreement (``data``: swap the layer's data to it) when wanted, its
        per-slice profile in the plot."""
        key = self.disagreement_shown()
        layer = self._live(DISAGREEMENT)
        if layer is not None and key is not None:
            if data:
                layer.data = self._disagreement[key]
            set_if_changed(layer, "visible", self._outline_wanted())
        elif layer is not None:
            set_if_changed(layer, "visible", False)
        self.profile_plot.set_profile([] if key is None else self._profiles[key], self.current_slice())

    def _on_ndisplay(self, _event: Any = None) -> None:
        if alive(self):
            self._apply_disagreement()

    def _on_step(self, _event: Any = None) -> None:
        if alive(self) and self._profiles:
            self.profile_plot.set_current(self.current_slice())

    def current_slice(self) -> int | None:
        """The axial slice on screen (index into the case's ``[z, y, x]`` arrays)."""
        if self.image is None:
            return None
        scale = layer_scale(self.image)[0]
        z = int(round(float(self.viewer.dims.point[0]) / scale))
        return min(max(z, 0), self.image.shape[0] - 1)

    def go_to_slice(self, z: int) -> None:
        """Show axial slice ``z`` of the open case."""
        if self.image is None:
            return
        z = min(max(int(z), 0), self.image.shape[0] - 1)
        self.viewer.dims.set_point(0, z * layer_scale(self.image)[0])
        self.profile_plot.set_current(z)

    def go_to_worst_slice(self) -> int | None:
        """Go to the slice where the shown disagreement is largest; returns it (None when the views agree)."""
        key = self.disagreement_shown()
        z = None if key is None else worst_slice(self._profiles[key])
        if z is None:
            self._say(f"{self.case}: the views agree on every slice" if self.case else "No case open")
            return None
        self.go_to_slice(z)
        self._say(f"{self.case}: slice {z}, {int(self._profiles[key][z])} voxels of disagreement "
                  f"({'all methods' if key == ALL_METHODS else key})")
        return z

    def visible_view(self) -> str | None:
        """The view shown when exactly one is visible, else None."""
        shown = [name for name in self.views if (layer := self._live(name)) is not None and layer.visible]
        return shown[0] if len(shown) == 1 else None

    def cycle_view(self) -> str | None:
        """Show the next pseudo-label view alone (after the visible one, in layer order); returns its name."""
        names = list(self.views)
        if not names:
            return None
        current = self.visible_view()
        nxt = names[(names.index(current) + 1) % len(names)] if current in names else names[0]
        for name in names:
            layer = self._live(name)
            if layer is not None:
                set_if_changed(layer, "visible", name == nxt)
        self._say(f"{self.case}: showing {nxt} ({names.index(nxt) + 1} of {len(names)})")
        return nxt

    # ---- correcting ---------------------------------------------------------------------------------------------
    def start_from(self, view: str | None) -> None:
        """Copy ``view`` (a ``<method>:<view>`` name, ``"majority"`` or ``"accepted label"``) into the editable
        ``correction`` layer."""
        if self.case is None or not view:
            return
        if self.has_unsaved_edits():
            answer = _state.ask(self, "Replace the correction?",
                                f"The correction of {self.case} has edits. Replace it with {view}?",
                                ["Replace", CANCEL])
            if answer != "Replace":
                return
        if view == MAJORITY:
            arrays = list(self.views.values())
            self._set_busy(True)
            start_worker(self, majority_vote, arrays, self.project.num_classes,
                         on_done=lambda array: (self._set_busy(False), self._make_correction(array, view)))
            return
        if view == "accepted label":
            layer = self._live("accepted label")
            array = None if layer is None else np.asarray(layer.data)
        else:
            array = self.views.get(view)
        if array is None:
            return
        self._make_correction(array.copy(), view)

    def _make_correction(self, array: np.ndarray, source: str, *, start: np.ndarray | None = None,
                         baseline: np.ndarray | None = None) -> None:
        """Show ``array`` in the editable ``correction`` layer (reused across cases, its undo history reset)."""
        project, image = self.project, self.image
        self._start = array.copy() if start is None else start
        self._baseline = self._start if baseline is None else baseline
        self._start_source = source
        meta = {**geometry_metadata(image, project.image_path(self.case)), "image_layer": self.case,
                "label_names": dict(project.labels), "started_from": source}
        data = np.ascontiguousarray(array, dtype=np.uint8)
        layer = self._live(CORRECTION)
        if layer is None:
            layer = self.viewer.add_labels(data, name=CORRECTION, scale=layer_scale(image), metadata=meta,
                                           colormap=label_colormap(project.num_classes), opacity=0.7)
            layer.events.paint.connect(self._on_edit)
            self._layers[CORRECTION] = layer
        else:
            layer.editable = False  # drops the undo history of the previous correction
            layer.data = data
            set_if_changed(layer, "scale", layer_scale(image))
            layer.metadata = meta
            if getattr(layer, "_semiseg_cmap", None) != ("classes", project.num_classes):
                layer.colormap = label_colormap(project.num_classes)
            set_if_changed(layer, "visible", True)
        layer._semiseg_cmap = ("classes", project.num_classes)
        layer.editable = True
        layer.selected_label = 1
        self.correction_layer = layer
        for name in self.views:
            other = self._live(name)
            if other is not None:
                set_if_changed(other, "visible", False)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        self._update_buttons()
        self._say(f"{self.case}: correcting, started from {source}")
        self.correction_started.emit(source)

    def _retire_correction(self) -> None:
        """Leaving a case: the correction layer stays in the list, hidden, empty and locked, for the next one."""
        layer = self._live(CORRECTION)
        self.correction_layer = None
        if layer is not None:
            layer.editable = False
            layer.visible = False
            layer.data = np.zeros((1, 1, 1), np.uint8)

    def _on_edit(self, _event: Any = None) -> None:
        if self.correction_layer is None:
            return
        if not self._autosave.isActive():
            self._autosave.start(int(self.autosave_ms))

    def has_unsaved_edits(self) -> bool:
        """True when the correction differs from what is on disk for it (the view it started from, its draft,
        or the label just accepted)."""
        layer = self.correction_layer
        if layer is None or self._baseline is None:
            return False
        return not np.array_equal(np.asarray(layer.data), self._baseline)

    def seconds_spent(self) -> float:
        return self._seconds_before + (time.monotonic() - self._case_t0)

    def _draft_info(self) -> dict[str, Any]:
        return {"started_from": self._start_source, "seconds_spent": round(self.seconds_spent(), 1),
                "runs": self.selected_runs()}

    def save_draft(self, *, wait: bool = False, force: bool = False) -> None:
        """Write the correction as the case's draft (in a thread unless ``wait``; ``force``: even without edits
        since it started, e.g. a view accepted as it is that could not be written)."""
        if self.correction_layer is None or self.case is None or self.image is None:
            return
        if not force and not self.has_unsaved_edits():
            return
        project, case = self.project, self.case
        volume = self.image.like(np.array(self.correction_layer.data, dtype=np.uint8))
        info = self._draft_info()
        if wait:
            save_draft(project, case, volume, info)
            self.draft_saved.emit(case)
            return
        start_worker(self, save_draft, project, case, volume, info,
                     on_done=lambda _path: self.draft_saved.emit(case))

    def _resolve_unsaved(self, what: str) -> bool:
        """Before leaving the case: ask what to do with unsaved edits.  False means stay."""
        if not self.has_unsaved_edits():
            return True
        answer = _state.ask(self, "Unsaved correction",
                            f"The correction of {self.case} is not accepted. Before you {what}: keep it as a "
                            f"draft (offered back when you open the case again) or discard it?",
                            [KEEP, DISCARD, CANCEL], default=KEEP)
        if answer == KEEP:
            self.save_draft(wait=True)
            return True
        if answer == DISCARD:
            self._autosave.stop()
            discard_draft(self.project, self.case)
            self._baseline = np.asarray(self.correction_layer.data).copy()
            return True
        return False

    # ---- accepting ---------------------------------------------------------------------------------------------
    def accept(self) -> None:
        """Validate the correction (or, with none, the chosen view as it is) and write it into the labeled set
        through the backend (in a thread); the table updates when it is written."""
        project, case = self.project, self.case
        if project is None or case is None or self._busy:
            return
        if self.correction_layer is None:
            view = self.view_combo.currentData()
            if view is None or view == MAJORITY:
                if view == MAJORITY:
                    self.start_from(view)
                    self._say("Majority vote computed; check it, then accept again.")
                return
            self.start_from(view)
        array = np.array(self.correction_layer.data, dtype=np.uint8)
        top = int(array.max())
        if top >= project.num_classes:
            from napari.utils.notifications import show_error

            show_error(f"{case}: the correction holds label {top}; this project declares "
                       f"{', '.join(f'{k}={v}' for k, v in project.labels.items())}. Fix it before accepting.")
            return
        references = {**self.views, "the accepted label": self._accepted}
        warnings = accept_warnings(array, references, project.labels)
        if warnings:
            answer = _state.ask(self, "Accept this label?",
                                f"The label of {case} " + "; ".join(warnings) + ". Accept it anyway?",
                                [ACCEPT_ANYWAY, CANCEL], default=CANCEL)
            if answer != ACCEPT_ANYWAY:
                self._say(f"{case}: not accepted (" + "; ".join(warnings) + ")")
                return
        self._write(case, array, check=True)

    def _write(self, case: str, array: np.ndarray, *, check: bool) -> None:
        """Accept ``array`` in a thread; ``check``: only if the label on disk is still the one the case was
        opened with."""
        self._autosave.stop()
        self._set_busy(True)
        self._say(f"{case}: accepting...")
        expected = {"expected_version": self._label_version} if check and self._version_known else {}
        start_worker(self, _accept, self.project, case, array, expected, source=self._start_source,
                     start=self._start, seconds=self.seconds_spent(),
                     on_done=lambda result: self._on_accepted(case, array, *result),
                     on_error=lambda exc: self._on_accept_failed(case, array, exc))

    def _on_accept_failed(self, case: str, array: np.ndarray, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        self._set_busy(False)
        if isinstance(exc, LabelConflictError) and case == self.case:
            self._on_conflict(case, array, exc)
            return
        show_error(f"Not accepted: {exc}")

    def _on_conflict(self, case: str, array: np.ndarray, exc: BaseException) -> None:
        """The label changed on disk since the case was opened: overwrite it, or keep the correction as a draft
        (reopen the case to see the other label, then restore the draft)."""
        answer = _state.ask(self, "The label changed on disk",
                            f"The label of {case} ({getattr(exc, 'path', None) or 'labelsTr'}) was written by "
                            f"someone else (another viewer or the command line) since you opened the case.\n"
                            f"Overwrite it with your correction, or keep your correction as a draft (open the case "
                            f"again to see their label and restore your draft)?", [OVERWRITE, KEEP], default=KEEP)
        if answer == OVERWRITE:
            self._write(case, array, check=False)
            return
        self.save_draft(wait=True, force=True)
        if self.correction_layer is not None:
            self._baseline = np.asarray(self.correction_layer.data).copy()  # what is on disk: the draft
        self._say(f"{case}: not accepted, the label on disk changed; your correction is kept as a draft (open "
                  f"the case again to compare)")

    def _on_accepted(self, case: str, array: np.ndarray, record: dict[str, Any], version: Any = None) -> None:
        self._set_busy(False)
        discard_draft(self.project, case)  # an autosave that was in flight while accepting
        if case == self.case:
            self._baseline = array
            self._accepted = array
            self._label_version = version
        self._say(f"{case}: accepted ({record.get('voxels_edited', 0)} voxels edited, "
                  f"{record.get('seconds_spent', 0):.0f} s on the case, written in {record['accept_seconds']:.2f} s)")
        self.accepted.emit(case, record)
        if self.advance_check.isChecked() and case == self.case:
            self.table_refreshed.connect(self._advance_once)
        self.state.labels_changed.emit(case)

    def _advance_once(self) -> None:
        self.table_refreshed.disconnect(self._advance_once)
        upcoming = [r["case"] for r in self.visible_rows() if not r["labeled"] and r["case"] != self.case]
        if upcoming:
            self.select_case(upcoming[0])

    # ---- export -----------------------------------------------------------------------------------------------
    def _choose_export_dest(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into folder")
        if folder:
            self.export_to(folder)

    def export_to(self, dest: str | Path) -> None:
        """Export the chosen source (accepted labels or a method's pseudo labels) in the chosen format into
        ``dest`` in each image's geometry (in a thread; ``exported`` carries the written paths)."""
        from backend.review.export import export

        source = self.export_source.currentData() or "labels"
        runs = self.selected_runs() or {}
        run = runs.get(source)  # the run picked in the run box, else the method's latest
        fmt = self.export_format.currentText()
        self._set_busy(True)

        def done(paths: list) -> None:
            from napari.utils.notifications import show_info

            self._set_busy(False)
            show_info(f"Exported {len(paths)} file(s) to {dest}")
            self.exported.emit([str(p) for p in paths])

        def failed(exc: BaseException) -> None:
            from napari.utils.notifications import show_error

            self._set_busy(False)
            show_error(f"Export failed: {exc}")

        start_worker(self, export, self.project, Path(dest), fmt=fmt, source=source, run=run,
                     on_done=done, on_error=failed)

    # ---- closing ------------------------------------------------------------------------------------------------
    def confirm_close(self) -> bool:
        """Called when the viewer window closes: True lets it close."""
        return self._resolve_unsaved("close")


class _CloseGuard(QObject):
    """Event filter on the viewer's main window: a close with unsaved edits asks first."""

    def __init__(self, dock: ReviewDock):
        super().__init__(dock)
        self.dock = dock

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Type.Close:
            try:
                allowed = self.dock.confirm_close()
            except RuntimeError:  # the dock's C++ side is gone
                return False
            if not allowed:
                event.ignore()
                return True
        return False


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table_data(project: Project, runs: dict[str, str] | None
                ) -> tuple[Project, list[dict[str, Any]], dict[str, list[str]]]:
    """Worker: the review rows and the runs that have pseudo labels."""
    available = {m: pseudo_runs(project, m) for m in methods_with_pseudo_labels(project)}
    if runs is not None and any(available.get(m) is None or r not in available[m] for m, r in runs.items()):
        runs = None  # the chosen run is gone
    return project, review_rows(project, runs), available


def _load_case(project: Project, case: str, runs: dict[str, str] | None) -> dict[str, Any]:
    """Worker: everything the dock shows for ``case``, read and computed off the main thread."""
    version = project.label_version(case)  # before reading: a later write shows up
    image = project.read_image(case)
    label = project.read_label(case)
    views = read_views(project, case, runs, image=image)
    by_method = disagreement_by_method(views)
    finite = image.array[::2, ::2, ::2]
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    payload = {
        "case": case,
        "image": image,
        "label": None if label is None or image.geometry_mismatch(label) else label.array.astype(np.uint8),
        "views": views,
        "disagreement": by_method,
        "profiles": {key: slice_profile(mask) for key, mask in by_method.items()},
        "contrast": (low, high if high > low else low + 1.0),
        "draft": load_draft(project, case),
        "label_version": version,
    }
    return payload


def _accept(project: Project, case: str, array: np.ndarray, check: dict[str, Any], **kwargs: Any
            ) -> tuple[dict[str, Any], Any]:
    """Worker: accept, then read the label's new version (the token the next accept of this viewer expects)."""
    record = accept_correction(project, case, array, **check, **kwargs)
    return record, project.label_version(case)
