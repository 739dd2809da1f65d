"""A real ``semiseg serve`` for the tests: a subprocess on 127.0.0.1 and a free port over a project folder, with
an annotator and a trainer token; killed with the test process (its parent-death signal) and stopped at
teardown, so it never outlives the tests.  Jobs it started are cancelled at teardown too."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from backend.server.auth import add_token
from helpers.orthanc import _die_with_parent, free_port

START_TIMEOUT_S = 60.0


def semiseg_env() -> dict[str, str]:
    """The engine's own CPU thread policy for the server's jobs (see tests/backend/test_engine_cli.py)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SEMISEG_THREADS")}


class SemisegServer:
    """``semiseg serve ROOT`` on ``url``; ``tokens[user]`` for users ``ann`` (annotator) and ``boss`` (trainer)."""

    def __init__(self, root: Path, folder: Path, port: int | None = None, extra: tuple[str, ...] = (),
                 scheme: str = "http"):
        self.root, self.folder = Path(root), Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tokens_file = self.folder / "tokens.json"
        if not self.tokens_file.exists():
            self.tokens = {"ann": add_token(self.tokens_file, "ann", "annotator"),
                           "boss": add_token(self.tokens_file, "boss", "trainer")}
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.extra = extra
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log = open(self.folder / "server.log", "a")
        cmd = [sys.executable, "-m", "backend.cli", "serve", str(self.root), "--port", str(self.port),
               "--tokens", str(self.tokens_file), "--log-level", "warning", *self.extra]
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=semiseg_env(),
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"semiseg serve exited: {self.log_text()}"
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"semiseg serve did not answer within {START_TIMEOUT_S:g} s: {self.log_text()}")

    def log_text(self) -> str:
        return (self.folder / "server.log").read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL, as a crash or the out-of-memory killer would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()

    def cancel_jobs(self) -> None:
        """Cancel every job still running in the project (they outlive a server) and wait for them."""
        from backend.jobs import cancel_job, list_jobs, wait_job

        running = [j["id"] for j in list_jobs(self.root) if j["state"] in ("queued", "running")]
        for job_id in running:
            cancel_job(self.root, job_id)
        for job_id in running:
            wait_job(self.root, job_id, timeout=60)

    def client(self, user: str = "boss", **kwargs):
        from backend.remote import RemoteProject

        return RemoteProject(self.url, self.tokens[user], cache_dir=self.folder / f"cache-{user}", **kwargs)

    def headers(self, user: str = "boss") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


@contextlib.contextmanager
def serving(project_root: Path, folder: Path, **kwargs: Any) -> Iterator[SemisegServer]:
    """A :class:`SemisegServer` for a ``with`` block (or a fixture); at its end the jobs still running in the
    project are cancelled (they outlive a server, even a killed one) and the server stops."""
    server = SemisegServer(project_root, folder, **kwargs)
    try:
        yield server
    finally:
        server.cancel_jobs()
        server.stop()
