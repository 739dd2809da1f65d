"""The methods, found by scanning: every module or sub-package of ``backend/methods/`` (and of each folder in
``$SEMISEG_METHODS_PATH``, ``os.pathsep``-separated) that defines ``METHODS = [<Method subclass>, ...]`` is a
method, registered under each class's ``name``.  Adding a method is adding its folder: no list to edit.

Modules are imported on first use of the registry (they import torch); ``base``, ``schedules``, ``layers`` and
names starting with ``_`` hold shared code and are not scanned.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

from backend.methods.base import BaseConfig, Method

METHODS_PATH_ENV = "SEMISEG_METHODS_PATH"
_SHARED = {"base", "schedules", "layers"}
_registry: dict[str, type[Method]] | None = None


def _candidate_modules() -> list[str]:
    """Dotted names of the modules to scan: ours first, then those of ``$SEMISEG_METHODS_PATH`` (imported under
    their folder name, so a folder there must not reuse a name of ours)."""
    names = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)
             if info.name not in _SHARED and not info.name.startswith("_")]
    for folder in filter(None, os.environ.get(METHODS_PATH_ENV, "").split(os.pathsep)):
        folder = str(Path(folder).resolve())
        if folder not in sys.path:
            sys.path.append(folder)
        names += [info.name for info in pkgutil.iter_modules([folder]) if not info.name.startswith("_")]
    return names


def _methods() -> dict[str, type[Method]]:
    global _registry
    if _registry is None:
        found: dict[str, type[Method]] = {}
        for module in _candidate_modules():
            for cls in getattr(importlib.import_module(module), "METHODS", ()):
                if cls.name in found:
                    raise RuntimeError(f"method name '{cls.name}' is defined twice ({found[cls.name].__module__}, "
                                       f"{cls.__module__})")
                found[cls.name] = cls
        _registry = found
    return _registry


def method_names() -> list[str]:
    """Every method's name, in scan order (supervised baselines first: modules sort by name)."""
    return list(_methods())


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    methods = _methods()
    if name not in methods:
        raise KeyError(f"unknown method '{name}' (methods: {', '.join(methods)})")
    return methods[name]


__all__ = ["BaseConfig", "Method", "get_method", "method_names"]
