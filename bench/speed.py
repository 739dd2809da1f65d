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
    args = p.parse_args(argv)

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
