"""The plugin's house rules, checked on its source: it is a thin Qt layer over ``backend.io``, ``.project``,
``.review``, ``.jobs``, ``.text``, ``.errors`` and ``.remote`` (``backend.methods`` only for the list of method
names), never the engine, the CLI or torch; and no module of it is over 400 lines."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "napari_semiseg"
# backend.remote: the server client (httpx, no torch) behind the docks' "Server URL + token" mode (issue 20)
# backend.dicom: DICOM-SEG export and the PACS (pydicom, highdicom, dicomweb-client; no torch) behind Open from PACS
ALLOWED = ("backend.io", "backend.project", "backend.review", "backend.jobs", "backend.text", "backend.errors",
           "backend.remote", "backend.dicom")
NAMES_ONLY = {"backend.methods": {"method_names"}}  # listing names imports no method module and no torch
MAX_LINES = 400


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import in ``path`` (lazy ones inside functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def _allowed(module: str, names: list[str]) -> bool:
    top = module.split(".")[0]
    if top == "torch":
        return False
    if top != "backend":
        return True
    if any(module == a or module.startswith(a + ".") for a in ALLOWED):
        return True
    return module in NAMES_ONLY and bool(names) and set(names) <= NAMES_ONLY[module]


def test_the_plugin_imports_only_the_backend_floors_it_may():
    files = sorted(PLUGIN.rglob("*.py"))
    assert len(files) > 10 and PLUGIN / "review" / "__init__.py" in files
    bad = [f"{p.relative_to(REPO)}:{line}: {module} {names or ''}" for p in files
           for line, module, names in _imports(p) if not _allowed(module, names)]
    assert not bad, "imports the plugin must not make:\n" + "\n".join(bad)


def test_the_rule_itself_catches_engine_cli_methods_and_torch():
    assert not _allowed("backend.engine.inference", ["infer"])
    assert not _allowed("backend.cli", ["main"])
    assert not _allowed("backend.methods", ["get_method"])
    assert not _allowed("backend.methods.diffrect", [])
    assert not _allowed("torch", [])
    assert _allowed("backend.review.queue", ["SORT_SCORES"]) and _allowed("backend.methods", ["method_names"])


def test_importing_both_docks_loads_no_torch_and_no_engine():
    code = ("import json, sys; import napari_semiseg.review, napari_semiseg.training, napari_semiseg.__main__; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('backend.engine', "
            "'backend.cli', 'backend.methods.')))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_plugin_module_is_over_400_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PLUGIN.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
    assert sizes["napari_semiseg/review/__init__.py"] > 0 and sizes["napari_semiseg/training/__init__.py"] > 0


def test_the_manifest_names_the_dock_packages():
    text = (REPO / "napari.yaml").read_text()
    assert "napari_semiseg.review:ReviewDock" in text and "napari_semiseg.training:TrainingDock" in text
    from napari_semiseg.review import ReviewDock
    from napari_semiseg.training import TrainingDock

    assert ReviewDock.__module__ == "napari_semiseg.review" and TrainingDock.__module__ == "napari_semiseg.training"
