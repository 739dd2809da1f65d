"""Text shared by the CLI, the first run and the plugin."""
from __future__ import annotations


def format_duration(seconds: float | None) -> str:
    """A duration for progress lines and ETAs: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"`` (``"-"`` for None)."""
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
