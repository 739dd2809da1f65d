"""The jobs half of :class:`backend.remote.RemoteProject`: the functions of :mod:`backend.jobs` (start, list,
status, events, cancel, resume, wait), as methods without the project argument."""
from __future__ import annotations

import time
from typing import Any, Iterator

from backend.errors import JobBusyError
from backend.jobs import FINAL_STATES, TERMINAL
from backend.remote.errors import Forbidden, RemoteError, Unauthorized
from backend.remote.transport import Transport

RECONNECT_S = 1.0
MAX_RECONNECTS = 30  # about half a minute of a server that does not answer


class RemoteJobs:
    """Mixed into :class:`~backend.remote.RemoteProject` (``self.http`` is its :class:`Transport`)."""

    http: Transport

    def start_job(self, spec: dict[str, Any]) -> str:
        """Start a training or inference job on the server (:func:`backend.jobs.start_job`'s spec); its id.
        :class:`JobBusyError` while another training job runs there."""
        return self.http.request("POST", "/jobs", json=spec, conflict=JobBusyError)["id"]

    def training_choices(self) -> dict[str, Any]:
        """The server's methods, presets and devices (:func:`backend.jobs.choices.training_choices` run there)."""
        return self.http.request("GET", "/choices")

    def list_jobs(self) -> list[dict[str, Any]]:
        return self.http.request("GET", "/jobs")

    def job_status(self, job_id: str) -> dict[str, Any]:
        return self.http.request("GET", f"/jobs/{job_id}")

    def read_events(self, job_id: str, offset: int = 0,
                    max_bytes: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Events after byte ``offset`` and the offset to pass next time (as :func:`backend.jobs.read_events`)."""
        params: dict[str, Any] = {"offset": offset}
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        answer = self.http.request("GET", f"/jobs/{job_id}/events", params=params)
        return answer["events"], answer["offset"]

    def stream_events(self, job_id: str, offset: int = 0,
                      reconnect: bool = True) -> Iterator[tuple[dict[str, Any], int]]:
        """``(event, offset after it)`` as the job writes them (server-sent events), until its final event; a
        job that ended without one (killed) ends the stream after an ``{"type": "end", "status": ...}`` item.
        A dropped connection is resumed from the last offset (``reconnect``), so no event is lost or repeated."""
        failures = 0
        while True:
            try:
                for kind, data, event_id in self.http.sse(f"/jobs/{job_id}/stream", offset):
                    failures = 0
                    if event_id is not None:
                        offset = event_id
                    if kind == "end":
                        yield {"type": "end", "status": data}, offset
                        return
                    yield data, offset
                    if kind in TERMINAL:
                        return
            except (Unauthorized, Forbidden):
                raise
            except RemoteError:  # the connection dropped (a server restart, a tunnel hiccup): resume from offset
                failures += 1
                if not reconnect or failures > MAX_RECONNECTS:
                    raise
                time.sleep(RECONNECT_S)

    def cancel_job(self, job_id: str) -> None:
        """Ask this job (only) to stop; it checkpoints and ends with a ``cancelled`` event."""
        self.http.request("POST", f"/jobs/{job_id}/cancel")

    def resume_job(self, job_id: str) -> str:
        """A new job continuing ``job_id``'s run (:func:`backend.jobs.resume_job`); its id."""
        return self.http.request("POST", f"/jobs/{job_id}/resume", conflict=JobBusyError)["id"]

    def wait_job(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job reaches a final state and return its status (``TimeoutError`` after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.job_status(job_id)
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {status['state']} after {timeout:g} s")
            time.sleep(poll)
