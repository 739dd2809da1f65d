"""bench/speed.py runs end to end on the tiny preset and writes its Markdown table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_bench_prints_and_writes_a_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--presets", "tiny", "--methods",
                             "supervised", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (written,) = tmp_path.glob("speed-*.md")
    text = written.read_text()
    assert text in result.stdout + "\n" or text.strip() in result.stdout
    assert "torch" in text and "MONAI" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| supervised | tiny")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "32x32x32" and float(cells[5]) > 0 and float(cells[8]) > 0  # s/step, inference s
    assert float(cells[10]) > 0.05  # peak RSS in GiB: a real process
