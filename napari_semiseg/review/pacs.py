"""*Open from PACS* in the review dock, and its DICOM-SEG export, over :mod:`backend.dicom` (torch-free) in napari
``thread_worker``s: the network and the DICOM work stay off the main thread, an error is the backend's one line.
Authentication comes from the environment, as for ``semiseg pacs`` (``$SEMISEG_PACS_TOKEN``, or
``$SEMISEG_PACS_USER`` with ``$SEMISEG_PACS_PASSWORD``: :func:`backend.dicom.pacs.client_from_env`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPushButton

from backend.project import Project
from napari_semiseg._dock import show_error, show_info
from napari_semiseg._state import alive, start_worker

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock

DICOM_SEG = "dicom-seg"
PACS_HOME = Path.home() / "semiseg-pacs"


def has_dicom_cases(project: Project | None) -> bool:
    """True when some case was imported from a DICOM series (it has a source sidecar)."""
    from backend.dicom.refs import refs_path

    return project is not None and any(refs_path(project, c).is_file() for c in project.case_ids())


def export_dicom_seg(project: Project, dest: Path, *, source: str = "labels", run: str | None = None) -> list[Path]:
    """One DICOM Segmentation per DICOM-imported case (as ``semiseg export --format dicom-seg``); the paths."""
    from backend.dicom.seg import export_seg

    return export_seg(project, dest, source=source, run=run)


def list_series(url: str) -> list[dict[str, Any]]:
    """Every series on the PACS at ``url`` (as ``semiseg pacs list``)."""
    from backend.dicom.pacs import client_from_env, list_series as search

    return search(client_from_env(url), url)


def pull_series(url: str, project_dir: Path, series_uid: str) -> tuple[str, str]:
    """Retrieve one series into the project at ``project_dir`` (as ``semiseg pacs pull``): ``(project root,
    case)``."""
    from backend.dicom.pacs import client_from_env, pull

    project, cases = pull(client_from_env(url), url, project_dir, [series_uid])
    return str(project.root), next(c for c, uid in cases.items() if uid == series_uid)


def describe(row: dict[str, Any], segs: int) -> str:
    """One line of the series list."""
    text = (f"{row.get('PatientID') or '?'}  {row.get('Modality') or '?'}  #{row.get('SeriesNumber') or '?'}  "
            f"{row.get('SeriesDescription') or '(no description)'}  "
            f"({row.get('NumberOfSeriesRelatedInstances') or '?'} images)")
    return text + (f"  [{segs} SEG]" if segs else "")


class PacsPanel(QGroupBox):
    """The DICOMweb URL, *List*, the image series on the PACS, and *Open*: the chosen series is pulled into the
    project folder (the open project, else ``~/semiseg-pacs``) unless already there, which then opens on it."""

    listed = Signal(list)   # the image series rows shown
    opened = Signal(str)    # the case the opened series became

    def __init__(self, dock: "ReviewDock"):
        super().__init__("Open from PACS")
        self.dock = dock
        self.url_edit = QLineEdit(os.environ.get("SEMISEG_PACS_URL", ""))
        self.url_edit.setPlaceholderText("DICOMweb URL, e.g. http://127.0.0.1:8042/dicom-web")
        self.list_button = QPushButton("List")
        self.list_button.clicked.connect(self.refresh)
        self.series_list = QListWidget()
        self.series_list.setMaximumHeight(110)
        self.series_list.itemDoubleClicked.connect(lambda _item: self.open_selected())
        self.series_list.currentItemChanged.connect(lambda *_: self._update_buttons())
        self.folder_edit = QLineEdit(str(PACS_HOME))
        self.folder_edit.setToolTip("Project the series is pulled into (created when missing)")
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(self.open_selected)
        layout = QGridLayout(self)
        layout.addWidget(self.url_edit, 0, 0, 1, 2)
        layout.addWidget(self.list_button, 0, 2)
        layout.addWidget(self.series_list, 1, 0, 1, 3)
        layout.addWidget(QLabel("into"), 2, 0)
        layout.addWidget(self.folder_edit, 2, 1)
        layout.addWidget(self.open_button, 2, 2)
        dock.state.project_changed.connect(self._follow_project)
        self._follow_project(dock.state.project)
        self._busy = False
        self._update_buttons()

    def _follow_project(self, project: Project | None) -> None:
        if project is not None and alive(self):
            self.folder_edit.setText(str(project.root))

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.list_button.setEnabled(not self._busy)
        self.open_button.setEnabled(not self._busy and self.series_list.currentItem() is not None)

    def url(self) -> str:
        return self.url_edit.text().strip()

    def refresh(self) -> None:
        """List the PACS's image series (in a worker)."""
        if not self.url():
            show_error("Enter the PACS's DICOMweb URL first")
            return
        self._set_busy(True)
        self.dock._say(f"Searching {self.url()}...")
        start_worker(self, list_series, self.url(), on_done=self._show, on_error=self._failed)

    def _show(self, rows: list[dict[str, Any]]) -> None:
        segs: dict[str, int] = {}
        for row in rows:
            for uid in row.get("references") or []:
                segs[uid] = segs.get(uid, 0) + 1
        images = [r for r in rows if r.get("Modality") != "SEG"]
        self.series_list.clear()
        for row in images:
            item = QListWidgetItem(describe(row, segs.get(row["SeriesInstanceUID"], 0)))
            item.setData(Qt.ItemDataRole.UserRole, row["SeriesInstanceUID"])
            self.series_list.addItem(item)
        self._set_busy(False)
        self.dock._say(f"{len(images)} image series on the PACS")
        self.listed.emit(images)

    def _failed(self, exc: BaseException) -> None:
        self._set_busy(False)
        self.dock._say(str(exc))
        show_error(str(exc))

    def open_selected(self) -> None:
        """Pull the selected series (in a worker), open its project and case."""
        item = self.series_list.currentItem()
        if item is None or not self.url():
            return
        if not self.dock.editor.resolve_unsaved("open a series from the PACS"):
            return
        uid = item.data(Qt.ItemDataRole.UserRole)
        self._set_busy(True)
        self.dock._say(f"Retrieving series {uid}...")
        start_worker(self, pull_series, self.url(), Path(self.folder_edit.text()).expanduser(), uid,
                     on_done=self._open, on_error=self._failed)

    def _open(self, result: tuple[str, str]) -> None:
        root, case = result
        self._set_busy(False)
        if self.dock.open_project(root) is None:
            return
        show_info(f"Series opened as case {case} of {root}")
        self.dock.select_case(case)
        self.opened.emit(case)
