"""The shape of the backend: floors import only the floors under them, modules stay small, every package ships,
and a method is one folder that the registry finds (here: a toy method from a temporary folder, seen by the CLI)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

# Which rooms of backend/ each room may import (errors.py and text.py are the ground floor, "base").
ALLOWED = {
    "base": set(),
    "io": {"base"},
    "methods": {"base"},
    "project": {"base", "io"},
    "engine": {"base", "io", "methods", "project"},
    "review": {"base", "io", "project"},
    "jobs": {"base", "io", "methods", "project", "engine"},
    "dicom": {"base", "io", "project", "review"},
    "server": {"base", "io", "project", "review", "jobs", "dicom"},
    "remote": {"base", "io", "project", "review", "jobs"},
    "cli": {"base", "io", "methods", "project", "engine", "review", "jobs", "dicom", "server", "remote"},
}
# Modules allowed past 400 lines: none today (nets where one paper figure is one class would be).
MAX_LINES = 400
LONG_NETS: set[str] = set()


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "backend" or len(parts) < 2:
        return None
    return "base" if parts[1] in ("errors", "text", "__init__") else parts[1]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return out


def test_each_floor_imports_only_the_floors_under_it():
    wrong = []
    for path in sorted((REPO / "backend").rglob("*.py")):
        rel = ".".join(path.relative_to(REPO).with_suffix("").parts)
        room = _room(rel) or "base"
        assert room in ALLOWED, f"{rel}: backend/{room} is a room the floor plan does not know"
        for module in _imports(path):
            target = _room(module)
            if target and target != room and target not in ALLOWED[room]:
                wrong.append(f"{rel} imports {module} ({room} -> {target})")
            if module.split(".")[0] in ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui"):
                wrong.append(f"{rel} imports {module} (the backend runs headless)")
    assert not wrong, "\n".join(wrong)


def test_the_review_floor_never_imports_torch():
    """The plugin imports backend.review in napari's process, which must not load torch."""
    code = ("import sys, backend.review.queue, backend.review.views, backend.review.corrections, "
            "backend.review.export, backend.project.runs; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_module_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted((REPO / "backend").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
            and str(p.relative_to(REPO)) not in LONG_NETS]
    assert not long, "\n".join(long)


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_ships_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("backend", "napari_semiseg")
             for p in (REPO / top).rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"


TOY = '''
from backend.methods.supervised import Supervised


class Toy(Supervised):
    """A method from outside the tree: the supervised baseline under another name."""

    name = "toy"
    presets = {"tiny": dict(Supervised.presets["tiny"])}


METHODS = [Toy]
'''


def test_a_method_is_one_folder_found_without_a_list(tmp_path, brain_project):
    folder = tmp_path / "plugins" / "toymethod"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(TOY))
    env = {**os.environ, "SEMISEG_METHODS_PATH": str(tmp_path / "plugins"), "OMP_NUM_THREADS": "1"}
    semiseg = [sys.executable, "-m", "backend.cli"]
    listed = subprocess.run(semiseg + ["methods", "--json"], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    methods = json.loads(listed.stdout)["methods"]
    assert methods["toy"] == ["tiny"] and {"diffrect", "diffcl", "genericssl", "supervised"} <= set(methods)

    trained = subprocess.run(semiseg + ["train", str(brain_project.root), "--method", "toy", "--preset", "tiny",
                                        "--steps", "1", "--device", "cpu"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert trained.returncode == 0, trained.stderr
    runs = sorted((brain_project.semiseg / "models" / "toy").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.pt").is_file()
    assert json.loads((runs[0] / "run.json").read_text())["method"] == "toy"

    without = subprocess.run(semiseg + ["methods", "--json"], capture_output=True, text=True, cwd=REPO,
                             env={k: v for k, v in env.items() if k != "SEMISEG_METHODS_PATH"}, timeout=300)
    assert "toy" not in json.loads(without.stdout)["methods"]


def test_two_methods_of_one_name_are_refused(tmp_path):
    folder = tmp_path / "plugins" / "again"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(TOY.replace('"toy"', '"supervised"'))
    env = {**os.environ, "SEMISEG_METHODS_PATH": str(tmp_path / "plugins")}
    out = subprocess.run([sys.executable, "-c", "from backend.methods import method_names; method_names()"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode != 0 and "defined twice" in out.stderr
