"""The job form: method, preset, device and steps, filled from a child process (``python -m backend.jobs.choices``,
which imports torch and every method, found in the tree and in ``$SEMISEG_METHODS_PATH``; napari's process never
does).

Why plain Qt widgets and not magicgui: magicgui builds a form from a function signature with fixed choices, and
this form is the opposite.  Its choices arrive later from a child process, the presets follow the method, the
default method is a semi-supervised one (not the first listed), and 0 steps reads "preset default".  Every one of
those needs the underlying ``QComboBox`` / ``QSpinBox`` anyway, so magicgui would add a layer without removing a
line; the project therefore does not declare magicgui (napari itself still depends on it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qtpy.QtCore import QProcess, Signal
from qtpy.QtWidgets import QComboBox, QGridLayout, QLabel, QSpinBox, QWidget

SEMI_SUPERVISED_FIRST = ("diffrect", "genericssl", "diffcl")  # the default method: a semi-supervised one
REPO = Path(__file__).resolve().parents[2]


class TrainingForm(QWidget):
    """Method, preset, device and steps; ``choices_loaded`` when the child process has answered."""

    choices_loaded = Signal(dict)
    method_changed = Signal(str)
    message = Signal(str)  # a line for the dock's status

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.choices: dict[str, Any] = {}
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.method_combo = QComboBox()
        self.method_combo.currentTextChanged.connect(self._on_method_changed)
        self.preset_combo = QComboBox()
        self.device_combo = QComboBox()
        self.device_combo.addItem("auto")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 1_000_000)
        self.steps_spin.setSpecialValueText("preset default")
        self.steps_spin.setSingleStep(100)
        for row, (label, widget) in enumerate((("Method", self.method_combo), ("Preset", self.preset_combo),
                                              ("Device", self.device_combo), ("Steps", self.steps_spin))):
            grid.addWidget(QLabel(label), row, 0)
            grid.addWidget(widget, row, 1)
        self.process = QProcess(self)
        self.process.finished.connect(self._on_choices)
        self.local = True  # the choices shown are this machine's (False: a server's, set by the dock)

    def method(self) -> str:
        return self.method_combo.currentText()

    def values(self) -> dict[str, Any]:
        """``method``, ``device``, ``preset`` and ``steps`` (None: the preset's own)."""
        return {"method": self.method(), "device": self.device_combo.currentText() or "auto",
                "preset": self.preset_combo.currentText() or None, "steps": self.steps_spin.value() or None}

    # ---- the choices, from a child process --------------------------------------------------------------------
    def load_choices(self) -> None:
        """This machine's choices, from the child process (once at a time)."""
        self.local = True
        if self.process.state() != QProcess.ProcessState.NotRunning:
            return  # its answer is on the way
        self.process.setWorkingDirectory(str(REPO))
        self.message.emit("Looking up methods and devices...")
        self.process.start(sys.executable, ["-m", "backend.jobs.choices"])

    def _on_choices(self, *_args: Any) -> None:
        if not self.local:
            return  # a server's choices replaced these meanwhile
        out = bytes(self.process.readAllStandardOutput()).decode(errors="replace").strip().splitlines()
        try:
            choices = json.loads(out[-1])
        except (IndexError, ValueError):
            err = bytes(self.process.readAllStandardError()).decode(errors="replace").strip().splitlines()
            from backend.methods import method_names  # names only: no torch, no method module

            choices = {"methods": {m: [] for m in method_names()}, "devices": ["cpu"]}
            self.message.emit("Could not list the presets and devices: " + (err[-1] if err else "no output"))
        else:
            self.message.emit("")
        self.set_choices(choices)

    def set_choices(self, choices: dict[str, Any]) -> None:
        """Fill the method, preset and device boxes from ``{"methods": {name: [presets]}, "devices": [...]}``."""
        self.choices = choices
        current = self.method_combo.currentText()
        self.method_combo.blockSignals(True)
        self.method_combo.clear()
        methods = list(choices.get("methods", {}))
        self.method_combo.addItems(methods)
        preferred = [m for m in SEMI_SUPERVISED_FIRST if m in methods]
        if current in methods:
            self.method_combo.setCurrentText(current)
        elif preferred:  # the baseline is what the semi-supervised methods are compared against, not the default
            self.method_combo.setCurrentText(preferred[0])
        self.method_combo.blockSignals(False)
        self._on_method_changed(self.method_combo.currentText())
        self.device_combo.clear()
        self.device_combo.addItem("auto")
        self.device_combo.addItems([d for d in choices.get("devices", []) if d != "auto"])
        self.choices_loaded.emit(choices)

    def _on_method_changed(self, method: str) -> None:
        presets = self.choices.get("methods", {}).get(method, [])
        current = self.preset_combo.currentText()
        self.preset_combo.clear()
        self.preset_combo.addItems(presets)
        for preferred in (current, "quick"):
            if preferred in presets:
                self.preset_combo.setCurrentText(preferred)
                break
        self.method_changed.emit(method)
