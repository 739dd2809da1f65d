"""Advisory file locks that the kernel drops when their process dies.

Three locks use this:

* ``semiseg/project.lock``: the project's writer lock (``backend.project.ProjectLock`` waits for it), held by an
  accept or an import while it writes.
* ``semiseg/jobs/train.lock``: one training job per project.  Held by the training child for its whole life.
* ``semiseg/jobs/<id>/alive.lock``: held by every job's child; a job whose lock is free and that wrote no final
  event is ``dead`` (killed, out of memory killer, machine stopped) -- unlike a process-id check this is immune to
  zombies and to process ids being reused.

On POSIX the locks are ``fcntl.flock`` locks.  :func:`backend.jobs.api.start_job` takes both in the parent and
hands the locked descriptors to the child (``pass_fds``): ``flock`` belongs to the open file, which the child then
shares, so the lock is held without a gap from the moment the job is accepted until the child exits, and a second
``start_job`` is refused at once even while the first child is still importing torch.  On Windows
(``msvcrt.locking``, no descriptor passing) the parent only probes the lock and the child takes it itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

WINDOWS = sys.platform == "win32"
if WINDOWS:  # pragma: no cover - exercised on Windows only
    import msvcrt
else:
    import fcntl


class FileLock:
    """An exclusive, non-blocking advisory lock on ``path`` (created if missing)."""

    def __init__(self, path: str | Path, fd: int | None = None):
        self.path = Path(path)
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False when another open file (another process) holds it.

        When this object already has a descriptor (one inherited from the parent), the call re-asserts the lock on
        that same open file, which succeeds if and only if the lock really is ours.
        """
        fd = self.fd
        if fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if WINDOWS:  # pragma: no cover
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if self.fd is None:
                os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        """Unlock and close."""
        if self.fd is None:
            return
        try:
            if WINDOWS:  # pragma: no cover
                os.lseek(self.fd, 0, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
            else:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def close_handed_over(self) -> None:
        """Close this process's descriptor *without* unlocking: after a child inherited the descriptor, the lock
        stays held by the child's copy of the same open file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | Path) -> bool:
    """True when some process holds the lock on ``path`` (probe: acquire and release at once)."""
    path = Path(path)
    if not path.exists():
        return False
    lock = FileLock(path)
    if lock.try_acquire():
        lock.release()
        return False
    return True


def same_file(fd: int, path: str | Path) -> bool:
    """Whether descriptor ``fd`` is open on ``path`` (guards against a stale inherited descriptor number)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
