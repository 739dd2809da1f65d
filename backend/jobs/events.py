"""A job's event stream: ``semiseg/jobs/<id>/events.jsonl``, one JSON object per line.

Every event has ``"time"`` (ISO 8601, UTC) and ``"type"``:

* ``start`` (the engine began: run, device, total steps), ``progress`` (``step``, ``total``, ``losses``, ``lr``,
  ``eta_s``), ``validation``, ``checkpoint`` (from :mod:`backend.engine.training` / :mod:`backend.engine.inference`);
* the final event, exactly one of ``done``, ``cancelled`` or ``error`` (``kind``: ``"oom"`` for an out-of-memory
  error, ``"busy"`` when another training job holds the project, ``"exception"`` otherwise; ``exception`` (the type
  name), ``message``, ``traceback`` (its last :data:`TRACEBACK_LINES` lines)).

The child appends each event with one ``write`` on a file opened ``O_APPEND``, so a reader sees whole lines, or
at worst a line still being written, which :func:`read_lines` leaves for the next call.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

TERMINAL = ("done", "cancelled", "error")
TRACEBACK_LINES = 30


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _plain(value: Any) -> Any:
    """JSON fallback for numpy / torch scalars and paths in engine events."""
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class EventWriter:
    """Appends events to ``events.jsonl`` (one ``os.write`` per line; fsync after final events and checkpoints,
    so they survive a machine crash too)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.final: dict | None = None

    def emit(self, event: dict[str, Any]) -> dict[str, Any]:
        record = {"time": now_iso(), **event}
        if "type" not in record:
            raise ValueError(f"event without a type: {event!r}")
        data = (json.dumps(record, default=_plain) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if record["type"] in TERMINAL or record["type"] == "checkpoint":
            os.fsync(self._fd)
        if record["type"] in TERMINAL and self.final is None:
            self.final = record
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_lines(path: str | Path, offset: int = 0, max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Events after byte ``offset`` and the offset to pass next time.  A last line without its newline (still
    being written) is not returned and not consumed.  Lines that are not JSON (a torn write after a machine crash)
    are skipped.  ``max_bytes`` bounds how much one call reads (a UI catching up with a long run in slices); a
    line longer than that is still returned whole."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read() if max_bytes is None else handle.read(max_bytes)
            while max_bytes is not None and data and b"\n" not in data:
                more = handle.read(max_bytes)
                if not more:
                    break
                data += more
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return parse_lines(data[:end]), offset + end


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_OOM_MESSAGES = (
    "out of memory",  # CUDA / HIP caching allocator ("CUDA out of memory"), MPS ("MPS backend out of memory")
    "can't allocate memory",  # CPU allocator: "DefaultCPUAllocator: can't allocate memory"
    "cannot allocate memory",  # ENOMEM from the OS
)


def classify_error(exc: BaseException) -> str:
    """``"oom"`` for running out of memory, ``"exception"`` for anything else.

    Out of memory is ``torch.OutOfMemoryError`` (alias ``torch.cuda.OutOfMemoryError``), Python's
    ``MemoryError``, or a ``RuntimeError`` whose message is one of torch's allocator failures (MPS and the CPU
    allocator raise plain ``RuntimeError``).  The cause chain is searched too, so an OOM re-raised inside another
    error (a data-loader worker, a wrapper) is still reported as one.
    """
    torch = sys.modules.get("torch")
    oom_types: tuple[type, ...] = (MemoryError,)
    if torch is not None:
        oom_types += tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                       getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    for err in _chain(exc):
        if isinstance(err, oom_types) or type(err).__name__ == "OutOfMemoryError":
            return "oom"
        if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MESSAGES):
            return "oom"
    return "exception"


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def error_event(exc: BaseException, kind: str | None = None) -> dict[str, Any]:
    """The final ``error`` event for ``exc``."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]  # str(KeyError) wraps its message in quotes
    return {"type": "error", "kind": kind or classify_error(exc), "exception": type(exc).__name__,
            "message": message, "traceback": traceback_tail(exc)}
