"""Starting, signalling and probing the child process of a job (the platform-specific bits)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

WINDOWS = sys.platform == "win32"
FDS_ENV = "SEMISEG_JOB_FDS"  # "train=<fd>,alive=<fd>": locked descriptors the child inherits (POSIX)
NICE_ENV = "SEMISEG_JOB_NICE"  # how much lower a job's CPU priority is than its starter's (default JOB_NICENESS)
JOB_NICENESS = 10
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds ``backend``


def spawn(project_root: Path, job_id: str, log_path: Path, fds: dict[str, int]) -> subprocess.Popen:
    """``python -m backend.jobs run PROJECT JOB`` in its own session (so a Ctrl-C in the terminal or napari does
    not reach it), stdout and stderr to ``log_path``, the same interpreter."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.pop(FDS_ENV, None)
    kwargs: dict = {}
    if WINDOWS:  # pragma: no cover
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # so CTRL_BREAK reaches it alone
    else:
        kwargs["start_new_session"] = True
        kwargs["pass_fds"] = tuple(fds.values())
        if fds:
            env[FDS_ENV] = ",".join(f"{name}={fd}" for name, fd in fds.items())
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "backend.jobs", "run", str(project_root), job_id],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)


def lower_priority() -> int:
    """Lower this (child) process's CPU priority by ``$SEMISEG_JOB_NICE`` (default :data:`JOB_NICENESS`); returns
    the increment applied.  A job is background work: where it shares the CPU cores with napari (a laptop, CI's
    two cores), the viewer's event loop and its software rendering must win, and the job still gets every cycle
    the viewer leaves idle.  Workers and torchrun ranks the job starts inherit it.  POSIX only; 0 elsewhere."""
    if not hasattr(os, "nice"):  # pragma: no cover (Windows)
        return 0
    try:
        increment = int(os.environ.get(NICE_ENV, JOB_NICENESS))
    except ValueError:
        increment = JOB_NICENESS
    if increment <= 0:
        return 0
    os.nice(increment)
    return increment


def inherited_fds() -> dict[str, int]:
    """The locked descriptors handed over by :func:`spawn` (and forget them, so grandchildren do not)."""
    text = os.environ.pop(FDS_ENV, "")
    out = {}
    for item in filter(None, text.split(",")):
        name, _, fd = item.partition("=")
        if fd.isdigit():
            out[name] = int(fd)
    return out


def send_cancel(pid: int) -> None:
    """Ask the child to stop: SIGTERM (CTRL_BREAK on Windows).  A child that is already gone is ignored."""
    try:
        if WINDOWS:  # pragma: no cover
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def cancel_signals() -> list[int]:
    """The signals the child treats as "cancel": SIGTERM and SIGINT (CTRL_BREAK as SIGBREAK on Windows)."""
    names = ("SIGTERM", "SIGINT", "SIGBREAK")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` is running (a zombie counts as gone).  Used only where the alive lock cannot
    answer (Windows, or a child that had not started); process ids can be reused, so this is a fallback."""
    if not pid:
        return False
    if WINDOWS:  # pragma: no cover
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
