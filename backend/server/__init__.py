"""``semiseg serve``: the project over HTTP for a laptop without the project folder or a GPU (FastAPI + uvicorn).

Versioned JSON endpoints under ``/api/v1`` (:mod:`backend.server.app`): the review queue with its scores, a case's
image, label and pseudo-label views as NIfTI bytes with content-hash ETags, accepting a corrected label with
``If-Match`` of the label version it started from (the journaled :meth:`backend.project.Project.accept`),
training and inference jobs (:mod:`backend.jobs`: state on disk, so jobs outlive the server) with their events as
server-sent events, and a run's weights.  Bearer tokens per user, stored hashed, roles annotator / trainer
(:mod:`backend.server.auth`).  Listens on 127.0.0.1 unless told otherwise; reach it through an SSH tunnel, or
serve TLS with ``--tls-cert/--tls-key``.  The client is :class:`backend.remote.RemoteProject`.
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from backend.errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def default_tokens_path(project_root: str | Path) -> Path:
    """Where ``serve`` looks for the tokens file unless told: ``<project>/semiseg/tokens.json``."""
    return Path(project_root) / "semiseg" / "tokens.json"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(project_root: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          tokens: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          log_level: str = "info", job_backend=None) -> None:
    """Run the server until interrupted (blocking); the jobs clients start go to ``job_backend``
    (:mod:`backend.jobs.backends`; default: this machine)."""
    import uvicorn

    from backend.server.app import create_app
    from backend.server.auth import TokenStore

    tokens = Path(tokens) if tokens else default_tokens_path(project_root)
    if TokenStore(tokens).user_count() == 0:
        raise InputError(tokens, "no users in the tokens file; make one first: "
                                 f"semiseg token add USER --role trainer --tokens {tokens}")
    if (tls_cert is None) != (tls_key is None):
        raise InputError(tls_cert or tls_key, "TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise InputError(path, "no such file")
    app = create_app(project_root, tokens, job_backend)
    scheme = "https" if tls_cert else "http"
    if not is_loopback(host) and tls_cert is None:
        print(f"semiseg serve: warning: listening on {host} without TLS: tokens and images cross the network in "
              f"clear text; prefer an SSH tunnel to 127.0.0.1 or --tls-cert/--tls-key", file=sys.stderr)
    print(f"semiseg serve: {app.state.project_root} on {scheme}://{host}:{port}/api/v1 (tokens: {tokens})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ssl_certfile=tls_cert and str(tls_cert),
                ssl_keyfile=tls_key and str(tls_key), timeout_graceful_shutdown=5)
