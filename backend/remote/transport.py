"""HTTP to one ``semiseg serve`` (httpx): the bearer token, errors mapped to :mod:`backend.remote.errors`, and
downloads kept on local disk by ETag (a file the server still has with the same ETag is answered 304, not sent)."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx

from backend.io.atomic import write_json_atomic
from backend.remote.errors import RemoteError, connection_error, http_error

API = "/api/v1"
CONNECT_TIMEOUT_S = 10.0


def default_cache_dir(url: str) -> Path:
    """``$XDG_CACHE_HOME/semiseg/remote/<host>_<port>`` (``~/.cache`` by default)."""
    parsed = httpx.URL(url)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "semiseg" / "remote" / f"{parsed.host}_{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


class Transport:
    """Requests to ``url`` (the server root, e.g. ``http://127.0.0.1:8765``) with ``token``.

    ``verify``: True (the system's CAs), False, or the path of a CA bundle (a self-signed server certificate).
    ``timeout``: seconds without an answer before :class:`~backend.remote.errors.RemoteTimeout`.
    """

    def __init__(self, url: str, token: str, *, cache_dir: str | Path | None = None, verify: bool | str | Path = True,
                 timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.url)
        limits = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        if isinstance(verify, (str, Path)):  # a CA bundle: the server's self-signed certificate
            verify = ssl.create_default_context(cafile=str(verify))
        self.client = httpx.Client(base_url=self.url + API, headers={"Authorization": f"Bearer {token}"},
                                   verify=verify, timeout=limits)
        self._index_lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, *, conflict: type[Exception] = RemoteError, **kwargs: Any) -> Any:
        """The JSON answer of ``method path`` (under ``/api/v1``); errors raised as their specific types."""
        response = self._send(method, path, **kwargs)
        if response.status_code >= 400:
            raise http_error(response, conflict)
        return response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.url) from exc

    def stream(self, method: str, path: str, **kwargs: Any):
        """A streamed response (context manager); connection errors raised as their specific types."""
        try:
            return self.client.stream(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.url) from exc

    # ---- the ETag cache -----------------------------------------------------------------------------------------
    @property
    def _index_path(self) -> Path:
        return self.cache_dir / "index.json"

    def _index(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def download(self, path: str, suffix: str, params: dict[str, Any] | None = None) -> tuple[Path, str]:
        """The local file holding ``GET path`` and its ETag: sent again only when the server's ETag changed."""
        key = path + ("?" + str(httpx.QueryParams(params)) if params else "")
        with self._index_lock:
            known = self._index().get(key)
        headers = {}
        if known and (self.cache_dir / known["file"]).is_file():
            headers["If-None-Match"] = known["etag"]
        try:
            with self.client.stream("GET", path, params=params, headers=headers) as response:
                if response.status_code == 304:
                    return self.cache_dir / known["file"], known["etag"]
                if response.status_code >= 400:
                    response.read()
                    raise http_error(response)
                etag = response.headers.get("etag", "")
                name = hashlib.sha256((key + etag).encode()).hexdigest()[:40] + suffix
                target = self.cache_dir / "files" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{secrets.token_hex(6)}{suffix}")
                try:
                    with open(tmp, "wb") as out:
                        for block in response.iter_bytes(1 << 20):
                            out.write(block)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.url) from exc
        if etag:
            with self._index_lock:
                index = self._index()
                old = index.get(key)
                index[key] = {"etag": etag, "file": f"files/{name}"}
                write_json_atomic(self._index_path, index)
            if old and old["file"] != f"files/{name}":
                (self.cache_dir / old["file"]).unlink(missing_ok=True)
        return target, etag

    def sse(self, path: str, offset: int = 0) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        """``(event type, data, id)`` of a server-sent event stream, from byte ``offset`` (sent as Last-Event-ID)."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(offset)}
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)  # the server sends a keep-alive every 15 s
        try:
            with self.client.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise http_error(response)
                kind, data, event_id = "message", [], None
                for line in response.iter_lines():
                    if not line:
                        if data:
                            yield kind, json.loads("\n".join(data)), event_id
                        kind, data, event_id = "message", [], None
                    elif line.startswith(":"):
                        continue
                    else:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "event":
                            kind = value
                        elif field == "data":
                            data.append(value)
                        elif field == "id" and value.isdigit():
                            event_id = int(value)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.url) from exc
