"""The correction editor: *Start from* a view (or the majority vote, or the accepted label) into the editable
``correction`` layer, track edits (autosaved as a draft; asked about before leaving the case), *Accept* it into the
labeled set, and *Export*.

Before writing, the editor asks when the label is empty or drops a class that the views or the accepted label have
(:func:`backend.review.corrections.accept_warnings`), and when the case's label changed on disk since the case was
opened (another viewer, the CLI: ``Project.label_version`` is recorded when a case is shown and checked by
``Project.accept``): overwrite it, or keep the correction as a draft."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QComboBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, \
    QVBoxLayout, QWidget

from backend.errors import InputError, LabelConflictError
from backend.project import Project
from backend.review.corrections import accept_correction, accept_warnings, discard_draft, save_draft
from backend.review.views import MAJORITY, majority_vote
from napari_semiseg import _state
from napari_semiseg._dock import show_error, show_info
from napari_semiseg._layers import geometry_metadata, label_colormap, layer_scale, set_if_changed
from napari_semiseg._state import start_worker
from napari_semiseg.review.pacs import DICOM_SEG, export_dicom_seg, has_dicom_cases

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock

CORRECTION = "correction"
ACCEPTED = "accepted label"
KEEP, DISCARD, CANCEL = "Keep as draft", "Discard edits", "Cancel"
ACCEPT_ANYWAY, OVERWRITE = "Accept anyway", "Overwrite"


class CorrectionEditor(QWidget):
    """The *Correct* and *Export* boxes and the state of the correction of the open case."""

    def __init__(self, dock: "ReviewDock"):
        super().__init__(dock)
        self.dock = dock
        self.correction_layer = None
        self.baseline: np.ndarray | None = None     # what the correction is compared to for "unsaved"
        self._start: np.ndarray | None = None       # the view the correction started from
        self._start_source = ""
        self._case_t0 = time.monotonic()
        self._seconds_before = 0.0                  # time spent in earlier sessions (from a draft)
        self._accepted: np.ndarray | None = None    # the case's accepted label when it was opened
        self._label_version: Any = None             # Project.label_version of the case when it was opened
        self._version_known = False
        self.autosave = QTimer(self)
        self.autosave.setSingleShot(True)
        self.autosave.timeout.connect(self.save_draft)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        edit = QGroupBox("Correct")
        grid = QGridLayout(edit)
        grid.addWidget(QLabel("Start from"), 0, 0)
        self.view_combo = QComboBox()
        grid.addWidget(self.view_combo, 0, 1)
        self.start_button = QPushButton("Start from view")
        self.start_button.setToolTip("Copy this view (or the majority vote of all views) into the editable "
                                     "'correction' layer; paint, erase, fill and undo (Ctrl+Z) edit it")
        self.start_button.clicked.connect(lambda: self.start_from(self.view_combo.currentData()))
        grid.addWidget(self.start_button, 0, 2)
        self.accept_button = QPushButton("Accept  [Shift+A]")
        self.accept_button.setToolTip("Validate the correction and add it to the labeled set")
        self.accept_button.clicked.connect(self.accept)
        grid.addWidget(self.accept_button, 1, 0, 1, 2)
        self.advance_check = QCheckBox("then next case")
        self.advance_check.setChecked(True)
        grid.addWidget(self.advance_check, 1, 2)
        layout.addWidget(edit)
        export = QGroupBox("Export")
        row = QHBoxLayout(export)
        self.export_source = QComboBox()
        self.export_format = QComboBox()
        self.export_format.addItems(["nii.gz", "nrrd", "seg.nrrd"])
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(self._choose_export_dest)
        for widget in (self.export_source, self.export_format, self.export_button):
            row.addWidget(widget)
        layout.addWidget(export)
        self.set_export_sources([])

    def update_buttons(self, has_project: bool, has_case: bool, busy: bool) -> None:
        views = self.view_combo.count() > 0
        self.start_button.setEnabled(has_case and views)
        self.accept_button.setEnabled(has_case and (self.correction_layer is not None or views))
        self.export_button.setEnabled(has_project and not busy)
        offered = self.export_format.findText(DICOM_SEG)  # DICOM-SEG only for a project with DICOM-imported cases
        if has_dicom_cases(self.dock.project) and offered < 0:
            self.export_format.addItem(DICOM_SEG)
        elif offered >= 0 and not has_dicom_cases(self.dock.project):
            self.export_format.removeItem(offered)

    # ---- the case -------------------------------------------------------------------------------------------
    def show_case(self, payload: dict[str, Any]) -> None:
        """A case was shown: what it can start from, its accepted label and that label's version."""
        self._accepted = payload["label"]
        self._label_version, self._version_known = payload["label_version"], True
        self.view_combo.clear()
        for name in payload["views"]:
            self.view_combo.addItem(name, name)
        if len(payload["views"]) > 1:
            self.view_combo.addItem("majority vote of all views", MAJORITY)
        if payload["label"] is not None:
            self.view_combo.addItem(ACCEPTED, ACCEPTED)
        self._case_t0 = time.monotonic()
        self._seconds_before = 0.0

    def clear(self) -> None:
        """Leaving a case: the correction layer stays in the list, hidden, empty and locked, for the next one."""
        self.autosave.stop()
        layer = self.dock.loader.live(CORRECTION)
        self.correction_layer = None
        if layer is not None:
            layer.editable = False
            layer.visible = False
            layer.data = np.zeros((1, 1, 1), np.uint8)
        self.baseline = self._start = None
        self._accepted, self._label_version, self._version_known = None, None, False
        self.view_combo.clear()

    def restore_draft(self, array: np.ndarray, info: dict[str, Any]) -> None:
        source = info.get("started_from", "draft")
        self.make_correction(array, source, start=self.dock.views.get(source), baseline=array)
        self._seconds_before = float(info.get("seconds_spent", 0.0))

    # ---- editing -----------------------------------------------------------------------------------------------
    def start_from(self, view: str | None) -> None:
        """Copy ``view`` (a ``<method>:<view>`` name, ``"majority"`` or ``"accepted label"``) into the editable
        ``correction`` layer."""
        dock = self.dock
        if dock.case is None or not view:
            return
        if self.has_unsaved_edits():
            answer = _state.ask(dock, "Replace the correction?",
                                f"The correction of {dock.case} has edits. Replace it with {view}?", ["Replace", CANCEL])
            if answer != "Replace":
                return
        if view == MAJORITY:
            dock._set_busy(True)
            start_worker(dock, majority_vote, list(dock.views.values()), dock.project.num_classes,
                         on_done=lambda array: (dock._set_busy(False), self.make_correction(array, view)))
            return
        if view == ACCEPTED:
            layer = dock.loader.live(ACCEPTED)
            array = None if layer is None else np.asarray(layer.data)
        else:
            array = dock.views.get(view)
        if array is not None:
            self.make_correction(array.copy(), view)

    def make_correction(self, array: np.ndarray, source: str, *, start: np.ndarray | None = None,
                        baseline: np.ndarray | None = None) -> None:
        """Show ``array`` in the editable ``correction`` layer (reused across cases, its undo history reset)."""
        dock = self.dock
        project, image, viewer = dock.project, dock.image, dock.viewer
        self._start = array.copy() if start is None else start
        self.baseline = self._start if baseline is None else baseline
        self._start_source = source
        meta = {**geometry_metadata(image, project.image_path(dock.case)), "image_layer": dock.case,
                "label_names": dict(project.labels), "started_from": source}
        data = np.ascontiguousarray(array, dtype=np.uint8)
        layer = dock.loader.live(CORRECTION)
        if layer is None:
            layer = viewer.add_labels(data, name=CORRECTION, scale=layer_scale(image), metadata=meta,
                                      colormap=label_colormap(project.num_classes), opacity=0.7)
            layer.events.paint.connect(self._on_edit)
            dock.loader.layers[CORRECTION] = layer
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
        for name in dock.views:
            other = dock.loader.live(name)
            if other is not None:
                set_if_changed(other, "visible", False)
        viewer.layers.selection.active = layer
        layer.mode = "paint"
        dock._update_buttons()
        dock._say(f"{dock.case}: correcting, started from {source}")
        dock.correction_started.emit(source)

    def _on_edit(self, _event: Any = None) -> None:
        if self.correction_layer is not None and not self.autosave.isActive():
            self.autosave.start(int(self.dock.autosave_ms))

    def has_unsaved_edits(self) -> bool:
        """True when the correction differs from what is on disk for it (the view it started from, its draft,
        or the label just accepted)."""
        layer = self.correction_layer
        if layer is None or self.baseline is None:
            return False
        return not np.array_equal(np.asarray(layer.data), self.baseline)

    def seconds_spent(self) -> float:
        return self._seconds_before + (time.monotonic() - self._case_t0)

    def save_draft(self, *, wait: bool = False, force: bool = False) -> None:
        """Write the correction as the case's draft (in a thread unless ``wait``; ``force``: even without edits
        since it started, e.g. a view accepted as it is that could not be written)."""
        dock = self.dock
        if self.correction_layer is None or dock.case is None or dock.image is None:
            return
        if not force and not self.has_unsaved_edits():
            return
        project, case = dock.project, dock.case
        volume = dock.image.like(np.array(self.correction_layer.data, dtype=np.uint8))
        info = {"started_from": self._start_source, "seconds_spent": round(self.seconds_spent(), 1),
                "runs": dock.selected_runs()}
        if wait:
            save_draft(project, case, volume, info)
            dock.draft_saved.emit(case)
            return
        start_worker(dock, save_draft, project, case, volume, info, on_done=lambda _path: dock.draft_saved.emit(case))

    def resolve_unsaved(self, what: str) -> bool:
        """Before leaving the case: ask what to do with unsaved edits.  False means stay."""
        if not self.has_unsaved_edits():
            return True
        answer = _state.ask(self.dock, "Unsaved correction",
                            f"The correction of {self.dock.case} is not accepted. Before you {what}: keep it as a "
                            f"draft (offered back when you open the case again) or discard it?",
                            [KEEP, DISCARD, CANCEL], default=KEEP)
        if answer == KEEP:
            self.save_draft(wait=True)
            return True
        if answer == DISCARD:
            self.autosave.stop()
            discard_draft(self.dock.project, self.dock.case)
            self.baseline = np.asarray(self.correction_layer.data).copy()
            return True
        return False

    # ---- accepting ---------------------------------------------------------------------------------------------
    def accept(self) -> None:
        """Validate the correction (or, with none, the chosen view as it is) and write it into the labeled set
        through the backend (in a thread); the table updates when it is written."""
        dock = self.dock
        project, case = dock.project, dock.case
        if project is None or case is None or dock._busy:
            return
        if self.correction_layer is None:
            view = self.view_combo.currentData()
            if view is None or view == MAJORITY:
                if view == MAJORITY:
                    self.start_from(view)
                    dock._say("Majority vote computed; check it, then accept again.")
                return
            self.start_from(view)
        array = np.array(self.correction_layer.data, dtype=np.uint8)
        top = int(array.max())
        if top >= project.num_classes:
            show_error(f"{case}: the correction holds label {top}; this project declares "
                       f"{', '.join(f'{k}={v}' for k, v in project.labels.items())}. Fix it before accepting.")
            return
        warnings = accept_warnings(array, {**dock.views, "the accepted label": self._accepted}, project.labels)
        if warnings:
            answer = _state.ask(dock, "Accept this label?",
                                f"The label of {case} " + "; ".join(warnings) + ". Accept it anyway?",
                                [ACCEPT_ANYWAY, CANCEL], default=CANCEL)
            if answer != ACCEPT_ANYWAY:
                dock._say(f"{case}: not accepted (" + "; ".join(warnings) + ")")
                return
        self._write(case, array, check=True)

    def _write(self, case: str, array: np.ndarray, *, check: bool) -> None:
        """Accept ``array`` in a thread; ``check``: only if the label on disk is still the one the case was
        opened with."""
        dock = self.dock
        self.autosave.stop()
        dock._set_busy(True)
        dock._say(f"{case}: accepting...")
        expected = {"expected_version": self._label_version} if check and self._version_known else {}
        start_worker(dock, _accept, dock.project, case, array, expected, source=self._start_source,
                     start=self._start, seconds=self.seconds_spent(),
                     extra={"runs": dict(dock.selected_runs() or {})},  # the runs its views came from (DICOM-SEG)
                     on_done=lambda result: self._on_accepted(case, array, *result),
                     on_error=lambda exc: self._on_accept_failed(case, array, exc))

    def _on_accept_failed(self, case: str, array: np.ndarray, exc: BaseException) -> None:
        self.dock._set_busy(False)
        if isinstance(exc, LabelConflictError) and case == self.dock.case:
            self._on_conflict(case, array, exc)
            return
        show_error(f"Not accepted: {exc}")
        if not isinstance(exc, InputError) and case == self.dock.case:  # not the label's fault: a lost server,
            self.save_draft(wait=True, force=True)  # a full disk; the correction stays here and as a draft
            self.dock._say(f"{case}: not accepted ({exc}); your correction is kept as a draft")

    def _on_conflict(self, case: str, array: np.ndarray, exc: BaseException) -> None:
        """The label changed on disk since the case was opened: overwrite it, or keep the correction as a draft
        (reopen the case to see the other label, then restore the draft)."""
        answer = _state.ask(self.dock, "The label changed on disk",
                            f"The label of {case} ({getattr(exc, 'path', None) or 'labelsTr'}) was written by "
                            f"someone else (another viewer or the command line) since you opened the case.\n"
                            f"Overwrite it with your correction, or keep your correction as a draft (open the case "
                            f"again to see their label and restore your draft)?", [OVERWRITE, KEEP], default=KEEP)
        if answer == OVERWRITE:
            self._write(case, array, check=False)
            return
        self.save_draft(wait=True, force=True)
        if self.correction_layer is not None:
            self.baseline = np.asarray(self.correction_layer.data).copy()  # what is on disk: the draft
        self.dock._say(f"{case}: not accepted, the label on disk changed; your correction is kept as a draft (open "
                       f"the case again to compare)")

    def _on_accepted(self, case: str, array: np.ndarray, record: dict[str, Any], version: Any = None) -> None:
        dock = self.dock
        dock._set_busy(False)
        discard_draft(dock.project, case)  # an autosave that was in flight while accepting
        if case == dock.case:
            self.baseline = array
            self._accepted = array
            self._label_version = version
        dock._say(f"{case}: accepted ({record.get('voxels_edited', 0)} voxels edited, "
                  f"{record.get('seconds_spent', 0):.0f} s on the case, written in {record['accept_seconds']:.2f} s)")
        dock.accepted.emit(case, record)
        if self.advance_check.isChecked() and case == dock.case:
            dock.table_refreshed.connect(self._advance_once)
        dock.state.labels_changed.emit(case)

    def _advance_once(self) -> None:
        dock = self.dock
        dock.table_refreshed.disconnect(self._advance_once)
        upcoming = [r["case"] for r in dock.visible_rows() if not r["labeled"] and r["case"] != dock.case]
        if upcoming:
            dock.select_case(upcoming[0])

    # ---- export -----------------------------------------------------------------------------------------------
    def set_export_sources(self, methods: list[str]) -> None:
        """The accepted labels, then each method's pseudo labels (keeping the choice)."""
        current = self.export_source.currentData()
        self.export_source.clear()
        self.export_source.addItem("accepted labels", "labels")
        for method in methods:
            self.export_source.addItem(f"{method} pseudo labels (latest run)", method)
        self.export_source.setCurrentIndex(max(0, self.export_source.findData(current)))

    def _choose_export_dest(self) -> None:
        folder = self.dock.choose_folder("Export into folder")
        if folder:
            self.export_to(folder)

    def export_to(self, dest: str | Path) -> None:
        """Export the chosen source (accepted labels or a method's pseudo labels) in the chosen format into
        ``dest`` in each image's geometry (in a thread; ``exported`` carries the written paths)."""
        from backend.review.export import export

        dock = self.dock
        source = self.export_source.currentData() or "labels"
        run = (dock.selected_runs() or {}).get(source)  # the run picked in the run box, else the method's latest
        dock._set_busy(True)

        def done(paths: list) -> None:
            dock._set_busy(False)
            show_info(f"Exported {len(paths)} file(s) to {dest}")
            dock.exported.emit([str(p) for p in paths])

        def failed(exc: BaseException) -> None:
            dock._set_busy(False)
            show_error(f"Export failed: {exc}")

        fmt = self.export_format.currentText()
        if fmt == DICOM_SEG:  # through the CLI: the plugin does not import backend.dicom (review/pacs.py)
            start_worker(dock, export_dicom_seg, dock.project, Path(dest), source=source, run=run, on_done=done,
                         on_error=failed)
            return
        start_worker(dock, export, dock.project, Path(dest), fmt=fmt, source=source, run=run, on_done=done,
                     on_error=failed)


def _accept(project: Project, case: str, array: np.ndarray, check: dict[str, Any], **kwargs: Any
            ) -> tuple[dict[str, Any], Any]:
    """Worker: accept, then read the label's new version (the token the next accept of this viewer expects)."""
    record = accept_correction(project, case, array, **check, **kwargs)
    return record, project.label_version(case)
