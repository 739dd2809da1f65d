"""The review dock: go through the cases most doubtful first, compare the pseudo-label views of every method,
correct one and accept it into the labeled set.

The dock is five panels over one open case (``case``, ``image``, ``views``):

* :class:`~napari_semiseg.review.queue.QueuePanel` (``queue.py``): run, *Sort by* and filter boxes, the case table,
  *Next case* / *Skip* / *Flag*;
* :class:`~napari_semiseg.review.loader.CaseLoader` (``loader.py``): reads a case in a worker thread, updates its
  layers, offers a draft;
* :class:`~napari_semiseg.review.views.ViewsPanel` (``views.py``): one view at a time, the disagreement outline and
  its per-slice profile;
* :class:`~napari_semiseg.review.correction.CorrectionEditor` (``correction.py``): the correction layer, drafts,
  accept (with its checks and the conflict question) and export;
* :class:`~napari_semiseg.review.pacs.PacsPanel` (``pacs.py``): *Open from PACS* (DICOMweb, through the CLI).

All file reading, voting and writing runs in napari ``thread_worker`` threads; the main thread only builds
layers and widgets.  The logic lives in :mod:`backend.review`; this package is the Qt layer over it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from backend.errors import InputError
from backend.io.volume import Volume
from backend.project import Project
from napari_semiseg._dock import DockBase, show_error
from napari_semiseg._state import alive
from napari_semiseg.review.connect import ConnectPanel
from napari_semiseg.review.correction import ACCEPT_ANYWAY, CANCEL, CORRECTION, DISCARD, KEEP, OVERWRITE, \
    CorrectionEditor
from napari_semiseg.review.loader import DISAGREEMENT, CaseLoader
from napari_semiseg.review.pacs import PacsPanel
from napari_semiseg.review.queue import FILTERS, QueuePanel
from napari_semiseg.review.views import Legend, ViewsPanel

__all__ = ["ReviewDock", "CORRECTION", "DISAGREEMENT", "FILTERS", "KEEP", "DISCARD", "CANCEL", "ACCEPT_ANYWAY",
           "OVERWRITE", "SAMPLE_HOME"]

SAMPLE_HOME = Path.home() / "semiseg-sample"


class ReviewDock(DockBase):
    """Review and correct pseudo labels, most doubtful case first (see the package docstring)."""

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
        super().__init__(napari_viewer, parent)
        self.setMinimumWidth(440)
        self.case: str | None = None
        self.image: Volume | None = None
        self.views: dict[str, np.ndarray] = {}
        self._busy = False
        self.loader = CaseLoader(self)
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        self.open_button = QPushButton("Open project...")
        self.open_button.clicked.connect(self._choose_project)
        self.sample_combo = QComboBox()
        self.sample_combo.addItems(["brain_tissue", "lesions"])
        self.sample_button = QPushButton("Open sample copy")
        self.sample_button.setToolTip(f"Copy the sample project to {SAMPLE_HOME}/<name> (once) and open it")
        self.sample_button.clicked.connect(lambda: self.open_sample(self.sample_combo.currentText()))
        for widget in (self.open_button, self.sample_combo, self.sample_button):
            top.addWidget(widget)
        layout.addLayout(top)
        self.connection = ConnectPanel(self)  # Project folder / Server URL + token (connect.py)
        layout.addWidget(self.connection)
        self.project_label = QLabel("No project open")
        self.project_label.setWordWrap(True)
        layout.addWidget(self.project_label)
        self.editor = CorrectionEditor(self)  # before the queue: the queue fills its export sources
        self.queue = QueuePanel(self)
        self.legend_box = Legend()
        self.compare = ViewsPanel(self)
        self.pacs = PacsPanel(self)  # Open from PACS (pacs.py)
        for widget in (self.pacs, self.queue, self.legend_box, self.compare, self.editor, self.status):
            layout.addWidget(widget, stretch=1 if widget is self.queue else 0)
        # the widgets scripts and tests drive, under the names they have always had
        self.table, self.run_combo, self.filter_combo = self.queue.table, self.queue.run_combo, self.queue.filter_combo
        self.sort_combo = self.queue.sort_combo
        self.disagreement_check = self.compare.disagreement_check
        self.disagreement_combo, self.profile_plot = self.compare.disagreement_combo, self.compare.profile_plot
        self.view_combo, self.advance_check = self.editor.view_combo, self.editor.advance_check
        self.export_source, self.export_format = self.editor.export_source, self.editor.export_format
        self._update_buttons()
        self.state.project_changed.connect(self._on_project_changed)
        self.state.pseudo_changed.connect(self.refresh)
        self.state.labels_changed.connect(lambda _case: self.refresh())
        self._bind_keys()
        if self.state.project is not None:
            self._on_project_changed(self.state.project)

    def _bind_keys(self) -> None:
        bind = getattr(self.viewer, "bind_key", None)
        if bind is None:
            return
        for key, action in (("Shift-N", self.next_case), ("Shift-A", self.accept), ("Shift-V", self.cycle_view),
                            ("Shift-D", self.disagreement_check.toggle), ("Shift-W", self.go_to_worst_slice)):
            bind(key, lambda _viewer, action=action: action() if alive(self) else None, overwrite=True)

    def _update_buttons(self) -> None:
        has_project = self.state.project is not None
        has_case = self.case is not None and not self._busy
        self.queue.update_buttons(has_project, has_case, self._busy)
        self.compare.update_buttons(has_case)
        self.editor.update_buttons(has_project, has_case, self._busy)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._update_buttons()
        self.busy_changed.emit(busy)

    # ---- the open case's correction, under its old names ---------------------------------------------------------
    @property
    def correction_layer(self):
        return self.editor.correction_layer

    @property
    def _baseline(self) -> np.ndarray | None:
        return self.editor.baseline

    @_baseline.setter
    def _baseline(self, value: np.ndarray | None) -> None:
        self.editor.baseline = value

    @property
    def legend(self) -> list[tuple[str, tuple[float, float, float]]]:
        """``(text, rgb)`` of each legend entry."""
        return self.legend_box.entries

    # ---- project ---------------------------------------------------------------------------------------------
    @property
    def project(self) -> Project | None:
        return self.state.project

    def _choose_project(self) -> None:
        folder = self.choose_folder()
        if folder:
            self.open_project(folder)

    def open_project(self, root: str | Path) -> Project | None:
        """Open the project folder ``root`` (shared with the training dock of this viewer)."""
        if not self.editor.resolve_unsaved("open another project"):
            return None
        try:
            project = Project.open(root)
        except InputError as exc:
            show_error(str(exc))
            return None
        return self.use_project(project)

    def use_project(self, project: Project) -> Project:
        """Open ``project`` (a folder's, or a server's mirror) in the docks of this viewer."""
        current = self.state.project
        if current is not None and current.root == project.root:
            self.state.project = project  # the same folder again: re-read it, keep the open case
            self.refresh()
            return project
        self.clear_case()
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
                show_error(str(exc))
                return None
        return self.open_project(dest)

    def _on_project_changed(self, project: Project | None) -> None:
        self.clear_case()
        self.loader.remove_layers()
        self.editor.correction_layer = None
        self.queue.clear()
        if project is not None:
            self.queue.rebuild_runs({})
        self.legend_box.fill(project)
        self._update_buttons()
        self.refresh()

    # ---- the queue -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the case table (off the main thread; a server's project is fetched first) and redraw it."""
        self.state.after_sync(self, lambda: self.queue.refresh(self.project))

    def selected_runs(self) -> dict[str, str] | None:
        return self.queue.selected_runs()

    def visible_rows(self) -> list[dict[str, Any]]:
        return self.queue.visible_rows()

    def methods_in_table(self) -> list[str]:
        return self.queue.methods_in_table()

    def table_cases(self) -> list[str]:
        return self.queue.table_cases()

    def next_case(self) -> str | None:
        return self.queue.next_case()

    def skip(self) -> str | None:
        return self.queue.skip()

    def toggle_flag(self) -> None:
        self.queue.toggle_flag()

    # ---- moving between cases ---------------------------------------------------------------------------------
    def select_case(self, case: str) -> bool:
        """Load ``case``: image, every pseudo-label view and their disagreement (read off the main thread).
        Returns False when the user chose to stay on the current case."""
        project = self.project
        if project is None:
            return False
        if case == self.case and self.loader.pending is None:
            return True
        if not self.editor.resolve_unsaved(f"open case {case}"):
            self.queue.fill_table()  # put the selection back
            return False
        self._say(f"Loading {case}...")
        self._set_busy(True)
        self.loader.load(project, case, self.selected_runs())
        return True

    def clear_case(self) -> None:
        """Forget the open case (its layers stay, to be reused by the next case)."""
        self.editor.clear()
        self.case, self.image, self.views = None, None, {}
        self.compare.clear()
        self._update_buttons()

    # ---- comparing views, correcting: the panels' actions -----------------------------------------------------------
    def disagreement_shown(self) -> str | None:
        return self.compare.shown()

    def current_slice(self) -> int | None:
        return self.compare.current_slice()

    def go_to_slice(self, z: int) -> None:
        self.compare.go_to_slice(z)

    def go_to_worst_slice(self) -> int | None:
        return self.compare.go_to_worst_slice()

    def visible_view(self) -> str | None:
        return self.compare.visible_view()

    def cycle_view(self) -> str | None:
        return self.compare.cycle_view()

    def start_from(self, view: str | None) -> None:
        self.editor.start_from(view)

    def has_unsaved_edits(self) -> bool:
        return self.editor.has_unsaved_edits()

    def save_draft(self, *, wait: bool = False, force: bool = False) -> None:
        self.editor.save_draft(wait=wait, force=force)

    def accept(self) -> None:
        self.editor.accept()

    def export_to(self, dest: str | Path) -> None:
        self.editor.export_to(dest)

    def confirm_close(self) -> bool:
        """Called when the viewer window closes: True lets it close."""
        return self.editor.resolve_unsaved("close")

    def allow_close(self, window: Any) -> bool:
        return self.confirm_close()
