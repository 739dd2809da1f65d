"""Does napari stall while a remote case loads?  The review dock connected to ``semiseg serve`` (issue 20).

A copy of the real sample (with the shipped ``supervised2d`` model's pseudo labels, inferred here) is served by
``semiseg serve`` in a subprocess on 127.0.0.1; napari opens with both docks as ``python -m napari_semiseg`` lays
them out, connects through the dock's "Server URL + token" panel (the same clicks a user makes), then shows every
case of the queue ``--rounds`` times.  Measured, with :mod:`bench.ui`'s 10 ms timer and canvas-frame wait:

* **connect**: from the Connect click to the filled review table (token check, first sync of the local mirror);
* **show a remote case**: from selecting it to ``case_loaded`` / to the next frame drawn (the image and views
  come over HTTP the first time, revalidated by ETag later);
* **event-loop gaps** while cases load: p50 / p99 / max and how many exceed the 100 ms target.  The transfers
  run in a worker; what is left on the main thread is napari building and re-slicing the layers.

    xvfb-run -a python bench/server_ui.py [--rounds 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine_lines, write_result  # noqa: E402
from bench.server import start_server  # noqa: E402
from bench.ui import CanvasDraws, Ticks, show_case, stall_stats, wait_for  # noqa: E402

MODEL = "supervised2d"  # the quickest shipped model to infer: real pseudo-label views without minutes of CPU


def prepare(dest: Path):
    """The sample with the shipped models and ``MODEL``'s pseudo labels of every unlabeled case."""
    from backend.engine.inference import infer
    from backend.project.sample import PRETRAINED_RUN, copy_sample

    project = copy_sample(dest, "brain_tissue", pretrained=True)
    infer(project, MODEL, run=PRETRAINED_RUN, device="cpu")
    return project


def run_bench(rounds: int, workdir: Path) -> dict[str, Any]:
    from napari_semiseg.__main__ import open_viewer
    from napari_semiseg.review.connect import SERVER

    project = prepare(workdir / "project")
    proc, url, token = start_server(project.root, workdir)
    out: dict[str, Any] = {"url": url}
    viewer, review, _training = open_viewer(show=True)
    review.advance_check.setChecked(False)
    draws = CanvasDraws(viewer)
    out["gl"] = draws.renderer()
    try:
        panel = review.connection
        panel.mode_combo.setCurrentText(SERVER)
        panel.url_edit.setText(url)
        panel.token_edit.setText(token)
        ticks = Ticks()
        with ticks:
            out["connect_s"], _ = wait_for(review.table_refreshed, panel.connect_button.click)
        out["stall_connect"] = stall_stats(ticks.gaps)
        cases = review.table_cases()
        out["cases"] = len(cases)
        first, later = Ticks(), Ticks()
        shows, views = [], 0
        for i in range(rounds):
            for case in cases:
                ticks = first if i == 0 else later
                with ticks:
                    shows.append(show_case(review, draws, case))
                views = max(views, len(review.views))
        out["show_first_round"], out["show_later"] = shows[:len(cases)], shows[len(cases):]
        out["stall_first_round"] = stall_stats(first.gaps)
        out["stall_later"] = stall_stats(later.gaps) if later.gaps else None
        out["views"] = views
        out["load"] = os.getloadavg()[0]
    finally:
        review._baseline = None
        viewer.close()
        proc.terminate()
        proc.wait(timeout=30)
    return out


def report(out: dict[str, Any], rounds: int) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    def show_row(name: str, shows: list[tuple[float, float]]) -> str:
        arr = np.asarray(shows)
        return (f"| {name} | {len(arr)} | {ms(np.median(arr[:, 0]))} / {ms(np.median(arr[:, 1]))} | "
                f"{ms(arr[:, 0].max())} / {ms(arr[:, 1].max())} |")

    def stall_row(name: str, stats: dict[str, float] | None) -> str:
        if not stats:
            return f"| {name} | 0 | - | - | - | - |"
        return (f"| {name} | {stats['n']} | {stats['p50']:.0f} ms | {stats['p99']:.0f} ms | {stats['max']:.0f} ms "
                f"| {stats['over100']} |")

    lines = ["# napari against `semiseg serve`: remote case loads and event-loop stalls", "",
             *machine_lines("cpu"),
             f"- OpenGL: {out['gl']}; load average at the end {out['load']:.1f} (2 cores: above 2 the bench shares them)",
             f"- server: `semiseg serve` on {out['url']} (loopback), the sample's {out['cases']} cases, "
             f"{out['views']} pseudo-label view(s) of the shipped `{MODEL}`; {rounds} round(s) over the queue", "",
             "| what | n | median: loaded / drawn | max: loaded / drawn |", "|---|---|---|---|",
             f"| connect (Connect click to the filled table) | 1 | {ms(out['connect_s'])} | - |",
             show_row("show a remote case, first time (downloads)", out["show_first_round"])]
    if out["show_later"]:
        lines.append(show_row("show a remote case again (ETag revalidation)", out["show_later"]))
    lines += ["", "| event-loop gaps (10 ms timer) | ticks | p50 | p99 | max | over 100 ms |", "|---|---|---|---|---|---|",
              stall_row("while connecting", out["stall_connect"]),
              stall_row("while cases load, first time", out["stall_first_round"]),
              stall_row("while cases load again", out["stall_later"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="times every case of the queue is shown")
    parser.add_argument("--out", type=Path, help="folder for the table (default bench/results)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semiseg-server-ui-") as tmp:
        out = run_bench(args.rounds, Path(tmp))
    text = report(out, args.rounds)
    print(text)
    print(f"written to {write_result('server-ui-cpu-2core.md', text, folder=args.out)} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
