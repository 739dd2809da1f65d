"""Per-user bearer tokens, kept hashed in a server-side JSON file; roles ``annotator`` and ``trainer``.

The tokens file (``semiseg token add USER --role R --tokens FILE`` writes it, mode 0600)::

    {"users": {"alice": {"role": "trainer", "sha256": "<hex of sha256(token)>", "created": "<ISO time>"}}}

A token is 32 random bytes (``secrets.token_urlsafe``), shown once when it is made; only its SHA-256 is stored
(the token is random, so an unsalted hash is as strong as the token).  A request's token is hashed and compared
with every user's hash in constant time (:func:`hmac.compare_digest`), so timing tells nothing about which
prefix matched.  The server re-reads the file when it changes: adding or removing a user needs no restart.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import InputError
from backend.io.atomic import read_json, write_json_atomic

# What each role may do; a trainer may also annotate.
ROLES: dict[str, frozenset[str]] = {
    "annotator": frozenset({"read", "annotate"}),
    "trainer": frozenset({"read", "annotate", "train"}),
}
USER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def may(self, action: str) -> bool:
        return action in ROLES[self.role]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_tokens(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{user: {"role", "sha256", "created"}}`` of a tokens file ({} when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = read_json(path, "tokens file")
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict) or not all(isinstance(v, dict) and v.get("role") in ROLES
                                              and isinstance(v.get("sha256"), str) for v in users.values()):
        raise InputError(path, "corrupt tokens file (expected {\"users\": {name: {\"role\", \"sha256\"}}})")
    return users


def _write_tokens(path: Path, users: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"users": users})
    os.chmod(path, 0o600)


def add_token(path: str | Path, user: str, role: str) -> str:
    """Make a new token for ``user`` with ``role`` (replacing the user's old token) and return it; only its
    hash is written."""
    if role not in ROLES:
        raise InputError(None, f"unknown role '{role}' (roles: {', '.join(ROLES)})")
    if not user or not set(user) <= USER_NAME_CHARS:
        raise InputError(None, f"invalid user name '{user}' (letters, digits, '.', '_', '-', '@')")
    path = Path(path)
    users = read_tokens(path)
    token = secrets.token_urlsafe(32)
    users[user] = {"role": role, "sha256": token_hash(token),
                   "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _write_tokens(path, users)
    return token


def remove_token(path: str | Path, user: str) -> bool:
    """Remove ``user``'s token; False when the file had no such user."""
    path = Path(path)
    users = read_tokens(path)
    if users.pop(user, None) is None:
        return False
    _write_tokens(path, users)
    return True


class TokenStore:
    """The tokens file as the server sees it: re-read whenever its size or time changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                self._users = read_tokens(self.path)
                self._stamp = stamp

    def user_count(self) -> int:
        self._load()
        return len(self._users)

    def authenticate(self, token: str | None) -> User | None:
        """The user whose token this is, or None.  Every stored hash is compared (constant time each)."""
        if not token:
            return None
        self._load()
        digest = token_hash(token)
        found = None
        for name, record in self._users.items():
            if hmac.compare_digest(digest, record["sha256"]):
                found = User(name, record["role"])
        return found
