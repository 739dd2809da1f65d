"""bench/gpu_check.sh on a CPU machine: its argument handling and its skip path (the GPU path runs on a GPU host)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the real check")
def test_without_cuda_it_says_why_and_succeeds_without_installing_anything():
    out = run("--no-install")
    assert out.returncode == 0, out.stderr
    assert "skipped: no CUDA device" in out.stdout
    assert "pip" not in out.stdout + out.stderr


def test_a_wrong_argument_is_named_and_exits_2():
    out = run("--presets", "tiny")  # the option is --preset
    assert out.returncode == 2
    assert "unknown argument '--presets'" in out.stderr and "--preset quick" in out.stderr  # and the usage


def test_a_missing_value_is_an_error_and_dry_run_shows_the_plan():
    assert run("--preset").returncode != 0
    out = run("--dry-run", "--preset", "tiny", "--methods", "diffcl")
    assert out.returncode == 0
    assert "bench/speed.py --device cuda --presets tiny --methods diffcl" in out.stdout
    assert "bench/gpu_kernels.py" in out.stdout
