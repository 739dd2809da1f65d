"""The trained models list: every run of every method with its labeled-set size and best validation Dice, and which
run *Infer* uses per method: the best by validation (:func:`backend.project.runs.best_runs`) unless the user
clicked another run; the line under the table says which and why."""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from backend.project import Project
from backend.project.runs import best_runs, run_table

BEST, PICKED = "best by validation", "your pick"


class ModelList(QWidget):
    """The models table, the "Infer uses" line and *Use best*.  ``method_picked(method)`` asks the dock to select
    a method whose run the user clicked."""

    method_picked = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.project: Project | None = None
        self.method = ""                  # the method chosen in the form
        self.models: list[dict[str, Any]] = []
        self.best: dict[str, str] = {}    # {method: run} with the best validation Dice
        self.picked: dict[str, str] = {}  # {method: run} the user chose to infer with (else the best by validation)
        self._syncing = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Trained models (click a run to infer with it)"))
        self.models_table = QTableWidget(0, 5)
        self.models_table.setHorizontalHeaderLabels(["method", "run", "labeled\ncases", "best\nvalidation Dice",
                                                     "Infer\nuses"])
        self.models_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.models_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.models_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.models_table.verticalHeader().setVisible(False)
        self.models_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.models_table.setMaximumHeight(140)
        self.models_table.itemSelectionChanged.connect(self._on_model_clicked)
        layout.addWidget(self.models_table)
        row = QHBoxLayout()
        self.model_label = QLabel("Infer uses: -")
        self.model_label.setWordWrap(True)
        self.best_button = QPushButton("Use best")
        self.best_button.setToolTip("Infer with the run that has the best validation Dice (forget your pick)")
        self.best_button.clicked.connect(lambda: self.use_best(self.method))
        row.addWidget(self.model_label, stretch=1)
        row.addWidget(self.best_button)
        layout.addLayout(row)

    def set_project(self, project: Project | None) -> None:
        self.project = project
        self.refresh()

    def set_method(self, method: str) -> None:
        self.method = method
        self.show_choice()

    def refresh(self) -> None:
        """Re-read the runs of the project (a job's checkpoint, an accept, a finished training)."""
        project = self.project
        self.models = [] if project is None else run_table(project)
        self.best = {} if project is None else best_runs(project, self.models)
        usable = {(r["method"], r["run"]) for r in self.models if r.get("has_checkpoint")}
        self.picked = {m: r for m, r in self.picked.items() if (m, r) in usable}  # a deleted run is no pick
        labeled = 0 if project is None else len(project.labeled_cases())
        self._syncing = True
        self.models_table.setRowCount(len(self.models))
        for i, run in enumerate(reversed(self.models)):
            dice = run.get("best_dice")
            count = run.get("labeled_count")
            count_text = "-" if count is None else f"{count} (now {labeled})" if count != labeled else str(count)
            cells = [run["method"], run["run"], count_text, "-" if dice is None else f"{float(dice):.3f}",
                     self._use_text(run["method"], run["run"])]
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j == 2 and count is not None and count != labeled:
                    item.setToolTip("The labeled set has changed since this model was trained: retrain to use it")
                self.models_table.setItem(i, j, item)
        self._syncing = False
        self.show_choice()

    def _use_text(self, method: str, run: str) -> str:
        """The models table's "Infer uses" cell: "picked" (by the user), "best" (by validation) or empty."""
        if self.picked.get(method) == run:
            return "picked"
        return "best" if method not in self.picked and self.best.get(method) == run else ""

    def inference_run(self, method: str) -> tuple[str | None, str]:
        """``(run, why)``: the run *Infer* uses for ``method`` (None: no trained run) and ``"your pick"`` or
        ``"best by validation"``."""
        if method in self.picked:
            return self.picked[method], PICKED
        return self.best.get(method), BEST

    def show_choice(self) -> None:
        """Select the row of the run Infer will use for the chosen method and say which and why."""
        method = self.method
        run, why = self.inference_run(method)
        table = self.models_table
        self._syncing = True
        table.clearSelection()
        for i in range(table.rowCount()):
            m, r = table.item(i, 0), table.item(i, 1)
            if m is not None and r is not None and m.text() == method and r.text() == run:
                table.selectRow(i)
            use = table.item(i, 4)
            if use is not None and m is not None and r is not None:
                use.setText(self._use_text(m.text(), r.text()))
        self._syncing = False
        if not method:
            self.model_label.setText("Infer uses: -")
        elif run is None:
            self.model_label.setText(f"Infer uses: no trained run of {method} yet")
        else:
            info = next((x for x in self.models if x["method"] == method and x["run"] == run), {})
            dice = info.get("best_dice")
            self.model_label.setText(f"Infer uses: {method} run {run}, {why}"
                                     + ("" if dice is None else f" (validation Dice {float(dice):.3f})"))
        self.best_button.setEnabled(method in self.picked)

    def _on_model_clicked(self) -> None:
        if self._syncing:
            return
        model = self.selected_model()
        if model is not None:
            self.pick_run(*model)

    def pick_run(self, method: str, run: str) -> None:
        """Infer ``method`` with ``run`` from now on (instead of the best by validation); selects the method."""
        if run == self.best.get(method):
            self.picked.pop(method, None)  # picking the best is no pick: it follows later, better runs
        else:
            self.picked[method] = run
        if method != self.method:
            self.method_picked.emit(method)  # the dock selects it in the form (when the form lists it)
        self.show_choice()

    def use_best(self, method: str) -> None:
        """Forget the pick for ``method``: Infer uses its best run by validation again."""
        self.picked.pop(method, None)
        self.show_choice()

    def selected_model(self) -> tuple[str, str] | None:
        rows = self.models_table.selectionModel().selectedRows()
        if not rows:
            return None
        i = rows[0].row()
        return self.models_table.item(i, 0).text(), self.models_table.item(i, 1).text()
