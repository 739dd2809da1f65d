"""How the napari plugin feels: time to show a case, time to accept a label, event-loop stalls while a job trains.

    xvfb-run -a python bench/ui.py                 # on a headless machine (napari's canvas needs an X display)
    python bench/ui.py --methods diffrect diffcl genericssl --train-method genericssl --seconds 60

On a copy of the real brain-tissue sample, each method in ``--methods`` is first trained for ``--steps`` steps of
``--preset`` and run on every unlabeled case (headless, before the viewer opens), so the review dock shows real
pseudo labels and agreement scores.  Then, in a real napari viewer with the review and training docks:

* **show a case** (a case switch): from ``select_case`` until the image, every view, the accepted label, the
  disagreement outline and its slice profile are in the viewer (``case_loaded``), and until the canvas has drawn
  them; every case in the table, ``--rounds`` times over (the first case of a session also builds napari's visuals,
  so it is reported on its own);
* **accept**: start a correction from the first view, paint a few voxels, accept; from ``accept()`` until the label
  is written (the history snapshot included) and the dock says so (``accepted``).  A question the dock asks (a
  pseudo label of a barely trained model may lack a class another view has) is answered with its first button
  by the script and counted, not timed;
* **event-loop stalls**: a 10 ms ``QTimer`` records the gaps between its ticks, i.e. how long the event loop was
  held up, (a) while a training job started from the dock runs for ``--seconds`` seconds (the dock polls its events
  every 250 ms), (b) while cases are shown and accepted with that job still running, as a reviewer would.

Prints a Markdown table and writes it to ``bench/results/ui-<host kind>.md``.  Targets (shared PERFORMANCE.md):
no stall over 100 ms while a job runs; accepting a 256^3 label under 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import host_kind, machine_lines, write_result  # noqa: E402

TICK_MS = 10


class Ticks:
    """A 10 ms ``QTimer``: the gaps between its ticks are the event loop's stalls (plus the 10 ms interval).
    Each ``with ticks:`` block (or ``start()`` ... ``stop()``) adds the gaps inside it, so scripted user actions in
    between are left out."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last = time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> "Ticks":
        self._last = time.perf_counter()
        self.timer.start()
        return self

    def stop(self) -> None:
        self.timer.stop()
        self.gaps.append(time.perf_counter() - self._last)  # the gap still open when it stops

    def __enter__(self) -> "Ticks":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(signal, trigger: Callable[[], Any] | None = None, timeout: float = 120.0) -> tuple[float, tuple]:
    """Call ``trigger`` and turn the event loop until ``signal`` fires; ``(seconds, the signal's arguments)``."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    got: list[tuple] = []

    def fired(*args: Any) -> None:
        got.append(args)
        loop.quit()

    signal.connect(fired)
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(loop.quit)
    timer.start(int(timeout * 1000))
    t0 = time.perf_counter()
    try:
        if trigger is not None:
            trigger()
        if not got:
            loop.exec()
    finally:
        signal.disconnect(fired)
        timer.stop()
    if not got:
        raise TimeoutError(f"no {signal} within {timeout:.0f} s")
    return time.perf_counter() - t0, got[0]


def turn(seconds: float) -> None:
    """Let the event loop run for ``seconds``."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def prepare_project(dest: Path, methods: list[str], preset: str, steps: int) -> tuple[Any, dict[str, float]]:
    """A copy of the brain-tissue sample with real pseudo labels of ``methods`` (trained here, headless)."""
    from backend.engine.inference import infer
    from backend.project.sample import copy_sample
    from backend.engine.training import train

    project = copy_sample(dest, "brain_tissue")
    seconds: dict[str, float] = {}
    for method in methods:
        t0 = time.perf_counter()
        run = train(project, method, preset=preset, steps=steps, device="cpu")
        infer(project, method, run=run, device="cpu")
        seconds[method] = time.perf_counter() - t0
        print(f"{method}: trained {steps} steps of {preset} and inferred in {seconds[method]:.0f} s", flush=True)
    return project, seconds


class CanvasDraws:
    """The viewer canvas's vispy ``draw`` event as a Qt signal, so :func:`wait_for` can wait for a frame."""

    def __init__(self, viewer) -> None:
        from qtpy.QtCore import QObject, Signal

        class _Relay(QObject):
            drawn = Signal()

        self._relay = _Relay()
        self.drawn = self._relay.drawn
        self._canvas = viewer.window._qt_viewer.canvas  # napari's VispyCanvas; .events are vispy's canvas events
        self._canvas.events.draw.connect(lambda _event: self._relay.drawn.emit())

    def request(self) -> None:
        self._canvas._scene_canvas.update()

    def renderer(self) -> str:
        """The OpenGL renderer drawing the canvas (under Xvfb: Mesa's llvmpipe, i.e. software rendering on the CPU
        cores the training job also uses)."""
        from vispy.gloo import gl

        self._canvas._scene_canvas.set_current()
        return f"{gl.glGetParameter(gl.GL_RENDERER)}, OpenGL {gl.glGetParameter(gl.GL_VERSION)}"


def show_case(review, draws: CanvasDraws, case: str) -> tuple[float, float]:
    """``(seconds to case_loaded, seconds to the next frame drawn)`` for ``review.select_case(case)``."""
    t0 = time.perf_counter()
    loaded, _ = wait_for(review.case_loaded, lambda: review.select_case(case))
    wait_for(draws.drawn, draws.request, timeout=10)
    return loaded, time.perf_counter() - t0


def accept_case(review, ticks: Ticks, pixels: int = 50) -> float:
    """Start from the first view, paint ``pixels`` voxels, accept: seconds from ``accept()`` to ``accepted``.
    ``ticks`` runs while the dock works (starting the correction, accepting), not while the script paints."""
    view = next(iter(review.views))
    with ticks:
        wait_for(review.correction_started, lambda: review.start_from(view))
    layer = review.correction_layer
    z = layer.data.shape[0] // 2
    ys, xs = np.nonzero(layer.data[z] == 0)
    for y, x in list(zip(ys, xs))[:: max(1, len(ys) // pixels)][:pixels]:
        layer.paint((z, int(y), int(x)), 1, refresh=False)
    layer.refresh()
    with ticks:
        seconds, _ = wait_for(review.accepted, review.accept)
    return seconds


def stall_stats(gaps: list[float]) -> dict[str, float]:
    ms = np.asarray(gaps) * 1000
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "over100": int((ms > 100).sum())}


def run_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from napari_semiseg.__main__ import open_viewer

    from napari_semiseg import _state

    project, prep_s = prepare_project(workdir / "brain", args.methods, args.preset, args.steps)
    questions: list[str] = []

    def answer_first(_parent, title, _text, buttons, default=None) -> str:  # no one is there to click
        questions.append(title)
        return buttons[0]

    _state.ask = answer_first
    viewer, review, training = open_viewer(show=True)  # the docks as `python -m napari_semiseg` lays them out
    review.advance_check.setChecked(False)  # the bench picks the cases itself
    draws = CanvasDraws(viewer)
    out: dict[str, Any] = {"prep_s": prep_s, "gl": draws.renderer()}
    try:
        opened, _ = wait_for(review.table_refreshed, lambda: review.open_project(project.root))
        out["open_s"] = opened
        cases = review.table_cases()
        shows, views = [], 0
        for _ in range(args.rounds):
            for case in cases:
                shows.append(show_case(review, draws, case))
                views = max(views, len(review.views))
        out["show_first"], out["show_idle"] = shows[0], shows[1:]

        # a training job from the dock, as a user starts it
        if not training.choices.get("methods"):
            wait_for(training.choices_loaded, timeout=120)  # the dock lists methods in a child process
        training.method_combo.setCurrentText(args.train_method)
        training.preset_combo.setCurrentText(args.train_preset)
        training.device_combo.setCurrentText("cpu")
        training.steps_spin.setValue(100000)
        events: list[dict] = []
        training.event_received.connect(events.append)
        if not training.start_training():
            raise RuntimeError("the training dock did not start a job (see the notifications)")
        t0 = time.perf_counter()
        while not any(e["type"] == "progress" for e in events):
            if time.perf_counter() - t0 > 300:
                raise TimeoutError("the training job sent no progress in 300 s")
            turn(0.2)
        def job_step() -> int:
            return max(e.get("step", 0) for e in events)

        idle = Ticks()
        first_step = job_step()
        with idle:
            turn(args.seconds)
        out["stall_training"] = stall_stats(idle.gaps)
        out["job_steps"] = job_step() - first_step

        # reviewing while the job runs: show every case, accept the unlabeled ones
        accepts, out["show_busy"] = [], []
        busy = Ticks()
        for case in cases:
            with busy:
                out["show_busy"].append(show_case(review, draws, case))
            views = max(views, len(review.views))
            if not project.is_labeled(case):
                accepts.append(accept_case(review, busy))
        out["accept_s"] = accepts
        out["stall_reviewing"] = stall_stats(busy.gaps)
        out["views"] = views
        out["questions"] = questions
        wait_for(training.job_finished, training.cancel, timeout=120)
    finally:
        review._baseline = None
        training._timer.stop()
        viewer.close()
    return out


def report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    first_loaded, first_drawn = out["show_first"]
    accept = np.array(out["accept_s"])
    lines = [f"# napari plugin responsiveness ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "",
             *machine_lines(),
             f"- project: real brain_tissue sample (3 cases, {out['views']} pseudo-label views from "
             f"{', '.join(args.methods)}, {args.preset} preset, {args.steps} steps; prepared in "
             f"{sum(out['prep_s'].values()):.0f} s)",
             f"- display {os.environ.get('DISPLAY', '?')}, OpenGL renderer: {out['gl']}",
             f"- training job: {args.train_method} / {args.train_preset} on cpu, started from the training dock "
             f"({out['job_steps']} steps in the {args.seconds:.0f} s of the stall measurement)",
             "- show a case (case switch): from selecting it to `case_loaded` (image, every view, accepted label, "
             "disagreement outline and slice profile in the viewer) / to the next frame drawn",
             f"- questions the dock asked (answered by the script, not timed): "
             f"{', '.join(out.get('questions') or []) or 'none'}", "",
             "| what | n | median | max | note |", "|---|---|---|---|---|",
             f"| open the project (table filled) | 1 | {ms(out['open_s'])} | - | |",
             f"| show the first case of the session | 1 | {ms(first_loaded)} / {ms(first_drawn)} | - | "
             "napari builds each layer's visual once |"]
    for key, note in (("show_idle", "no job running, layers reused"), ("show_busy", "while the job trains")):
        shown = np.array(out[key])
        lines.append(f"| show a case | {len(shown)} | {ms(np.median(shown[:, 0]))} / {ms(np.median(shown[:, 1]))} "
                     f"| {ms(shown[:, 0].max())} / {ms(shown[:, 1].max())} | {note} |")
    lines.append(f"| accept a corrected label (validate, write, history) | {len(accept)} | {ms(np.median(accept))} "
                 f"| {ms(accept.max())} | while the job trains |")
    lines += ["", "Event-loop stalls: gaps between the ticks of a 10 ms timer.", "",
              "| while | ticks | p50 | p99 | max | gaps over 100 ms |", "|---|---|---|---|---|---|"]
    for key, what in (("stall_training", f"{args.seconds:.0f} s of a training job"),
                      ("stall_reviewing", "showing and accepting cases while the job trains")):
        st = out[key]
        lines.append(f"| {what} | {st['n']} | {st['p50']:.0f} ms | {st['p99']:.0f} ms | {st['max']:.0f} ms "
                     f"| {st['over100']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["diffrect", "genericssl"],
                   help="methods whose real pseudo labels the dock shows")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=20, help="training steps of each method before the viewer opens")
    p.add_argument("--train-method", default="diffrect", help="the job that trains while stalls are measured")
    p.add_argument("--train-preset", default="tiny")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of training to measure stalls over")
    p.add_argument("--rounds", type=int, default=2, help="times every case is shown")
    p.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    args = p.parse_args(argv)
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        print("bench/ui.py: no display; napari's canvas needs one: run it as `xvfb-run -a python bench/ui.py`",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="semiseg-ui-bench-"))
    try:
        out = run_bench(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, out)
    print(text)
    path = write_result(f"ui-{host_kind('cpu')}.md", text, folder=args.out)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
