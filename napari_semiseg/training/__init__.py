"""The training dock: train a method and regenerate pseudo labels in a background job, watch it live.

Training and inference run in a child process through :mod:`backend.jobs` (never in napari's process, which
never even imports torch: the method and device lists come from a short child process too).  The dock is three
panels: :class:`~napari_semiseg.training.form.TrainingForm` (``form.py``: method, preset, device, steps),
:class:`~napari_semiseg.training.monitor.JobMonitor` (``monitor.py``: progress, curves, Dice, cancel, resume) and
:class:`~napari_semiseg.training.models.ModelList` (``models.py``: the runs, and which one *Infer* uses: the best by
validation, :func:`backend.project.runs.best_runs`, unless the user picked one; the dock says which and why).
Closing napari while a job runs asks first.
"""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from backend.errors import InputError, JobBusyError
from backend.project import Project
from napari_semiseg import _state
from napari_semiseg._dock import DockBase, show_error
from napari_semiseg.training.form import SEMI_SUPERVISED_FIRST, TrainingForm
from napari_semiseg.training.models import BEST, PICKED, ModelList
from napari_semiseg.training.monitor import CALIBRATION, FINAL, LOSS_SERIES, JobMonitor

__all__ = ["TrainingDock", "KEEP_RUNNING", "CANCEL_JOB", "STAY", "BEST", "PICKED", "LOSS_SERIES", "CALIBRATION",
           "FINAL", "SEMI_SUPERVISED_FIRST"]

KEEP_RUNNING, CANCEL_JOB, STAY = "Close, keep the job running", "Cancel the job and close", "Don't close"


class TrainingDock(DockBase):
    """Start, watch, cancel and resume training and inference jobs of the open project."""

    choices_loaded = Signal(dict)
    job_started = Signal(str)
    event_received = Signal(dict)
    job_finished = Signal(str, str)  # job id, final state

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        #: config overrides sent with training jobs (no widget: for scripts and tests, e.g. {"val_every": 10})
        self.overrides: dict[str, Any] | None = None
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        self.project_label = QLabel("No project open")
        self.project_label.setWordWrap(True)
        self.open_button = QPushButton("Open project...")
        self.open_button.clicked.connect(self._choose_project)
        top.addWidget(self.project_label, stretch=1)
        top.addWidget(self.open_button)
        layout.addLayout(top)
        self.form = TrainingForm(self)
        layout.addWidget(self.form)
        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Train the method on the labeled and unlabeled cases (a background job)")
        self.train_button.clicked.connect(self.start_training)
        self.infer_button = QPushButton("Infer")
        self.infer_button.setToolTip("Regenerate pseudo labels and agreement scores of every unlabeled case "
                                     "with the run named below (the best by validation unless you click another)")
        self.infer_button.clicked.connect(self.start_inference)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: self.cancel())
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last cancelled, failed or killed training from its checkpoint")
        self.resume_button.clicked.connect(self.resume)
        for button in (self.train_button, self.infer_button, self.cancel_button, self.resume_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.monitor = JobMonitor(self)
        layout.addWidget(self.monitor)
        self.model_list = ModelList(self)
        layout.addWidget(self.model_list)
        layout.addStretch(1)
        # the widgets scripts and tests drive, under the names they have always had
        form, monitor = self.form, self.monitor
        self.method_combo, self.preset_combo = form.method_combo, form.preset_combo
        self.device_combo, self.steps_spin = form.device_combo, form.steps_spin
        self.progress, self.dice_label, self.calibration_label = (monitor.progress, monitor.dice_label,
                                                                  monitor.calibration_label)
        self.loss_plot, self.dice_plot, self._timer = monitor.loss_plot, monitor.dice_plot, monitor.timer
        self.models_table, self.model_label = self.model_list.models_table, self.model_list.model_label
        self.best_button = self.model_list.best_button
        form.message.connect(self._say)
        form.method_changed.connect(self.model_list.set_method)
        form.choices_loaded.connect(self._on_choices)
        self.model_list.method_picked.connect(self._select_method)
        self._update_buttons()
        self.state.project_changed.connect(self._on_project_changed)
        self.state.labels_changed.connect(lambda _case: self.refresh_models())
        self.state.models_changed.connect(self.refresh_models)
        self._choices_from: str | None = None  # the server whose choices the form shows (None: this machine's)
        form.load_choices()
        self._on_project_changed(self.state.project)

    # ---- the panels' state, under its old names ----------------------------------------------------------------
    @property
    def choices(self) -> dict[str, Any]:
        return self.form.choices

    @property
    def _choices_process(self):
        return self.form.process

    @property
    def job_id(self) -> str | None:
        return self.monitor.job_id

    @job_id.setter
    def job_id(self, value: str | None) -> None:
        self.monitor.job_id = value

    @property
    def job_kind(self) -> str | None:
        return self.monitor.job_kind

    @job_kind.setter
    def job_kind(self, value: str | None) -> None:
        self.monitor.job_kind = value

    def _update_buttons(self) -> None:
        project = self.state.project
        running = self.is_running()
        ready = project is not None and self.method_combo.count() > 0
        self.train_button.setEnabled(ready and not running)
        self.infer_button.setEnabled(ready and not running)
        self.cancel_button.setEnabled(running)
        self.resume_button.setEnabled(project is not None and not running and self.monitor.resumable() is not None)

    def set_choices(self, choices: dict[str, Any]) -> None:
        """Fill the form from ``{"methods": {name: [presets]}, "devices": [...]}``."""
        self.form.set_choices(choices)

    def _on_choices(self, choices: dict[str, Any]) -> None:
        self._update_buttons()
        self.choices_loaded.emit(choices)

    def _select_method(self, method: str) -> None:
        if self.method_combo.findText(method) >= 0:
            self.method_combo.setCurrentText(method)

    # ---- project --------------------------------------------------------------------------------------------------
    def _choose_project(self) -> None:
        folder = self.choose_folder()
        if folder:
            try:
                self.state.set_project(Project.open(folder))
            except InputError as exc:
                show_error(str(exc))

    def _on_project_changed(self, project: Project | None) -> None:
        self.monitor.stop()
        where = getattr(project, "server", None) or getattr(project, "root", "")
        self.project_label.setText("No project open" if project is None else f"{project.name}\n{where}")
        self.model_list.set_project(project)
        self._load_choices_for(project)
        if project is not None:
            self._attach_running_job(project)
        self.monitor.refresh_jobs()
        self._update_buttons()

    def _load_choices_for(self, project: Project | None) -> None:
        """The methods, presets and devices of the machine the jobs run on: the server's (asked in a worker) for a
        server's project, this machine's (the form's child process) again when going back to a folder."""
        server = getattr(project, "server", None) if self.state.is_remote() else None
        if server == self._choices_from:
            return
        self._choices_from = server
        if server is None:
            self.form.load_choices()
            return
        self.form.local = False
        self._say(f"Looking up the methods and devices of {server}...")

        def loaded(choices: dict[str, Any]) -> None:
            if self._choices_from == server:
                self._say("")
                self.set_choices(choices)

        _state.start_worker(self, self.state.jobs().training_choices, on_done=loaded)

    def refresh_models(self) -> None:
        """Re-read the runs (a server's project: after fetching its run table in a worker)."""
        self.state.after_sync(self, self.model_list.refresh)

    def _attach_running_job(self, project: Project) -> None:
        """Follow a job that is already running on the project (started earlier, from the CLI or another client;
        a server's job list is read in a worker)."""
        def attach(jobs: list[dict[str, Any]]) -> None:
            if project is not self.state.project or self.is_running():
                return
            for job in jobs:
                if job["state"] in ("queued", "running"):
                    self.follow(job["id"], job.get("kind"))
                    return

        if self.state.is_remote():
            _state.start_worker(self, self.state.jobs().list_jobs, on_done=attach)
        else:
            attach(self.state.jobs().list_jobs())

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def inference_run(self, method: str) -> tuple[str | None, str]:
        return self.model_list.inference_run(method)

    def selected_model(self) -> tuple[str, str] | None:
        return self.model_list.selected_model()

    def spec(self, kind: str = "train") -> dict[str, Any]:
        """The job spec from the dock's choices."""
        values = self.form.values()
        spec: dict[str, Any] = {"kind": kind, "method": values["method"], "device": values["device"]}
        if kind == "train":
            spec["preset"], spec["steps"] = values["preset"], values["steps"]
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
        """Start the job and follow it; its id (for a server's project None: the request runs in a worker and the
        job is followed when the server answers, ``job_started`` says its id)."""
        jobs = self.state.jobs()
        if jobs is None or not spec.get("method"):
            return None
        if self.state.is_remote():
            _state.start_worker(self, jobs.start_job, spec, on_done=lambda job_id: self.follow(job_id, spec["kind"]),
                                on_error=lambda exc: show_error(str(exc)))
            return None
        try:
            job_id = jobs.start_job(spec)
        except (JobBusyError, InputError, ValueError) as exc:
            show_error(str(exc))
            return None
        self.follow(job_id, spec["kind"])
        return job_id

    def follow(self, job_id: str, kind: str | None = None) -> None:
        self.monitor.follow(job_id, kind)

    def is_running(self) -> bool:
        return self.monitor.is_running()

    def cancel(self) -> None:
        self.monitor.cancel()

    def resume(self) -> str | None:
        return self.monitor.resume()

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

    def allow_close(self, window: Any) -> bool:
        """A close goes through without a question when nothing runs or the window is hidden (scripts, tests)."""
        if not self.is_running() or not window.isVisible():
            return True
        return self.confirm_close()
