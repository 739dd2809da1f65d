"""Where the project comes from: a *Project folder* (the dock's *Open project...* and sample buttons) or a *Server URL
+ token* (``semiseg serve`` on a GPU host, reached directly, through an SSH tunnel or over TLS).

*Test connection* asks the server who the token is and shows the client's own one-line error when it cannot
(connection refused, host not found, TLS, 401, timeout: :mod:`backend.remote.errors`).  *Connect* mirrors the
server's project into a local cache folder (:class:`backend.remote.mirror.MirrorProject`) and opens it in both docks
of the viewer: the review queue, the views and the runs read that folder, accepting a correction is the server's
``PUT`` with the label version it started from (a 409 is the dock's usual "label changed" question), jobs go to the
server (:meth:`napari_semiseg._state.ProjectState.jobs`), and drafts stay on this machine.  Every request runs in a
napari worker thread.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from napari_semiseg._state import start_worker

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock

FOLDER, SERVER = "Project folder", "Server URL + token"
DEFAULT_URL = "http://127.0.0.1:8765"


class ConnectPanel(QWidget):
    """The *Project folder* / *Server URL + token* choice, the server fields and their two buttons."""

    tested = Signal(bool, str)       # ok, the message shown
    connected = Signal(object)       # the MirrorProject now open

    def __init__(self, dock: "ReviewDock"):
        super().__init__(dock)
        self.dock = dock
        self.busy = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems([FOLDER, SERVER])
        self.mode_combo.setToolTip("Open a project folder on this machine, or a project served by 'semiseg serve'")
        self.mode_combo.currentTextChanged.connect(self._mode_changed)
        layout.addWidget(self.mode_combo)
        self.server_box = QWidget()
        form = QFormLayout(self.server_box)
        form.setContentsMargins(0, 0, 0, 0)
        self.url_edit = QLineEdit(DEFAULT_URL)
        self.url_edit.setToolTip("http://127.0.0.1:PORT through an SSH tunnel (ssh -N -L PORT:127.0.0.1:PORT host), "
                                 "or https://host:PORT for a TLS server")
        self.token_edit = QLineEdit()
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("from 'semiseg token add NAME' on the server")
        self.ca_edit = QLineEdit()
        self.ca_edit.setPlaceholderText("optional: the CA file of a self-signed https server")
        form.addRow("Server URL", self.url_edit)
        form.addRow("Token", self.token_edit)
        form.addRow("CA file", self.ca_edit)
        buttons = QHBoxLayout()
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(self.test_connection)
        self.connect_button = QPushButton("Connect")
        self.connect_button.setToolTip("Open the server's project in both docks (a local cache of it; drafts stay "
                                       "on this machine)")
        self.connect_button.clicked.connect(self.connect_server)
        buttons.addWidget(self.test_button)
        buttons.addWidget(self.connect_button)
        form.addRow(buttons)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        form.addRow(self.message)
        layout.addWidget(self.server_box)
        self._mode_changed(self.mode_combo.currentText())
        dock.state.project_changed.connect(self._follow_project)
        dock.table_refreshed.connect(self._name_server)

    def _mode_changed(self, mode: str) -> None:
        remote = mode == SERVER
        self.server_box.setVisible(remote)
        for widget in (self.dock.open_button, self.dock.sample_combo, self.dock.sample_button):
            widget.setVisible(not remote)

    def _follow_project(self, project: Any) -> None:
        """A server's project hides what does not go through the server yet: *Open from PACS* and *Export* would
        read and write the local mirror, not the server's project."""
        remote = getattr(project, "remote", None) is not None
        for widget in (getattr(self.dock, "pacs", None), self.dock.editor.export_button.parentWidget()):
            if widget is not None:
                widget.setVisible(not remote)

    def _name_server(self) -> None:
        """The project line names the server, not the cache folder that mirrors it."""
        project = self.dock.project
        server = getattr(project, "server", None)
        if server:
            label = self.dock.project_label
            label.setText(label.text().replace(str(project.root), f"{server} (mirrored in {project.root})"))

    def _client(self) -> tuple[str, str, Any]:
        url = self.url_edit.text().strip()
        if url and "://" not in url:
            url = "http://" + url
        return url, self.token_edit.text().strip(), self.ca_edit.text().strip() or True

    def _set_busy(self, busy: bool, text: str = "") -> None:
        self.busy = busy
        self.test_button.setEnabled(not busy)
        self.connect_button.setEnabled(not busy)
        if text:
            self.message.setText(text)

    def test_connection(self) -> None:
        """Ask the server in a worker; the message says who the token is, or why it failed."""
        url, token, verify = self._client()
        if not url:
            self._tested(False, "enter the server URL (e.g. http://127.0.0.1:8765)")
            return
        self._set_busy(True, f"Testing {url}...")
        start_worker(self, _test, url, token, verify, on_done=lambda info: self._tested(True, _hello(url, info)),
                     on_error=lambda exc: self._tested(False, str(exc) or type(exc).__name__))

    def _tested(self, ok: bool, text: str) -> None:
        self._set_busy(False, ("OK: " if ok else "Failed: ") + text)
        self.tested.emit(ok, text)

    def connect_server(self) -> None:
        """Mirror the server's project (in a worker) and open it in both docks."""
        if not self.dock.editor.resolve_unsaved("connect to a server"):
            return
        url, token, verify = self._client()
        if not url:
            self._tested(False, "enter the server URL (e.g. http://127.0.0.1:8765)")
            return
        self._set_busy(True, f"Connecting to {url}...")
        start_worker(self, _connect, url, token, verify, on_done=self._connected,
                     on_error=lambda exc: self._tested(False, str(exc) or type(exc).__name__))

    def _connected(self, project: Any) -> None:
        self._set_busy(False, "Connected: " + _hello(project.server, project.remote.info()))
        self.dock.use_project(project)
        self.connected.emit(project)


def _hello(url: str, info: dict[str, Any]) -> str:
    return f"{info.get('name', '?')} on {url} as {info.get('user', '?')} ({info.get('role', '?')})"


def _test(url: str, token: str, verify: Any) -> dict[str, Any]:
    """Worker: the server's answer to ``GET info`` with this token (its specific error otherwise)."""
    from backend.remote import RemoteProject

    with RemoteProject(url, token, verify=verify, timeout=10.0) as remote:
        return remote.test_connection()


def _connect(url: str, token: str, verify: Any) -> Any:
    """Worker: the server's project mirrored into the local cache (``~/.cache/semiseg/remote/<host>_<port>``)."""
    from backend.remote import RemoteProject
    from backend.remote.mirror import MirrorProject

    remote = RemoteProject(url, token, verify=verify)
    try:
        return MirrorProject.connect(remote)
    except BaseException:
        remote.close()
        raise
