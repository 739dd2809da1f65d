"""The client of ``semiseg serve``: :class:`RemoteProject` offers the operations of a local project and of
:mod:`backend.jobs` over HTTP (httpx), so the docks switch between "Project folder" and "Server URL + token"
through one object; :mod:`backend.remote.errors` names each way a connection fails."""
from __future__ import annotations

from backend.remote.errors import (ConnectionRefused, Forbidden, HostNotFound, NotFoundError, RemoteError,
                                   RemoteTimeout, TLSFailure, Unauthorized)
from backend.remote.project import RemoteProject

__all__ = ["ConnectionRefused", "Forbidden", "HostNotFound", "NotFoundError", "RemoteError", "RemoteProject",
           "RemoteTimeout", "TLSFailure", "Unauthorized"]
