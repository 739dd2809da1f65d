"""The job monitor: follows one job of the project through its event stream (``semiseg/jobs/<id>/events.jsonl``,
read incrementally every 250 ms by a ``QTimer``, one small file read each, or for a server's project one request in
a worker thread), shows its progress and ETA, up to four
loss curves, the validation Dice (on held-out labeled cases) and DiffRect's calibration Dice (``tau_l``, ``tau_u``
of its eq. 6) apart; *Cancel* and *Resume*."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from backend.errors import InputError, JobBusyError
from backend.text import format_duration
from napari_semiseg._dock import show_error, show_info
from napari_semiseg._plot import CurvePlot
from napari_semiseg._state import start_worker

if TYPE_CHECKING:
    from napari_semiseg.training import TrainingDock

POLL_MS = 250
STATUS_EVERY = 8  # polls between job_status checks (a job killed without a final event shows up as "dead")
FINAL = ("done", "cancelled", "error", "dead")
LOSS_SERIES = 4  # loss curves drawn (the total first, as each method reports it); the rest are in metrics.jsonl
CALIBRATION = ("tau_l", "tau_u")  # DiffRect's calibration-guidance Dice (eq. 6), reported with the losses


class JobMonitor(QWidget):
    """Progress, status, Dice lines and curves of the followed job (``job_id``, ``job_kind``)."""

    def __init__(self, dock: "TrainingDock"):
        super().__init__(dock)
        self.dock = dock
        self.job_id: str | None = None
        self.job_kind: str | None = None
        self._offset = 0
        self._polls = 0
        self._last_step = 0
        self._fetching = False  # a server's events are being fetched (a worker)
        self._server_jobs: list[dict[str, Any]] | None = None  # a server's job list, as last fetched
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.dice_label = QLabel("Validation Dice: -")
        self.dice_label.setWordWrap(True)
        self.dice_label.setToolTip("Dice of the model against labeled cases held out of training (or, with fewer "
                                   "than five labeled cases, the training cases), at each validation")
        self.calibration_label = QLabel("Calibration Dice: -")
        self.calibration_label.setWordWrap(True)
        self.calibration_label.setToolTip(
            "DiffRect's calibration guidance (eq. 6): tau_l = Dice(weak prediction, label) on labeled slices, "
            "tau_u = Dice(strong, weak prediction) on unlabeled slices, batch means of the last step")
        self.loss_plot = CurvePlot("training losses (log)", log_y=True, max_series=LOSS_SERIES)
        self.dice_plot = CurvePlot("validation Dice", y_range=(0.0, 1.0))
        for widget in (self.progress, dock.status, self.dice_label, self.calibration_label, self.loss_plot,
                       self.dice_plot):
            layout.addWidget(widget)

    def stop(self) -> None:
        """Stop following (another project was opened)."""
        self.timer.stop()
        self.job_id = None
        self._offset = 0

    def is_running(self) -> bool:
        return self.job_id is not None and self.timer.isActive()

    def follow(self, job_id: str, kind: str | None = None) -> None:
        """Show job ``job_id`` in the dock (from its first event) and poll it until it ends."""
        self.job_id, self.job_kind = job_id, kind
        self._offset = self._polls = self._last_step = 0
        self.loss_plot.clear()
        self.dice_plot.clear()
        self.dice_label.setText("Validation Dice: -")
        self.calibration_label.setText("Calibration Dice: -")
        self.progress.setRange(0, 0)  # busy until the first progress event
        self.progress.setFormat(f"{kind or 'job'} starting...")
        self.dock._say(f"Job {job_id} started")
        self.timer.start()
        self.dock._update_buttons()
        self.dock.job_started.emit(job_id)

    def poll(self) -> None:
        """Read the new events of the followed job and show them: one small file read for a project folder; for a
        server's project one request in a worker thread (never two at once), so a slow network never stalls
        napari."""
        state = self.dock.state
        jobs = state.jobs()
        if jobs is None or self.job_id is None:
            self.timer.stop()
            return
        self._polls += 1
        job_id, with_status = self.job_id, self._polls % STATUS_EVERY == 0
        if not state.is_remote():
            try:
                self._apply(job_id, _fetch(jobs, job_id, self._offset, with_status))
            except (InputError, OSError) as exc:
                self.dock._say(f"Cannot read job {job_id}: {exc}")
            return
        if self._fetching:
            return
        self._fetching = True

        def done(result: tuple) -> None:
            self._fetching = False
            self._apply(job_id, result)

        def failed(exc: BaseException) -> None:
            self._fetching = False
            self.dock._say(f"Cannot read job {job_id} from the server: {exc}")
        start_worker(self.dock, _fetch, jobs, job_id, self._offset, with_status, on_done=done, on_error=failed)

    def _apply(self, job_id: str, result: tuple) -> None:
        events, offset, status = result
        if job_id != self.job_id or not self.timer.isActive():
            return  # another job followed (or this one finished) meanwhile
        self._offset = offset
        for event in events:
            self.show_event(event)
            if not self.timer.isActive():
                return
        if status is not None and status["state"] == "dead":
            self.finish("dead", status.get("error") or {})

    def show_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self.dock.event_received.emit(event)
        if kind == "start":
            if event.get("total"):
                self.progress.setRange(0, int(event["total"]))
            self.dock._say(f"{self.job_kind or 'job'} {event.get('method', '')} run {event.get('run', '')} on "
                           f"{event.get('device', '?')}")
            self.dock.refresh_models()
        elif kind == "progress":
            self._show_progress(event)
        elif kind == "validation":
            self._show_validation(event)
        elif kind == "checkpoint":
            self.dock._say(f"checkpoint saved at step {event.get('step', self._last_step)}")
            self.dock.refresh_models()
        elif kind in ("done", "cancelled", "error"):
            self.finish(kind, event)

    def _show_progress(self, event: dict[str, Any]) -> None:
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

    def _show_validation(self, event: dict[str, Any]) -> None:
        mean = event.get("mean")
        step = event.get("step", self._last_step)
        if mean is None:
            return
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

    def finish(self, state: str, event: dict[str, Any]) -> None:
        dock = self.dock
        self.timer.stop()
        job_id, kind = self.job_id, self.job_kind
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if state == "done" else 0)
        self.progress.setFormat(f"{kind or 'job'} {state}")
        if state in ("error", "dead"):
            message = event.get("message") or "the job failed"
            show_error(f"{kind or 'Job'} {job_id} failed ({event.get('kind', state)}): {message}")
            dock._say(f"{kind} failed: {message}")
        elif state == "cancelled":
            dock._say(f"{kind} cancelled at step {self._last_step}" + (" (resume continues it)" if kind == "train"
                                                                       else ""))
        else:
            show_info(f"{kind} finished: run {event.get('run', '')}")
            dock._say(f"{kind} done: run {event.get('run', '')}")
        dock.refresh_models()
        self.refresh_jobs()
        dock._update_buttons()
        if state == "done" and kind == "infer":
            dock.state.pseudo_changed.emit()
        if state == "done" and kind == "train":
            dock.state.models_changed.emit()
        dock.job_finished.emit(job_id or "", state)

    def cancel(self) -> None:
        """Ask the running job to stop (training checkpoints first); the dock shows it when it has stopped."""
        jobs = self.dock.state.jobs()
        if jobs is None or self.job_id is None:
            return
        job_id = self.job_id
        if self.dock.state.is_remote():
            start_worker(self.dock, jobs.cancel_job, job_id, on_error=lambda exc: show_error(f"Not cancelled: {exc}"))
        else:
            jobs.cancel_job(job_id)
        self.progress.setFormat(f"{self.job_kind or 'job'} cancelling...")
        self.dock._say(f"Cancelling {job_id} (training saves a checkpoint, then stops)")

    def refresh_jobs(self) -> None:
        """Re-read a server's job list in a worker (Resume's choice); a project folder's is read when asked."""
        state = self.dock.state
        if not state.is_remote():
            self._server_jobs = None
            return
        project = state.project

        def done(jobs: list[dict[str, Any]]) -> None:
            if project is self.dock.state.project:
                self._server_jobs = jobs
                self.dock._update_buttons()
        start_worker(self.dock, state.jobs().list_jobs, on_done=done, on_error=lambda exc: None)

    def resumable(self) -> str | None:
        """The job Resume would continue: the newest training job, when it stopped without finishing."""
        state = self.dock.state
        if state.project is None:
            return None
        try:
            jobs = (self._server_jobs or []) if state.is_remote() else state.jobs().list_jobs()
        except (InputError, OSError):
            return None
        for job in jobs:
            if job["kind"] == "train":
                return job["id"] if job["state"] in ("cancelled", "error", "dead") and job.get("run") else None
        return None

    def resume(self) -> str | None:
        """Continue the last stopped training run from its checkpoint in a new job (for a server's project the job
        starts in a worker and is followed when the server answers; None is returned)."""
        state = self.dock.state
        job = self.resumable()
        if state.project is None or job is None:
            return None
        if state.is_remote():
            start_worker(self.dock, state.jobs().resume_job, job, on_done=lambda new_id: self.follow(new_id, "train"),
                         on_error=lambda exc: show_error(str(exc)))
            return None
        try:
            new_id = state.jobs().resume_job(job)
        except (JobBusyError, InputError) as exc:
            show_error(str(exc))
            return None
        self.follow(new_id, "train")
        return new_id


def _fetch(jobs: Any, job_id: str, offset: int, with_status: bool) -> tuple[list, int, dict[str, Any] | None]:
    """The job's events after ``offset``, the next offset, and its status when asked (a worker, for a server)."""
    events, offset = jobs.read_events(job_id, offset)
    return events, offset, jobs.job_status(job_id) if with_status else None
