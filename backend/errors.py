"""The error types that user input can raise.

Every problem with a file a user hands us (unreadable, wrong shape, labels out of range, ...) becomes an
:class:`InputError` that names the file and the problem in one line.  The CLI prints it and exits with code 2;
the plugin shows it as a napari notification.
"""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: ``str(err)`` is one line, ``<file>: <problem>``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever a library's message held
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class LabelConflictError(InputError):
    """An accept was refused because the case's label changed on disk since the caller opened it
    (``Project.accept(..., expected_version=...)``); nothing was written."""


class JobBusyError(RuntimeError):
    """A second training job was asked for while one holds the project's lock."""
