"""Files sent as they are on disk, with an ETag that is their content hash (``"sha256:<hex>"``), so a client
keeps what it has (``If-None-Match`` -> 304) and a changed file is always sent again.

The hash is computed once per file version (keyed by inode, size and time) and the bytes sent are read from the
same open file the hash was made of, so an ETag never labels other content.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

CHUNK = 1 << 20
NIFTI = "application/gzip"
_hashes: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def _stamp(handle: BinaryIO, path: Path) -> tuple:
    st = os.fstat(handle.fileno())
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def content_etag(handle: BinaryIO, path: Path) -> str:
    """The ETag of the open file ``handle`` (``path`` names it in the cache); leaves the handle at its start."""
    key = _stamp(handle, path)
    with _hash_lock:
        etag = _hashes.get(key)
    if etag is None:
        digest = hashlib.sha256()
        handle.seek(0)
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
        etag = f'"sha256:{digest.hexdigest()}"'
        with _hash_lock:
            _hashes[key] = etag
    handle.seek(0)
    return etag


def matches(request: Request, etag: str) -> bool:
    """Whether the request's ``If-None-Match`` names ``etag`` (or is ``*``)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    try:
        for block in iter(lambda: handle.read(CHUNK), b""):
            yield block
    finally:
        handle.close()


def file_response(request: Request, path: Path, media_type: str = NIFTI) -> Response:
    """``path``'s bytes with their content-hash ETag, or 304 when the client has them."""
    return send_open(request, open(path, "rb"), path, media_type=media_type)


def send_open(request: Request, handle: BinaryIO, path: Path, etag: str | None = None,
              media_type: str = NIFTI) -> Response:
    """The bytes of the open file ``handle`` (closed when sent) with ``etag`` (default: the content hash)."""
    try:
        etag = etag or content_etag(handle, path)
        size = os.fstat(handle.fileno()).st_size
    except BaseException:
        handle.close()
        raise
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if matches(request, etag):
        handle.close()
        return Response(status_code=304, headers=headers)
    headers["Content-Length"] = str(size)
    headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
    return StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)
