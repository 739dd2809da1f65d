"""bench/speed.py runs end to end on the tiny preset and writes its Markdown table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_speed_bench_times_the_real_training_path_and_writes_a_table(tmp_path):
    import os

    from backend.engine.devices import usable_cores

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SEMISEG_THREADS")}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--presets", "tiny", "--methods",
                             "supervised", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    (written,) = tmp_path.glob("speed-*.md")
    text = written.read_text()
    assert text in result.stdout + "\n" or text.strip() in result.stdout
    assert "torch" in text and "MONAI" in text and "backend.engine.training.train" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| supervised | tiny")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "32x32x32"
    assert int(cells[5]) == max(1, usable_cores() - 1)  # the thread policy the user's training gets
    step, all_in, validation = float(cells[6]), float(cells[8]), float(cells[9])
    assert step > 0 and all_in > 0 and validation > 0 and float(cells[11]) > 0  # inference s
    assert cells[10].endswith("(200, 100)")  # the tiny preset's length and validation cadence, projected
    assert float(cells[13]) > 0.05  # peak RSS in GiB: a real process
