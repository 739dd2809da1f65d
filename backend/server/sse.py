"""One job's events as server-sent events, tailing its ``events.jsonl`` (the one progress source, written by the
job's process whatever runs it).

Each event goes out as ``id: <byte offset after its line>``, ``event: <type>``, ``data: <the JSON line>``; a
client that lost the connection reconnects with ``Last-Event-ID: <offset>`` (or ``?offset=``) and gets exactly
the events after it.  The stream ends after the job's final event (``done``, ``cancelled``, ``error``), or with
an ``end`` event carrying the job's status when the job ended without one (killed: ``dead``).  A comment line
every :data:`HEARTBEAT_S` keeps proxies and SSH tunnels from closing an idle stream.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from backend.jobs import FINAL_STATES, TERMINAL
from backend.jobs.events import parse_lines

POLL_S = 0.25
STATUS_EVERY_S = 1.0
HEARTBEAT_S = 15.0
READ_MAX = 1 << 20


def new_lines(path: Path, offset: int) -> list[tuple[dict[str, Any], int]]:
    """``(event, offset after its line)`` for each whole line after ``offset`` (a line still being written is
    left for the next look; lines that are not JSON are skipped, as :func:`backend.jobs.read_events` does)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(READ_MAX)
    except FileNotFoundError:
        return []
    out = []
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        for event in parse_lines(data[start:end + 1]):
            out.append((event, offset + end + 1))
        start = end + 1
    return out


def message(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(request: Request, path: Path, offset: int,
                       status: Callable[[], dict[str, Any]]) -> AsyncIterator[str]:
    """The SSE body: events after ``offset`` as they are written, until the job ends or the client leaves."""
    last_status = last_sent = time.monotonic()
    while not await request.is_disconnected():
        lines = await run_in_threadpool(new_lines, path, offset)
        for event, offset in lines:
            yield message(str(event.get("type", "event")), event, offset)
            if event.get("type") in TERMINAL:
                return
        now = time.monotonic()
        if lines:
            last_sent = now
            continue
        if now - last_status >= STATUS_EVERY_S:
            last_status = now
            state = await run_in_threadpool(status)
            if state["state"] in FINAL_STATES and not await run_in_threadpool(new_lines, path, offset):
                yield message("end", state, offset)
                return
        if now - last_sent >= HEARTBEAT_S:
            last_sent = now
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
