"""Data-parallel training over several processes (``torch.distributed``): the launcher and the worker.

:func:`train_distributed` (what ``semiseg train --nproc N`` and training jobs with ``nproc > 1`` call) starts::

    python -m torch.distributed.run --standalone --nproc_per_node N -m backend.engine.distributed PROJECT --method ...

Each worker (:func:`main`) joins the process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU) and
calls :func:`backend.engine.training.train`, which makes the replicas one model (weights broadcast from rank 0,
gradients all-reduced through ``Method.grad_sync``; see :func:`distributed_setup` for why the
methods are not wrapped in ``DistributedDataParallel``).  Rank 0 prints its events as JSON lines prefixed by
:data:`EVENT_PREFIX`; the launcher passes them to ``on_event``.  Cancelling sends SIGTERM to torchrun, which
forwards it to the workers: they agree on the step to stop at, rank 0 checkpoints and reports ``cancelled``.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from backend.methods.base import Method

EVENT_PREFIX = "@semiseg-event "
CANCEL_GRACE_S = 60.0  # after SIGTERM, how long the workers may take to checkpoint before they are killed


def _command(project: Path, method: str, nproc: int, *, preset: str | None, steps: int | None, device: str,
             run: str | None, resume: bool, overrides: dict | None, worker_args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
           "-m", "backend.engine.distributed", str(project), "--method", method, "--device", device]
    if preset is not None:
        cmd += ["--preset", preset]
    else:
        cmd += ["--no-preset"]
    if steps is not None:
        cmd += ["--steps", str(int(steps))]
    if run is not None:
        cmd += ["--run-name", run]  # not "--run": torchrun's parser would take it for its "--run-path"
    if resume:
        cmd += ["--resume"]
    if overrides:
        cmd += ["--overrides", json.dumps(overrides)]
    return cmd + list(worker_args)


def train_distributed(project: Any, method: str, *, nproc: int, preset: str | None = "quick",
                      steps: int | None = None, device: str = "auto", run: str | None = None, resume: bool = False,
                      overrides: dict | None = None, on_event: Callable[[dict], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, worker_args: Sequence[str] = ()) -> str:
    """:func:`backend.engine.training.train` on ``nproc`` processes of this machine; returns the run name.

    Same arguments and events as ``train``; worker output other than events goes to this process's stderr.
    """
    root = Path(getattr(project, "root", project)).resolve()
    if nproc < 1:
        from backend.errors import InputError

        raise InputError(None, f"nproc must be at least 1 (got {nproc})")
    cmd = _command(root, method, nproc, preset=preset, steps=steps, device=device, run=run, resume=resume,
                   overrides=overrides, worker_args=worker_args)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    # a session of its own: on a timeout the whole group (torchrun and its workers) can be killed at once
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
                            start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    cancelling = threading.Event()
    held: list[str] = []  # stderr after a cancel (torchrun's own shutdown traceback): shown only on failure

    def pump_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if cancelling.is_set():
                held.append(line)
            else:
                sys.stderr.write(line)

    readers = [threading.Thread(target=pump_stdout, daemon=True), threading.Thread(target=pump_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    final: dict | None = None
    run_name = run
    cancel_sent: float | None = None

    def cancel() -> None:
        nonlocal cancel_sent
        if cancel_sent is None and proc.poll() is None:
            cancelling.set()
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
            cancel_sent = time.monotonic()

    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX):])
                if event.get("run"):
                    run_name = event["run"]
                if event.get("type") in ("done", "cancelled"):
                    final = event
                if on_event is not None:
                    on_event(event)
            elif line:
                sys.stderr.write(line)
            if should_stop is not None and should_stop():
                cancel()
            if cancel_sent is not None and time.monotonic() - cancel_sent > CANCEL_GRACE_S:
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    except BaseException:
        cancel()
        try:
            proc.wait(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if final is None:
        sys.stderr.write("".join(held))
    if final is None:
        raise RuntimeError(f"distributed training failed (torchrun exit code {code}); see the log above")
    return str(run_name)


# ---- the worker (one per rank) -------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backend.engine.distributed", description="one data-parallel worker")
    p.add_argument("project", type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--preset")
    p.add_argument("--no-preset", action="store_true", help="the paper's defaults (preset None)")
    p.add_argument("--steps", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--run-name")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overrides", help="config overrides as JSON")
    p.add_argument("--dump-weights", type=Path, help="save every rank's parameters to DIR/rank<R>.pt (tests)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from backend.engine.devices import pick_device
    from backend.engine.training import train_method

    args = _parse(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def emit(event: dict) -> None:
        print(EVENT_PREFIX + json.dumps(event), flush=True)

    preset = None if args.no_preset else (args.preset or "quick")
    try:
        _, model = train_method(
            args.project, args.method, preset=preset, steps=args.steps, device=str(device), run=args.run_name,
            resume=args.resume, overrides=json.loads(args.overrides) if args.overrides else None,
            on_event=emit if rank == 0 else None, should_stop=stop.is_set)
        if args.dump_weights is not None:
            _dump_weights(args.dump_weights, model, rank)
    finally:
        dist.destroy_process_group()
    return 0


def _dump_weights(folder: Path, model: Any, rank: int) -> None:
    """Test hook: save the live parameters of this rank's replica."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    params = {f"{name}.{key}": p.detach().cpu().clone() for name, m in model.modules().items()
              for key, p in m.named_parameters()}
    torch.save(params, folder / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())


# ---- inside each worker: the engine's data parallelism -----------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_setup(method: Method, world: int) -> None:
    """Make the replicas of ``method`` on every rank one data-parallel model.

    Methods own several networks (students, EMA teachers, denoisers) and run several forward/backward passes per
    step, some of them on networks that are not optimised at all.  ``DistributedDataParallel`` wraps one module
    and hooks one backward per forward; wrapping every network would need each method to be written for DDP
    (``no_sync`` contexts, unused-parameter detection, teachers kept outside).  Instead the engine does the two
    things DDP does, at the method's level:

    1. broadcast every network's parameters and buffers from rank 0, so all replicas start equal;
    2. set ``method.grad_sync``: :meth:`Method.backward_and_step` calls it between ``backward`` and
       ``optimizer.step``, and it all-reduces the gradients of that optimizer's parameters (one flattened
       tensor per dtype) and divides by the world size.  Every rank then takes the same optimizer step from the
       same weights, so replicas stay identical, and the effective batch is ``world x`` the configured one.

    Buffers that change in the forward pass (BatchNorm statistics) are re-broadcast from rank 0 before every
    step, as DDP's ``broadcast_buffers`` does.  Each rank draws different patches (its data seed is offset by
    its rank); only rank 0 validates and writes checkpoints, metrics and events.
    """
    import torch.distributed as dist

    def grad_sync(params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    _broadcast_tensors([t for m in method.modules().values() for t in m.state_dict().values()])
    method.grad_sync = grad_sync


def _broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, 0)
        offset = 0
        for t in group:
            with torch.no_grad():
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_buffers(method: Method) -> None:
    buffers = [b for m in method.modules().values() for b in m.buffers()]
    if buffers:
        _broadcast_tensors(buffers)


def any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
