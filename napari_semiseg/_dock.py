"""What both docks are made of: the viewer's shared :class:`~napari_semiseg._state.ProjectState`, a status line,
an "Open project..." folder chooser, napari notifications, and one close guard on the viewer's main window
(closing napari asks the dock first: unsaved corrections in the review dock, a running job in the training dock)."""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QFileDialog, QLabel, QWidget

from napari_semiseg._state import ProjectState, alive


def show_error(text: str) -> None:
    """A napari error notification (imported late: napari is not needed to import the plugin)."""
    from napari.utils.notifications import show_error as notify

    notify(text)


def show_info(text: str) -> None:
    from napari.utils.notifications import show_info as notify

    notify(text)


class DockBase(QWidget):
    """A dock of one viewer: ``viewer``, the viewer's shared ``state``, a word-wrapped ``status`` label (placed by
    the subclass) and the close guard, which calls :meth:`allow_close` when the main window is about to close."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = ProjectState.for_viewer(napari_viewer)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._close_guard = CloseGuard(self)
        window = getattr(getattr(napari_viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._close_guard)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def choose_folder(self, title: str = "Open a project folder (with dataset.json)") -> str:
        """A folder picked in a dialog ("" when cancelled)."""
        return QFileDialog.getExistingDirectory(self, title)

    def allow_close(self, window: QObject) -> bool:
        """Asked when the viewer's main ``window`` closes: False keeps it open.  Subclasses ask the user."""
        return True


class CloseGuard(QObject):
    """Event filter on the viewer's main window: a close event goes through only if the dock allows it."""

    def __init__(self, dock: DockBase):
        super().__init__(dock)
        self.dock = dock

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() != QEvent.Type.Close:
            return False
        try:
            if not alive(self.dock) or self.dock.allow_close(obj):
                return False
        except RuntimeError:  # the dock's C++ side is gone
            return False
        event.ignore()
        return True
