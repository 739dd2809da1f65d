"""Registry of segmentation methods by name.  Modules are imported on first use."""
from __future__ import annotations

import importlib

from backend.methods.base import BaseConfig, Method

_MODULES = {
    "supervised": "backend.methods.supervised",
    "supervised2d": "backend.methods.supervised2d",
    "diffrect": "backend.methods.diffrect",
    "diffcl": "backend.methods.diffcl",
    "genericssl": "backend.methods.genericssl",
}


def method_names() -> list[str]:
    """Every registered method name."""
    return list(_MODULES)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (each module defines ``METHOD = <its Method subclass>``)."""
    if name not in _MODULES:
        raise KeyError(f"unknown method '{name}' (methods: {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).METHOD


__all__ = ["BaseConfig", "Method", "get_method", "method_names"]
