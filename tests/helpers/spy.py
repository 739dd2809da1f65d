"""Record the calls of a method's steps without changing them, for tests that check what each step read."""
from __future__ import annotations

from typing import Any


def record_calls(obj: Any, seen: dict[str, list], attrs: dict[str, str]) -> None:
    """Wrap ``obj.<attr>`` for each ``name: attr`` of ``attrs`` so that every call appends ``(args, result)`` to
    ``seen[name]`` and returns the result unchanged."""
    for name, attr in attrs.items():
        fn = getattr(obj, attr)

        def wrapped(*args: Any, _fn=fn, _name=name) -> Any:
            result = _fn(*args)
            seen[_name].append((args, result))
            return result

        setattr(obj, attr, wrapped)
