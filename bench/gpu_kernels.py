"""The CUDA-only checks of bench/gpu_check.sh: mamba-ssm's selective-scan kernel against the pure-PyTorch scan
(forward and backward, max abs difference) and one two-process NCCL DDP training step (2 GPUs).  Prints a table."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scan_difference() -> str:
    from backend.methods.diffcl.mamba import kernel_available, kernel_unavailable_reason, selective_scan

    if not kernel_available():
        return f"skipped: {kernel_unavailable_reason()}"
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, length = 2, 32, 16, 512
    args = [torch.randn(s, device="cuda", generator=g) for s in
            [(b, d, length), (b, d, length), (d, n), (b, n, length), (b, n, length), (d,)]]
    args[2] = -args[2].abs()  # A < 0: a stable scan
    diffs = {}
    outs, grads = {}, {}
    for backend in ("cuda", "torch"):
        leaves = [a.clone().requires_grad_(True) for a in args]
        out = selective_scan(*leaves[:5], D=leaves[5], delta_softplus=True, backend=backend)
        out.square().sum().backward()
        outs[backend], grads[backend] = out.detach(), [leaf.grad for leaf in leaves]
    diffs["forward"] = float((outs["cuda"] - outs["torch"]).abs().max())
    diffs["backward"] = max(float((a - c).abs().max()) for a, c in zip(grads["cuda"], grads["torch"]))
    return f"forward {diffs['forward']:.2e}, backward {diffs['backward']:.2e}"


def ddp_step() -> str:
    if torch.cuda.device_count() < 2:
        return f"skipped: {torch.cuda.device_count()} GPU (NCCL needs one GPU per process)"
    import subprocess
    import tempfile

    from backend.project.sample import copy_sample

    with tempfile.TemporaryDirectory() as tmp:
        copy_sample(Path(tmp) / "p")
        cmd = [sys.executable, "-m", "backend.cli", "train", str(Path(tmp) / "p"), "--method", "supervised",
               "--preset", "tiny", "--steps", "2", "--device", "cuda", "--nproc", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env={**os.environ})
        return "2 steps done" if proc.returncode == 0 else f"failed: {(proc.stderr or proc.stdout)[-300:]}"


def main() -> int:
    rows = [("mamba-ssm kernel vs PyTorch scan (max abs diff)", scan_difference()),
            ("NCCL DDP, 2 processes", ddp_step())]
    print("| check | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
