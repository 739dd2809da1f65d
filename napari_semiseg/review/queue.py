"""The review queue panel: which runs are shown (*Run*), which score sorts (*Sort by*, the keys of
:data:`backend.review.queue.SORT_SCORES`, the first by default), which cases (*Show*), the case table in review order
(unlabeled first, the most doubtful on top) and *Next case* / *Skip* / *Flag*."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from backend.project import Project
from backend.project.runs import methods_with_pseudo_labels, pseudo_runs
from backend.review.corrections import flag_case, flags, unflag_case
from backend.review.queue import SORT_SCORES, review_rows
from napari_semiseg._state import start_worker

if TYPE_CHECKING:
    from napari_semiseg.review import ReviewDock

FILTERS = ("all cases", "unlabeled", "labeled", "flagged")
MEAN = "mean"  # the agreement between one method's views: shown with its worst class, "mean (worst)"


class QueuePanel(QWidget):
    """The run, sort and filter boxes, the case table and the buttons that move through it."""

    def __init__(self, dock: "ReviewDock"):
        super().__init__(dock)
        self.dock = dock
        self.rows: list[dict[str, Any]] = []
        self._available: dict[str, list[str]] | None = None
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)  # the table takes the height
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        grid = QGridLayout()
        self.run_combo = QComboBox()
        self.run_combo.currentIndexChanged.connect(lambda _i: dock.refresh())
        self.sort_combo = QComboBox()
        for key, name in SORT_SCORES.items():
            self.sort_combo.addItem(name, key)
        self.sort_combo.setToolTip("The score that orders the table, lowest (most doubtful) first")
        self.sort_combo.currentIndexChanged.connect(lambda _i: dock.refresh())
        self.filter_combo = QComboBox()
        self.filter_combo.addItems(FILTERS)
        self.filter_combo.currentIndexChanged.connect(lambda _i: self.fill_table())
        for row, (label, widget) in enumerate((("Run", self.run_combo), ("Sort by", self.sort_combo),
                                               ("Show", self.filter_combo))):
            grid.addWidget(QLabel(label), row, 0)
            grid.addWidget(widget, row, 1)
        layout.addLayout(grid)

        self.table = QTableWidget(0, 3)
        self.table.setToolTip("Unlabeled cases first, then the lowest score of any method (the 'Sort by' box) first")
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.cellDoubleClicked.connect(lambda row, _col: self._select_row(row))
        self.table.itemSelectionChanged.connect(self._on_table_selection)
        layout.addWidget(self.table, stretch=1)

        nav = QHBoxLayout()
        self.next_button = QPushButton("Next case  [Shift+N]")
        self.next_button.clicked.connect(self.next_case)
        self.skip_button = QPushButton("Skip")
        self.skip_button.clicked.connect(self.skip)
        self.flag_button = QPushButton("Flag")
        self.flag_button.setToolTip("Put this case aside for a second look (semiseg/flags.json); again to unflag")
        self.flag_button.clicked.connect(self.toggle_flag)
        for button in (self.next_button, self.skip_button, self.flag_button):
            nav.addWidget(button)
        layout.addLayout(nav)

    def update_buttons(self, has_project: bool, has_case: bool, busy: bool) -> None:
        self.next_button.setEnabled(has_project and not busy)
        self.skip_button.setEnabled(has_case)
        self.flag_button.setEnabled(has_case)

    # ---- what is shown ---------------------------------------------------------------------------------------
    def selected_runs(self) -> dict[str, str] | None:
        """``{method: run}`` chosen in the run box (None: each method's best run, ``default_runs``)."""
        data = self.run_combo.currentData()
        if not data:
            return None
        method, run = data.split("/", 1)
        return {method: run}

    def sort_score(self) -> str:
        """The key of :data:`SORT_SCORES` chosen in the *Sort by* box."""
        return self.sort_combo.currentData() or next(iter(SORT_SCORES))

    def clear(self) -> None:
        self._available = None
        self.rows = []
        self.fill_table()

    def refresh(self, project: Project | None) -> None:
        """Re-read the case table (off the main thread) and redraw it."""
        if project is None:
            self.rows = []
            self.fill_table()
            return
        start_worker(self.dock, _table_data, project, self.selected_runs(), self.sort_score(), on_done=self._on_rows)

    def rebuild_runs(self, available: dict[str, list[str]]) -> None:
        """Fill the run box (and the export sources) from ``available`` (``{method: runs}``), keeping the choice."""
        current = self.run_combo.currentData()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        self.run_combo.addItem("each method's best run (by validation)", "")
        for method, runs in available.items():
            for run in reversed(runs):
                self.run_combo.addItem(f"{method} / {run}", f"{method}/{run}")
        self.run_combo.setCurrentIndex(max(0, self.run_combo.findData(current)))
        self.run_combo.blockSignals(False)
        self.dock.editor.set_export_sources(list(available))
        self._available = available

    def _on_rows(self, data: tuple[Project, list[dict[str, Any]], dict[str, list[str]], str]) -> None:
        project, rows, available, score = data
        if project is not self.dock.project or score != self.sort_score():
            return  # another project was opened, or another score chosen, meanwhile
        if available != self._available:
            self.rebuild_runs(available)
        self.rows = rows
        labeled = sum(1 for r in rows if r["labeled"])
        self.dock.project_label.setText(f"{project.name}: {len(rows)} cases, {labeled} labeled, "
                                        f"{len(rows) - labeled} to review\n{project.root}")
        self.fill_table()
        self.dock._update_buttons()
        self.dock.table_refreshed.emit()

    def visible_rows(self) -> list[dict[str, Any]]:
        """The rows shown under the current filter, in review order."""
        which = self.filter_combo.currentText()
        if which == "unlabeled":
            return [r for r in self.rows if not r["labeled"]]
        if which == "labeled":
            return [r for r in self.rows if r["labeled"]]
        if which == "flagged":
            return [r for r in self.rows if r.get("flagged")]
        return list(self.rows)

    def methods_in_table(self) -> list[str]:
        return sorted({m for r in self.rows for m in r["scores"]})

    def fill_table(self) -> None:
        rows = self.visible_rows()
        score = self.sort_score()
        # one column per method with the sorting score; a method without it (the supervised baseline has no
        # agreement between views) gets no column of dashes
        methods = [m for m in self.methods_in_table()
                   if any(r["scores"].get(m, {}).get(score) is not None for r in self.rows)]
        title = "agreement Dice\nmean (worst)" if score == MEAN else score
        headers = ["case", "status"] + [f"{m}\n{title} \u25b2" for m in methods]
        self.table.blockSignals(True)
        self.table.clearContents()
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.horizontalHeaderItem(0).setToolTip(f"Sorted by {SORT_SCORES[score]}, lowest first "
                                                      f"(unlabeled cases first)")
        for j, m in enumerate(methods, start=2):
            self.table.horizontalHeaderItem(j).setToolTip(
                f"{m}: {SORT_SCORES[score]} (sorts the table, lowest first)"
                + (": the mean over classes, and in brackets the class the views agree on least" if score == MEAN
                   else "") + ". Low = a doubtful case")
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            notes = [n for n, on in (("flagged", row.get("flagged")), ("draft", row.get("draft"))) if on]
            cells = [row["case"], ", ".join(["labeled" if row["labeled"] else "to review", *notes])]
            for m in methods:
                s = row["scores"].get(m, {})
                cells.append(_fmt(s.get(score)) if score != MEAN or s.get("worst_class") is None
                             else f"{_fmt(s.get(MEAN))} ({_fmt(s.get('worst_class'))})")
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, row["case"])
                self.table.setItem(i, j, item)
            if row["case"] == self.dock.case:
                self.table.selectRow(i)
        self.table.blockSignals(False)

    def _on_table_selection(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self._select_row(rows[0].row())

    def _select_row(self, index: int) -> None:
        item = self.table.item(index, 0)
        if item is not None and item.text() != self.dock.case:
            self.dock.select_case(item.text())

    def table_cases(self) -> list[str]:
        """Case names in the order the table shows them."""
        return [self.table.item(i, 0).text() for i in range(self.table.rowCount())]

    # ---- moving between cases ---------------------------------------------------------------------------------
    def next_case(self) -> str | None:
        """Go to the case after the current one in the table (the first when none is open)."""
        cases = self.table_cases()
        if not cases:
            return None
        if self.dock.case in cases:
            i = cases.index(self.dock.case) + 1
            if i >= len(cases):
                self.dock._say("That was the last case in the table.")
                return None
        else:
            i = 0
        return cases[i] if self.dock.select_case(cases[i]) else None

    def skip(self) -> str | None:
        """Leave this case as it is (a correction is kept as a draft after asking) and go to the next one."""
        return self.next_case()

    def toggle_flag(self) -> None:
        project, case = self.dock.project, self.dock.case
        if project is None or case is None:
            return
        if case in flags(project):
            unflag_case(project, case)
            self.dock._say(f"{case}: flag removed")
        else:
            flag_case(project, case)
            self.dock._say(f"{case}: flagged for a second look")
        self.dock.refresh()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table_data(project: Project, runs: dict[str, str] | None, score: str
                ) -> tuple[Project, list[dict[str, Any]], dict[str, list[str]], str]:
    """Worker: the review rows in ``score`` order and the runs that have pseudo labels."""
    available = {m: pseudo_runs(project, m) for m in methods_with_pseudo_labels(project)}
    if runs is not None and any(available.get(m) is None or r not in available[m] for m, r in runs.items()):
        runs = None  # the chosen run is gone
    return project, review_rows(project, runs, score), available, score
