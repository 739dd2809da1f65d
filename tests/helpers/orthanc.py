"""A real Orthanc PACS with its DICOMweb plugin for the tests: on a free port, remote access off (Orthanc 1.10
has no bind-address option: its socket is on every interface, but it answers only requests from 127.0.0.1;
:meth:`Orthanc.remote_status` checks that), storage in the test's temp folder; stopped at teardown and killed
with the test process (its parent death signal), so it never outlives the tests.  Skips with the reason when
Orthanc cannot start."""
from __future__ import annotations

import base64
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the test process dies
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Orthanc:
    """A running Orthanc: ``url`` is its DICOMweb root, ``rest`` its REST API root."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None):
        binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
        plugin = next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
        if binary is None or plugin is None:
            pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc "
                        "orthanc-dicomweb; scripts/install.sh does it)")
        self.folder = Path(folder)
        self.port = free_port()
        config = {
            "Name": "semiseg-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomServerEnabled": False, "DicomPort": 0, "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([binary, str(self.folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.rest = f"http://127.0.0.1:{self.port}"
        self.auth = None if not users else "Basic " + base64.b64encode(":".join(next(iter(users.items()))).encode()
                                                                        ).decode()
        self.url = f"{self.rest}/dicom-web"
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.folder / "orthanc.log").read_text()[-300:].strip().replace("\n", " | ")
                self.stop()
                pytest.skip(f"Orthanc exited at start (code {self.process.returncode}): {tail}")
            try:
                with self.request("/dicom-web/studies", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.skip(f"Orthanc did not answer on 127.0.0.1:{self.port} within {START_TIMEOUT_S:g} s")

    def request(self, path: str, data: bytes | None = None, timeout: float = 30, host: str = "127.0.0.1"):
        """An HTTP request to the REST API (with the first user's credentials when auth is on)."""
        request = urllib.request.Request(f"http://{host}:{self.port}{path}", data=data)
        if self.auth:
            request.add_header("Authorization", self.auth)
        return urllib.request.urlopen(request, timeout=timeout)

    def store(self, folder: Path) -> int:
        """POST every file of ``folder`` to ``/instances`` (Orthanc's REST API, not the code under test)."""
        count = 0
        for path in sorted(folder.iterdir()):
            with self.request("/instances", path.read_bytes()) as reply:
                assert reply.status == 200, reply.read()[:200]
            count += 1
        return count

    def remote_status(self) -> int | None:
        """HTTP status of a request through this machine's first non-loopback address (None when it has none)."""
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        address = next((a for a in out if ":" not in a and not a.startswith("127.")), None)
        if address is None:
            return None
        try:
            with self.request("/dicom-web/studies", host=address, timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # a clean stop takes Orthanc 2-3 s; its storage is a temp folder: 1 s is enough
            try:
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc for a test module (start 0.5 s, clean stop 2-3 s)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
