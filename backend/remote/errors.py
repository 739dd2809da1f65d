"""What can go wrong talking to a ``semiseg serve``: one exception type per cause, each with a one-line message
that says what to do (the "Test connection" button shows it as is).

HTTP answers map onto the local API's own errors where one exists, so code written against
:class:`backend.project.Project` handles a server the same way: 409 on a label -> :class:`LabelConflictError`,
409 on a job -> :class:`JobBusyError`, other 4xx -> :class:`InputError` (404 -> :class:`NotFoundError`).
"""
from __future__ import annotations

import socket
import ssl

import httpx

from backend.errors import InputError


class RemoteError(Exception):
    """The server could not be reached or did not answer as expected (``str(err)`` is one line)."""


class ConnectionRefused(RemoteError):
    """Nothing listens at that address and port."""


class HostNotFound(RemoteError):
    """The host name does not resolve (DNS)."""


class TLSFailure(RemoteError):
    """The TLS handshake failed (certificate not trusted, wrong host name, or http/https mixed up)."""


class RemoteTimeout(RemoteError):
    """The server did not answer in time."""


class Unauthorized(RemoteError):
    """401: no token, or a wrong one."""


class Forbidden(RemoteError):
    """403: the token's role does not allow this (an annotator starting training)."""


class NotFoundError(InputError):
    """404: the server has no such case, run or job."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def connection_error(exc: httpx.TransportError, url: str) -> RemoteError:
    """The specific :class:`RemoteError` for a failed request to ``url``."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if isinstance(exc, httpx.TimeoutException):
        return RemoteTimeout(f"{url}: no answer within the timeout ({type(exc).__name__}); is the server busy or the "
                             f"tunnel down?")
    if any(isinstance(e, ssl.SSLError) for e in _chain(exc)) or "ssl" in text or "certificate" in text:
        detail = "certificate not trusted (pass the server's CA file as verify=)" if "certif" in text else \
            "TLS handshake failed (does the server speak https? the URL scheme must match)"
        return TLSFailure(f"{url}: {detail}")
    if any(isinstance(e, socket.gaierror) for e in _chain(exc)) or any(
            m in text for m in ("name or service not known", "nodename nor servname", "getaddrinfo failed",
                                "temporary failure in name resolution", "no address associated")):
        return HostNotFound(f"{url}: host name not found (DNS); check the spelling of the host")
    if any(isinstance(e, ConnectionRefusedError) for e in _chain(exc)) or "refused" in text:
        return ConnectionRefused(f"{url}: connection refused; is 'semiseg serve' running there, on that port "
                                 f"(and the SSH tunnel open)?")
    return RemoteError(f"{url}: {type(exc).__name__}: {exc}")


def http_error(response: httpx.Response, conflict: type[Exception] = RemoteError) -> Exception:
    """The error for a 4xx/5xx answer (its ``detail`` as the message)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if not isinstance(detail, str):
        detail = response.text.strip()[:200] or response.reason_phrase
    status = response.status_code
    if status == 401:
        return Unauthorized(f"{response.url.host}: 401 unauthorized: the token is missing or wrong; ask the server's "
                            f"admin for one (semiseg token add)")
    if status == 403:
        return Forbidden(f"403 forbidden: {detail}")
    if status == 404:
        return NotFoundError(None, detail)
    if status == 409:
        return conflict(None, detail) if issubclass(conflict, InputError) else conflict(detail)
    if 400 <= status < 500:
        return InputError(None, detail)
    return RemoteError(f"{response.url}: server error {status}: {detail}")
