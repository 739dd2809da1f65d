"""What the docks of one viewer share: the open project and signals when its contents change, the jobs of that
project through one adapter (:meth:`ProjectState.jobs`: :mod:`backend.jobs` on a local folder, the server's client
for a project mirrored from ``semiseg serve``), plus two small Qt helpers (a question box that tests can replace,
and starting a napari ``thread_worker``)."""
from __future__ import annotations

import weakref
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QMessageBox, QWidget

from backend.project import Project

_STATES: "weakref.WeakKeyDictionary[Any, ProjectState]" = weakref.WeakKeyDictionary()


class ProjectState(QObject):
    """The project open in one viewer.  The review and training docks of that viewer share one instance."""

    project_changed = Signal(object)  # the new Project (or None)
    labels_changed = Signal(str)      # a case was accepted into the labeled set
    pseudo_changed = Signal()         # inference wrote new pseudo labels / scores
    models_changed = Signal()         # a training run finished

    def __init__(self) -> None:
        super().__init__()
        self.project: Project | None = None

    @classmethod
    def for_viewer(cls, viewer: Any) -> "ProjectState":
        state = _STATES.get(viewer)
        if state is None:
            state = _STATES[viewer] = cls()
        return state

    def is_remote(self) -> bool:
        """Whether the open project is a server's (:class:`backend.remote.mirror.MirrorProject`): every call that
        reaches it goes through a worker thread."""
        return getattr(self.project, "remote", None) is not None

    def jobs(self) -> Any:
        """The open project's jobs: ``start_job(spec)``, ``list_jobs()``, ``job_status(id)``, ``read_events(id,
        offset)``, ``cancel_job(id)``, ``resume_job(id)`` (None without a project)."""
        if self.project is None:
            return None
        remote = getattr(self.project, "remote", None)
        return remote if remote is not None else LocalJobs(self.project.root)

    def after_sync(self, owner: Any, then: Callable[[], None]) -> None:
        """Run ``then`` once the open project is current: at once for a folder; for a server's, after fetching
        its tables in a worker (a failure is shown, ``then`` runs on the last copy)."""
        project = self.project
        if getattr(project, "sync", None) is None:
            then()
            return

        def done(_result: Any = None) -> None:
            if project is self.project:
                then()
        start_worker(owner, project.sync, on_done=done, on_error=lambda exc: (_notify_error(exc), done()))

    def set_project(self, project: Project | None) -> None:
        same = (project is not None and self.project is not None and project.root == self.project.root)
        self.project = project
        if not same:
            self.project_changed.emit(project)


class LocalJobs:
    """:mod:`backend.jobs` on the project folder ``root``, under the names of the server's client."""

    def __init__(self, root: Any):
        self.root = root

    def start_job(self, spec: dict[str, Any]) -> str:
        from backend.jobs import start_job
        return start_job(self.root, spec)

    def list_jobs(self) -> list[dict[str, Any]]:
        from backend.jobs import list_jobs
        return list_jobs(self.root)

    def job_status(self, job_id: str) -> dict[str, Any]:
        from backend.jobs import job_status
        return job_status(self.root, job_id)

    def read_events(self, job_id: str, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        from backend.jobs import read_events
        return read_events(self.root, job_id, offset)

    def cancel_job(self, job_id: str) -> None:
        from backend.jobs import cancel_job
        cancel_job(self.root, job_id)

    def resume_job(self, job_id: str) -> str:
        from backend.jobs import resume_job
        return resume_job(self.root, job_id)


def ask(parent: QWidget | None, title: str, text: str, buttons: list[str], default: str | None = None) -> str:
    """Ask a question with the given button texts; returns the text of the chosen one (the last button, taken
    as "cancel", when the box is closed).  Tests monkeypatch this function to answer."""
    box = QMessageBox(parent)
    box.setWindowTitle(title)
    box.setText(text)
    made = {}
    for label in buttons:
        role = QMessageBox.ButtonRole.RejectRole if label == buttons[-1] else QMessageBox.ButtonRole.AcceptRole
        made[box.addButton(label, role)] = label
    if default is not None:
        for button, label in made.items():
            if label == default:
                box.setDefaultButton(button)
    box.exec()
    return made.get(box.clickedButton(), buttons[-1])


def start_worker(owner: Any, func: Callable, *args: Any, on_done: Callable | None = None,
                 on_error: Callable | None = None, **kwargs: Any):
    """Run ``func(*args, **kwargs)`` in a napari ``thread_worker``; ``on_done(result)`` / ``on_error(exc)`` run
    on the main thread.  ``owner`` keeps a reference until the worker ends (a collected worker would die)."""
    from napari.qt.threading import create_worker

    # every error goes to on_error or a notification: not re-raised in the main thread as well
    worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    pending = owner.__dict__.setdefault("_workers", set())
    pending.add(worker)
    if on_done is not None:
        worker.returned.connect(lambda result: on_done(result) if alive(owner) else None)
    if on_error is not None:
        worker.errored.connect(lambda exc: on_error(exc) if alive(owner) else _notify_error(exc))
    else:
        worker.errored.connect(_notify_error)
    worker.finished.connect(lambda: pending.discard(worker))
    worker.start()
    return worker


def alive(obj: Any) -> bool:
    """False once the C++ side of a Qt object is deleted (a closed dock): late callbacks then do nothing."""
    try:
        obj.objectName()
    except RuntimeError:
        return False
    return True


def _notify_error(exc: BaseException) -> None:
    from napari.utils.notifications import show_error

    show_error(str(exc) or type(exc).__name__)
