"""The training dock: train a method and regenerate pseudo labels in a background job, watch it live.

Training and inference run in a child process through :mod:`backend.jobs` (never in napari's process, which
never even imports torch: the method and device lists come from a short child process too).  A ``QTimer`` reads
the job's event stream incrementally every 250 ms; each read costs one small file read.

*Infer* uses, per method, the run with the best validation Dice (:func:`backend.project.runs.best_runs`, the rule of
``backend.project.runs.best_run``) unless the user picked a run in the models table; the dock says which and why.
Validation Dice (on held-out labeled cases) and DiffRect's calibration Dice (``tau_l``, ``tau_u`` of its eq. 6,
reported by each training step) are shown apart.  Closing napari while a job runs asks first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, QObject, QProcess, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from backend.project.runs import best_runs, run_table
from backend.text import format_duration
from backend.errors import InputError, JobBusyError
from backend.project import Project
from napari_semiseg import _state
from napari_semiseg._plot import CurvePlot
from napari_semiseg._state import ProjectState, alive

POLL_MS = 250
STATUS_EVERY = 8  # polls between job_status checks (a job killed without a final event shows up as "dead")
FINAL = ("done", "cancelled", "error", "dead")
SEMI_SUPERVISED_FIRST = ("diffrect", "genericssl", "diffcl")  # the default method: a semi-supervised one
LOSS_SERIES = 4  # loss curves drawn (the total first, as each method reports it); the rest are in metrics.jsonl
CALIBRATION = ("tau_l", "tau_u")  # DiffRect's calibration-guidance Dice (eq. 6), reported with the losses
KEEP_RUNNING, CANCEL_JOB, STAY = "Close, keep the job running", "Cancel the job and close", "Don't close"
BEST, PICKED = "best by validation", "your pick"


class TrainingDock(QWidget):
    """Start, watch, cancel and resume training and inference jobs of the open project."""

    choices_loaded = Signal(dict)
    job_started = Signal(str)
    event_received = Signal(dict)
    job_finished = Signal(str, str)  # job id, final state

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = ProjectState.for_viewer(napari_viewer)
        self.job_id: str | None = None
        self.job_kind: str | None = None
        self._offset = 0
        self._polls = 0
        self._last_step = 0
        self.choices: dict[str, Any] = {}
        self.models: list[dict[str, Any]] = []
        self.best: dict[str, str] = {}    # {method: run} with the best validation Dice
        self.picked: dict[str, str] = {}  # {method: run} the user chose to infer with (else the best by validation)
        self._syncing = False
        #: config overrides sent with training jobs (no widget: for scripts and tests, e.g. {"val_every": 10})
        self.overrides: dict[str, Any] | None = None
        self._build_ui()
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)
        self.state.project_changed.connect(self._on_project_changed)
        self.state.labels_changed.connect(self._on_labels_changed)
        self.state.models_changed.connect(self._refresh_models)
        self._close_guard = _JobCloseGuard(self)
        window = getattr(getattr(napari_viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._close_guard)
        self._load_choices()
        self._on_project_changed(self.state.project)

    # ---- UI ------------------------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        self.project_label = QLabel("No project open")
        self.project_label.setWordWrap(True)
        self.open_button = QPushButton("Open project...")
        self.open_button.clicked.connect(self._choose_project)
        top.addWidget(self.project_label, stretch=1)
        top.addWidget(self.open_button)
        layout.addLayout(top)

        grid = QGridLayout()
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
        layout.addLayout(grid)

        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Train the method on the labeled and unlabeled cases (a background job)")
        self.train_button.clicked.connect(self.start_training)
        self.infer_button = QPushButton("Infer")
        self.infer_button.setToolTip("Regenerate pseudo labels and agreement scores of every unlabeled case "
                                     "with the run named below (the best by validation unless you click another)")
        self.infer_button.clicked.connect(self.start_inference)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last cancelled, failed or killed training from its checkpoint")
        self.resume_button.clicked.connect(self.resume)
        for button in (self.train_button, self.infer_button, self.cancel_button, self.resume_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        layout.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.dice_label = QLabel("Validation Dice: -")
        self.dice_label.setWordWrap(True)
        self.dice_label.setToolTip("Dice of the model against labeled cases held out of training (or, with fewer "
                                   "than five labeled cases, the training cases), at each validation")
        layout.addWidget(self.dice_label)
        self.calibration_label = QLabel("Calibration Dice: -")
        self.calibration_label.setWordWrap(True)
        self.calibration_label.setToolTip(
            "DiffRect's calibration guidance (eq. 6): tau_l = Dice(weak prediction, label) on labeled slices, "
            "tau_u = Dice(strong, weak prediction) on unlabeled slices, batch means of the last step")
        layout.addWidget(self.calibration_label)
        self.loss_plot = CurvePlot("training losses (log)", log_y=True, max_series=LOSS_SERIES)
        self.dice_plot = CurvePlot("validation Dice", y_range=(0.0, 1.0))
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.dice_plot)

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
        model_row = QHBoxLayout()
        self.model_label = QLabel("Infer uses: -")
        self.model_label.setWordWrap(True)
        self.best_button = QPushButton("Use best")
        self.best_button.setToolTip("Infer with the run that has the best validation Dice (forget your pick)")
        self.best_button.clicked.connect(lambda: self.use_best(self.method_combo.currentText()))
        model_row.addWidget(self.model_label, stretch=1)
        model_row.addWidget(self.best_button)
        layout.addLayout(model_row)
        layout.addStretch(1)
        self._update_buttons()

    def _update_buttons(self) -> None:
        project = self.state.project
        running = self.is_running()
        ready = project is not None and self.method_combo.count() > 0
        self.train_button.setEnabled(ready and not running)
        self.infer_button.setEnabled(ready and not running)
        self.cancel_button.setEnabled(running)
        self.resume_button.setEnabled(project is not None and not running and self._resumable() is not None)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ---- method and device choices (from a child process: no torch here) ------------------------------------------
    def _load_choices(self) -> None:
        self._choices_process = QProcess(self)
        self._choices_process.setWorkingDirectory(str(Path(__file__).resolve().parents[1]))
        self._choices_process.finished.connect(self._on_choices)
        self._say("Looking up methods and devices...")
        self._choices_process.start(sys.executable, ["-m", "backend.jobs.choices"])

    def _on_choices(self, *_args: Any) -> None:
        process = self._choices_process
        out = bytes(process.readAllStandardOutput()).decode(errors="replace").strip().splitlines()
        try:
            choices = json.loads(out[-1])
        except (IndexError, ValueError):
            err = bytes(process.readAllStandardError()).decode(errors="replace").strip().splitlines()
            from backend.methods import method_names

            choices = {"methods": {m: [] for m in method_names()}, "devices": ["cpu"]}
            self._say("Could not list the presets and devices: " + (err[-1] if err else "no output"))
        else:
            self._say("")
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
        self._update_buttons()
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
        self._show_model_choice()

    # ---- project --------------------------------------------------------------------------------------------------
    def _choose_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a project folder (with dataset.json)")
        if folder:
            try:
                self.state.set_project(Project.open(folder))
            except InputError as exc:
                from napari.utils.notifications import show_error

                show_error(str(exc))

    def _on_project_changed(self, project: Project | None) -> None:
        self._timer.stop()
        self.job_id = None
        self._offset = 0
        self.project_label.setText("No project open" if project is None else f"{project.name}\n{project.root}")
        self._refresh_models()
        if project is not None:
            self._attach_running_job(project)
        self._update_buttons()

    def _attach_running_job(self, project: Project) -> None:
        """Follow a job that is already running on the project (started earlier or from the CLI)."""
        from backend.jobs import list_jobs

        for job in list_jobs(project.root):
            if job["state"] in ("queued", "running"):
                self.follow(job["id"], job.get("kind"))
                return

    def _on_labels_changed(self, _case: str) -> None:
        self._refresh_models()

    def _refresh_models(self) -> None:
        project = self.state.project
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
        self._show_model_choice()

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

    def _show_model_choice(self) -> None:
        """Select the row of the run Infer will use for the chosen method and say which and why."""
        method = self.method_combo.currentText()
        run, why = self.inference_run(method)
        self._syncing = True
        self.models_table.clearSelection()
        for i in range(self.models_table.rowCount()):
            m, r = self.models_table.item(i, 0), self.models_table.item(i, 1)
            if m is not None and r is not None and m.text() == method and r.text() == run:
                self.models_table.selectRow(i)
            use = self.models_table.item(i, 4)
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
        if model is None:
            return
        self.pick_run(*model)

    def pick_run(self, method: str, run: str) -> None:
        """Infer ``method`` with ``run`` from now on (instead of the best by validation); selects the method."""
        if run == self.best.get(method):
            self.picked.pop(method, None)  # picking the best is no pick: it follows later, better runs
        else:
            self.picked[method] = run
        if self.method_combo.currentText() != method and self.method_combo.findText(method) >= 0:
            self.method_combo.setCurrentText(method)  # shows the choice through _on_method_changed
        else:
            self._show_model_choice()

    def use_best(self, method: str) -> None:
        """Forget the pick for ``method``: Infer uses its best run by validation again."""
        self.picked.pop(method, None)
        self._show_model_choice()

    def selected_model(self) -> tuple[str, str] | None:
        rows = self.models_table.selectionModel().selectedRows()
        if not rows:
            return None
        i = rows[0].row()
        return self.models_table.item(i, 0).text(), self.models_table.item(i, 1).text()

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def spec(self, kind: str = "train") -> dict[str, Any]:
        """The job spec from the dock's choices."""
        spec: dict[str, Any] = {"kind": kind, "method": self.method_combo.currentText(),
                                "device": self.device_combo.currentText() or "auto"}
        if kind == "train":
            spec["preset"] = self.preset_combo.currentText() or None
            spec["steps"] = self.steps_spin.value() or None
            if self.overrides:
                spec["overrides"] = dict(self.overrides)
        else:
            run, _why = self.inference_run(spec["method"])
            if run is not None:
                spec["run"] = run
        return spec

    def start_training(self) -> str | None:
        return self._start(self.spec("train"))

    def start_inference(self) -> str | None:
        """Infer the chosen method with the run the dock shows (the user's pick, else the best by validation)."""
        return self._start(self.spec("infer"))

    def _start(self, spec: dict[str, Any]) -> str | None:
        from backend.jobs import start_job
        from napari.utils.notifications import show_error

        project = self.state.project
        if project is None or not spec.get("method"):
            return None
        try:
            job_id = start_job(project.root, spec)
        except (JobBusyError, InputError, ValueError) as exc:
            show_error(str(exc))
            return None
        self.follow(job_id, spec["kind"])
        return job_id

    def follow(self, job_id: str, kind: str | None = None) -> None:
        """Show job ``job_id`` in the dock (from its first event) and poll it until it ends."""
        self.job_id, self.job_kind = job_id, kind
        self._offset = 0
        self._polls = 0
        self._last_step = 0
        self.loss_plot.clear()
        self.dice_plot.clear()
        self.dice_label.setText("Validation Dice: -")
        self.calibration_label.setText("Calibration Dice: -")
        self.progress.setRange(0, 0)  # busy until the first progress event
        self.progress.setFormat(f"{kind or 'job'} starting...")
        self._say(f"Job {job_id} started")
        self._timer.start()
        self._update_buttons()
        self.job_started.emit(job_id)

    def is_running(self) -> bool:
        return self.job_id is not None and self._timer.isActive()

    def poll(self) -> None:
        """Read the new events of the followed job (one small file read) and show them."""
        from backend.jobs import job_status, read_events

        project = self.state.project
        if project is None or self.job_id is None:
            self._timer.stop()
            return
        try:
            events, self._offset = read_events(project.root, self.job_id, self._offset)
        except (InputError, OSError) as exc:
            self._say(f"Cannot read job {self.job_id}: {exc}")
            events = []
        for event in events:
            self._show_event(event)
            if not self._timer.isActive():
                return
        self._polls += 1
        if self._polls % STATUS_EVERY == 0:
            status = job_status(project.root, self.job_id)
            if status["state"] == "dead":
                self._finish("dead", status.get("error") or {})

    def _show_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self.event_received.emit(event)
        if kind == "start":
            total = event.get("total")
            if total:
                self.progress.setRange(0, int(total))
            self._say(f"{self.job_kind or 'job'} {event.get('method', '')} run {event.get('run', '')} on "
                      f"{event.get('device', '?')}")
            self._refresh_models()
        elif kind == "progress":
            step, total = int(event.get("step", 0)), int(event.get("total") or 0)
            self._last_step = step
            if total:
                self.progress.setRange(0, total)
                self.progress.setValue(min(step, total))
            eta = event.get("eta_s")
            eta_text = "" if eta is None else f"  ETA {format_duration(float(eta))}"
            self.progress.setFormat(f"{self.job_kind or 'job'} step {step}/{total or '?'}{eta_text}")
            losses = event.get("losses") or {}
            for name, value in losses.items():
                if not name.startswith("loss"):
                    continue  # weights, thresholds, Dice terms: not losses
                try:
                    self.loss_plot.add_point(name, step, float(value))
                except (TypeError, ValueError):
                    continue
            if all(isinstance(losses.get(k), (int, float)) for k in CALIBRATION):
                self.calibration_label.setText(
                    f"Calibration Dice (eq. 6) at step {step}: tau_l {float(losses['tau_l']):.3f} (weak vs label), "
                    f"tau_u {float(losses['tau_u']):.3f} (strong vs weak)")
        elif kind == "validation":
            mean = event.get("mean")
            step = event.get("step", self._last_step)
            if mean is not None:
                self.dice_plot.add_point("mean", step, float(mean))
                per_class = event.get("dice")
                detail = ""
                if isinstance(per_class, dict):
                    detail = "  (" + ", ".join(f"{k} {float(v):.3f}" for k, v in per_class.items()) + ")"
                    for name, value in per_class.items():
                        self.dice_plot.add_point(str(name), step, float(value))
                where = " on the training cases" if event.get("val_on_train") else ""
                best = " (best so far)" if event.get("best") else ""
                self.dice_label.setText(f"Validation Dice: {float(mean):.3f}{detail} at step {step}{where}{best}")
        elif kind == "checkpoint":
            self._say(f"checkpoint saved at step {event.get('step', self._last_step)}")
            self._refresh_models()
        elif kind in ("done", "cancelled", "error"):
            self._finish(kind, event)

    def _finish(self, state: str, event: dict[str, Any]) -> None:
        from napari.utils.notifications import show_error, show_info

        self._timer.stop()
        job_id, kind = self.job_id, self.job_kind
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if state == "done" else 0)
        self.progress.setFormat(f"{kind or 'job'} {state}")
        if state in ("error", "dead"):
            message = event.get("message") or "the job failed"
            show_error(f"{kind or 'Job'} {job_id} failed ({event.get('kind', state)}): {message}")
            self._say(f"{kind} failed: {message}")
        elif state == "cancelled":
            self._say(f"{kind} cancelled at step {self._last_step}" + (" (resume continues it)" if kind == "train"
                                                                       else ""))
        else:
            show_info(f"{kind} finished: run {event.get('run', '')}")
            self._say(f"{kind} done: run {event.get('run', '')}")
        self._refresh_models()
        self._update_buttons()
        if state == "done" and kind == "infer":
            self.state.pseudo_changed.emit()
        if state == "done" and kind == "train":
            self.state.models_changed.emit()
        self.job_finished.emit(job_id or "", state)

    def cancel(self) -> None:
        """Ask the running job to stop (training checkpoints first); the dock shows it when it has stopped."""
        from backend.jobs import cancel_job

        project = self.state.project
        if project is None or self.job_id is None:
            return
        cancel_job(project.root, self.job_id)
        self.progress.setFormat(f"{self.job_kind or 'job'} cancelling...")
        self._say(f"Cancelling {self.job_id} (training saves a checkpoint, then stops)")

    def confirm_close(self) -> bool:
        """Asked when the viewer closes while a job runs: True lets it close (after cancelling, if chosen)."""
        kind = self.job_kind or "job"
        answer = _state.ask(self, f"A {kind} job is running",
                            f"The {kind} job {self.job_id} is still running. It runs in its own process: it can "
                            f"go on after napari closes (open the project again to follow it), or be cancelled "
                            f"now{' (it saves a checkpoint; Resume continues it)' if kind == 'train' else ''}.",
                            [KEEP_RUNNING, CANCEL_JOB, STAY], default=STAY)
        if answer == CANCEL_JOB:
            self.cancel()
            return True
        return answer == KEEP_RUNNING

    def _resumable(self) -> str | None:
        """The job Resume would continue: the followed one, else the newest training job that did not finish."""
        from backend.jobs import list_jobs

        project = self.state.project
        if project is None:
            return None
        try:
            jobs = list_jobs(project.root)
        except (InputError, OSError):
            return None
        for job in jobs:
            if job["kind"] == "train":
                return job["id"] if job["state"] in ("cancelled", "error", "dead") and job.get("run") else None
        return None

    def resume(self) -> str | None:
        """Continue the last stopped training run from its checkpoint in a new job."""
        from backend.jobs import resume_job
        from napari.utils.notifications import show_error

        project = self.state.project
        job = self._resumable()
        if project is None or job is None:
            return None
        try:
            new_id = resume_job(project.root, job)
        except (JobBusyError, InputError) as exc:
            show_error(str(exc))
            return None
        self.follow(new_id, "train")
        return new_id


class _JobCloseGuard(QObject):
    """Event filter on the viewer's main window: closing it while a job runs asks whether to leave the job
    running (it is a separate process; reopening the project follows it again), cancel it, or stay."""

    def __init__(self, dock: TrainingDock):
        super().__init__(dock)
        self.dock = dock

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() != QEvent.Type.Close:
            return False
        try:
            if not alive(self.dock) or not self.dock.is_running() or not obj.isVisible():
                return False  # nothing runs, or a hidden window (scripts, tests): nobody to ask
            answer = self.dock.confirm_close()
        except RuntimeError:  # the dock's C++ side is gone
            return False
        if answer:
            return False
        event.ignore()
        return True


