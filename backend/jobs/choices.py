"""What the training dock offers, computed in a child process (``python -m backend.jobs.choices``): it imports
torch and every method, which napari's own process never does."""
from __future__ import annotations

import json
from typing import Any


def training_choices() -> dict[str, Any]:
    """What the training dock offers: ``{"methods": {name: [presets]}, "devices": [...]}``.

    This imports torch and every method; the dock calls it in a child process (``python -m backend.jobs.choices``)
    so napari's own process never loads torch.  A method whose module is missing or broken is left out.
    """
    from backend.engine.devices import available_devices
    from backend.methods import get_method, method_names

    methods: dict[str, list[str]] = {}
    for name in method_names():
        try:
            methods[name] = list(get_method(name).presets)
        except Exception:  # noqa: BLE001 - a method still being written must not hide the others
            continue
    return {"methods": methods, "devices": available_devices()}


if __name__ == "__main__":
    print(json.dumps(training_choices()))
