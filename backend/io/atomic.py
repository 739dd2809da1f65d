"""Durable file writes: fsync of files and folders, JSON written atomically (temp file, fsync, rename), JSON read
back with a one-line error naming a corrupt file."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from backend.errors import InputError


def fsync_file(path: str | Path) -> None:
    """Flush a written file to the disk (so a rename after it never exposes an empty or partial file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file(path: Path) -> int:
    """Create ``path`` exclusively with the umask's mode (``tempfile.mkstemp`` would force 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def write_json_atomic(path: Path, data: Any, *, sync_dir: bool = True) -> None:
    """Write JSON to a temp file beside ``path``, fsync it, and rename it over ``path`` (then fsync the folder,
    unless ``sync_dir`` is False: a caller that fsyncs it itself afterwards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(6)}.json"
    try:
        with os.fdopen(new_file(tmp), "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file the project wrote; a corrupt one is an :class:`InputError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise InputError(path, f"cannot read {what} ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(path, f"corrupt {what} ({str(exc).splitlines()[0][:120]})") from exc


