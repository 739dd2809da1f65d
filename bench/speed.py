"""Training and inference speed of every registered method, per preset, on the real sample data, through the
code path a user runs.

    python bench/speed.py                      # presets tiny and quick of every importable method
    python bench/speed.py --presets tiny       # a few minutes on a laptop CPU
    python bench/speed.py --presets la --device cuda --methods supervised

Each (method, preset) runs in its own child process, so peak memory is that configuration's alone.  Measured:

* training: :func:`backend.engine.training.train` itself on a fresh copy of the brain-tissue sample project (the real
  data pipeline, the CPU thread policy, metrics and checkpoint writing, validation at the end), ``--warmup +
  --steps`` steps; s/step is the median step time of that run (``run.json`` ``seconds_per_step``, first step
  excluded), "all-in" the wall time of the whole call divided by its steps; validation: the seconds of one
  validation (whole-volume prediction of the validation case, as the loop runs it every ``val_every`` steps);
  the preset run is projected from both (``max_steps`` x s/step + one validation per ``val_every``);
* inference: :func:`backend.engine.inference.case_views` (preprocessing, every view, back onto the case's grid) on a
  whole real volume of the brain-tissue sample;
* peak resident memory of the process (``resource.getrusage``) and, on CUDA, peak allocated GPU memory.

Prints a Markdown table and writes it to ``bench/results/speed-<host kind>.md``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import host_kind, machine_lines, write_result  # noqa: E402

DEFAULT_CASE = "itk_kmeans_t1"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def measure(method: str, preset: str, *, device: str, steps: int, warmup: int, case: str) -> dict:
    """One (method, preset): run in a fresh process (see :func:`main`)."""
    import torch

    from backend.engine.data import load_case
    from backend.engine.inference import case_views
    from backend.methods import get_method
    from backend.project.sample import copy_sample
    from backend.engine.devices import cpu_thread_policy
    from backend.engine.training import train_method, validate

    with tempfile.TemporaryDirectory() as tmp:
        project = copy_sample(Path(tmp) / "brain", "brain_tissue")
        preset_config = get_method(method).make_config(preset)
        total = max(steps + warmup, 2)
        tic = time.perf_counter()
        run, model = train_method(project, method, preset=preset, steps=total, device=device)
        _sync(model.device)
        all_in = (time.perf_counter() - tic) / total
        info = json.loads((project.model_dir(method, run) / "run.json").read_text())
        train_cuda = torch.cuda.max_memory_allocated(model.device) / 2 ** 30 if model.device.type == "cuda" else None
        with cpu_thread_policy(model.device) as threads:
            val_cases = [load_case(project, c, config=model.config) for c in info["val_cases"]]
            tic = time.perf_counter()
            validate(model, val_cases, project.labels)
            _sync(model.device)
            val_s = time.perf_counter() - tic
            model.eval()
            if model.device.type == "cuda":
                case_views(model, project, case)  # warm-up (cuDNN autotuning, allocator)
                torch.cuda.reset_peak_memory_stats(model.device)
            tic = time.perf_counter()
            views, image = case_views(model, project, case)
            _sync(model.device)
            infer_s = time.perf_counter() - tic
        config = model.config
        step_s = float(info["seconds_per_step"])
        n_val = preset_config.max_steps // preset_config.val_every + (preset_config.max_steps % preset_config.val_every > 0)
        params = sum(p.numel() for m in model.modules().values() for p in m.parameters())
        return {
            "method": method, "preset": preset, "device": str(model.device),
            "threads": threads if model.device.type == "cpu" else None,
            "patch": "x".join(map(str, config.patch_size)),
            "batch": f"{config.batch_labeled}+{config.batch_unlabeled}",
            "params_m": params / 1e6,
            "step_s": step_s, "steps": total, "all_in_s": all_in, "val_s": val_s,
            "preset_min": (preset_config.max_steps * step_s + n_val * val_s) / 60,
            "preset_steps": preset_config.max_steps, "val_every": preset_config.val_every,
            "infer_s": infer_s, "infer_case": f"{case} {'x'.join(map(str, image.shape))}", "views": len(views),
            "rss_gib": _peak_rss_mib() / 1024,
            "cuda_train_gib": train_cuda,
            "cuda_infer_gib": (torch.cuda.max_memory_allocated(model.device) / 2 ** 30
                               if model.device.type == "cuda" else None),
        }


# ---- issue 22: our side of each row of the side-by-side table (bench/vs_official.md) ---------------------------------
# (row, what; the official code's number from ../PERFORMANCE.md: 2 vCPU EPYC, 2 threads, another day -- orientation
# only: a ratio is valid only against the official code run alternately in the same session)
ISSUE_ROWS: dict[str, tuple[str, str]] = {
    "diffrect_train": ("DiffRect train 256^2, 3+3, seg + refinement (before rect_start)", "6.68 s, 4.1 GiB"),
    "diffrect_train_rect": ("DiffRect train 256^2, 3+3, with rectification", "8.88 s, 5.6 GiB"),
    "ad_train_fp32": ("A&D train 64x64x48, F=32, 1+1, fp32 (same work)", "9.43 s, 2.4 GiB"),
    "ad_train": ("A&D train, same, default DDIM sampling (bf16 on CPUs with native bf16)", "9.43 s, 2.4 GiB"),
    "diffrect_infer": ("DiffRect inference (predict), 10x256x256 volume", "0.90 s, 0.5 GiB"),
    "ad_infer": ("A&D inference (predict) 128x128x88, la patch, default overlap 0.5", "53.9 s (20 windows), 1.5 GiB"),
    "ad_infer_official": ("A&D inference, same, the published strides 16/4 (la preset)", "53.9 s (20 windows), 1.5 GiB"),
    "diffcl_scan": ("Diff-CL selective scan fwd+bwd (PyTorch chunked scan), d=128, n=16, L=4096", "-"),
}


def _median_steps(fn, n: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` over ``n`` calls after one warm-up call."""
    import statistics

    fn()
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def measure_issue_row(row: str, steps: int) -> dict:
    """One row of :data:`ISSUE_ROWS` in this process (one torch thread; run by :func:`main` in a child)."""
    import torch

    from backend.methods import get_method

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict = {"row": row}
    if row.startswith("diffrect_train"):
        m = get_method("diffrect")(get_method("diffrect").make_config("acdc"), "cpu")
        label = (torch.rand(3, 1, 256, 256) * 4).long()
        batch = ({"image": label.float() + torch.randn(3, 1, 256, 256), "label": label},
                 {"image": torch.randn(3, 1, 256, 256)})
        step = m.config.rect_start if row.endswith("rect") else 0
        out["s"], out["cpu_s"] = _median_steps(lambda: m.train_step(*batch, step), steps)
    elif row.startswith("ad_train"):
        cls = get_method("genericssl")
        extra = {"cpu_bf16_sampling": False} if row == "ad_train_fp32" else {}
        m = cls(cls.make_config("la", num_classes=2, patch_size=(48, 64, 64), batch_labeled=1, batch_unlabeled=1,
                                **extra), "cpu")
        label = (torch.rand(1, 1, 48, 64, 64) > 0.7).long()
        batch = ({"image": label.float() + 0.3 * torch.randn(1, 1, 48, 64, 64), "label": label},
                 {"image": torch.randn(1, 1, 48, 64, 64)})
        out["s"], out["cpu_s"] = _median_steps(lambda: m.train_step(*batch, 1), steps)
        out["note"] = f"DDIM under bf16: {m.sampling_autocast().__class__.__name__ == 'autocast'}"
    elif row == "diffrect_infer":
        m = get_method("diffrect")(get_method("diffrect").make_config("acdc"), "cpu")
        volume = torch.randn(1, 10, 256, 256)
        out["s"], out["cpu_s"] = _median_steps(lambda: m.predict(volume), steps)
        seg = m._inference_nets()[0]
        slices, per_call = volume.permute(1, 0, 2, 3).contiguous(), 4 * m.window_batch()  # as predict batches them
        with torch.inference_mode():  # CPU s, as the overhead column compares
            _, out["net_s"] = _median_steps(lambda: [seg(slices[i:i + per_call]) for i in range(0, 10, per_call)],
                                            steps)
    elif row.startswith("ad_infer"):
        cls = get_method("genericssl")
        config = cls.make_config("la", num_classes=2)
        if row == "ad_infer":
            config.sw_overlap = 0.5
        m = cls(config, "cpu")
        m.eval()
        volume = torch.randn(1, 88, 128, 128)
        theta, calls = m.net.theta, []

        def timed(x):
            tic = time.process_time()
            y = theta(x)
            calls.append((x.shape[0], time.process_time() - tic))
            return y

        m.net.theta = timed
        tic, cpu = time.perf_counter(), time.process_time()
        m.predict(volume)
        out["s"], out["cpu_s"] = time.perf_counter() - tic, time.process_time() - cpu
        out["windows"] = sum(b for b, _ in calls)
        out["net_s"] = sum(t for _, t in calls)
    elif row == "diffcl_scan":
        from backend.methods.diffcl.mamba import selective_scan_torch

        b, d, n, length = 1, 128, 16, 4096
        u, delta, z = (torch.randn(b, d, length, requires_grad=True) for _ in range(3))
        A = -torch.rand(d, n).requires_grad_()
        B, C = (torch.randn(b, n, length, requires_grad=True) for _ in range(2))

        def fwd_bwd():
            selective_scan_torch(u, delta, A, B, C, z=z, delta_softplus=True).sum().backward()

        out["s"], out["cpu_s"] = _median_steps(fwd_bwd, steps)
    else:
        raise SystemExit(f"unknown row {row}")
    out["rss_gib"] = _peak_rss_mib() / 1024
    return out


def issue_table(results: list[dict]) -> list[str]:
    lines = ["| row | ours s (wall) | ours CPU s | network CPU s of the windows (count) | CPU / network | peak RSS GiB "
             "| official, PERFORMANCE.md |", "|---|---|---|---|---|---|---|"]
    for r in results:
        what, official = ISSUE_ROWS[r["row"]]
        if "error" in r:
            lines.append(f"| {what} | error: {r['error']} | | | | | {official} |")
            continue
        net = "-" if "net_s" not in r else f"{r['net_s']:.2f}" + (f" ({r['windows']})" if "windows" in r else "")
        over = "-" if "net_s" not in r else f"{r['cpu_s'] / r['net_s']:.2f}x"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {what}{note} | {r['s']:.2f} | {r['cpu_s']:.2f} | {net} | {over} | {r['rss_gib']:.2f} "
                     f"| {official} |")
    return lines


def run_issue_rows(rows: list[str], steps: int, out: Path, timeout: float) -> int:
    results = []
    for row in rows:
        print(f"measuring {row} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--issue-row", row, "--steps", str(steps)]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            found = [line for line in done.stdout.splitlines() if line.startswith("@result ")]
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results.append(json.loads(found[-1][8:]) if found else {"row": row, "error": tail[:120]})
        except subprocess.TimeoutExpired:
            results.append({"row": row, "error": f"timed out after {timeout:.0f} s"})
    text = "\n".join([f"# Issue 22 rows, our side ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "",
                      *machine_lines("cpu"), "- one torch thread per row, each row in its own process; medians "
                      "after one warm-up", ""] + issue_table(results)) + "\n"
    print(text)
    write_result("speed-issue22-rows.md", text, folder=out)
    return 0 if all("error" not in r for r in results) else 1


# ---- the parent: one child per configuration, a table at the end ---------------------------------------------------
def header(device: str) -> list[str]:
    return [f"# Speed ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "", *machine_lines(device),
            "- training through backend.engine.training.train on a copy of the sample project (real data pipeline, CPU "
            "thread policy, validation at the end): median s/step of the run; all-in: wall time / steps; "
            "validation: one whole-volume validation; preset run: max_steps x s/step + one validation per "
            "val_every; inference: every view of one whole volume; memory: peak of the process / of CUDA "
            "allocations",
            ""]


def table(rows: list[dict]) -> list[str]:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| method | preset | patch | batch L+U | params (M) | threads | s/step | steps/s | all-in s/step "
             "| validation s | preset run min (steps, val every) | inference s | inference volume | peak RSS GiB "
             "| peak CUDA GiB train/infer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['preset']} | error: {r['error']} |" + " |" * 12)
            continue
        cuda = "-" if r["cuda_train_gib"] is None else f"{r['cuda_train_gib']:.2f} / {r['cuda_infer_gib']:.2f}"
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['patch']} | {r['batch']} | {r['params_m']:.2f} "
            f"| {num(r['threads'], 'd')} | {num(r['step_s'], '.3f')} | {num(1 / r['step_s'], '.2f')} "
            f"| {num(r['all_in_s'], '.3f')} | {num(r['val_s'], '.2f')} "
            f"| {num(r['preset_min'], '.1f')} ({r['preset_steps']}, {r['val_every']}) "
            f"| {num(r['infer_s'], '.2f')} | {r['infer_case']} | {num(r['rss_gib'], '.2f')} | {cuda} |")
    return lines


def configurations(methods: list[str] | None, presets: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    from backend.methods import get_method, method_names

    todo, notes = [], []
    for name in methods or method_names():
        try:
            cls = get_method(name)
        except (ImportError, AttributeError, KeyError) as exc:
            notes.append(f"- {name}: not importable ({type(exc).__name__}: {exc})")
            continue
        for preset in presets:
            if preset in cls.presets:
                todo.append((name, preset))
            else:
                notes.append(f"- {name}: no preset '{preset}'")
    return todo, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "quick"])
    p.add_argument("--methods", nargs="+", help="default: every registered method that imports")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--case", default=DEFAULT_CASE, help="brain_tissue case for whole-volume inference")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "PRESET"), help=argparse.SUPPRESS)
    p.add_argument("--issue", nargs="*", metavar="ROW", choices=list(ISSUE_ROWS),
                   help=f"our side of issue 22's side-by-side rows (all when none named: {', '.join(ISSUE_ROWS)})")
    p.add_argument("--issue-row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.issue_row:
        print("@result " + json.dumps(measure_issue_row(args.issue_row, max(1, args.steps))), flush=True)
        return 0
    if args.issue is not None:
        return run_issue_rows(args.issue or list(ISSUE_ROWS), max(1, args.steps), args.out, args.timeout)

    if args.child:
        result = measure(*args.child, device=args.device, steps=args.steps, warmup=args.warmup, case=args.case)
        print("@result " + json.dumps(result), flush=True)
        return 0

    todo, notes = configurations(args.methods, args.presets)
    rows = []
    for method, preset in todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, preset, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--case", args.case]
        print(f"measuring {method} / {preset} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [line for line in done.stdout.splitlines() if line.startswith("@result ")]
            if done.returncode != 0 or not found:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"method": method, "preset": preset, "error": tail[:120].replace("|", "/")})
            else:
                rows.append(json.loads(found[-1][len("@result "):]))
        except subprocess.TimeoutExpired:
            rows.append({"method": method, "preset": preset, "error": f"timed out after {args.timeout:.0f} s"})
    text = "\n".join(header(args.device) + table(rows) + ([""] + notes if notes else [])) + "\n"
    print(text)
    path = write_result(f"speed-{host_kind(args.device)}.md", text, folder=args.out)
    print(f"written to {path}", file=sys.stderr)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
