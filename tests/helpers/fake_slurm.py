"""A fake SLURM on PATH for the tests: ``sbatch`` records the script it is given in ``$SLURM_FAKE/script.sh`` and
prints job id 4242 (a partition named ``nope`` is refused as sbatch does), ``sacct`` reports the state in
``$SLURM_FAKE/state`` (PENDING at first) and logs its calls, ``scancel`` logs its calls and marks the job
CANCELLED, ``srun`` does nothing."""
from __future__ import annotations

import os
import stat
from pathlib import Path

FAKES = {
    "sbatch": """#!/bin/sh
cp "$1" "$SLURM_FAKE/script.sh"
if grep -q 'partition=nope' "$1"; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
echo "Submitted batch job 4242"
""",
    "srun": "#!/bin/sh\nexit 0\n",
    "sacct": """#!/bin/sh
echo "$@" >> "$SLURM_FAKE/sacct.calls"
printf 'JobID|State|NodeList\\n4242|%s|\\n' "$(cat "$SLURM_FAKE/state")"
""",
    "scancel": "#!/bin/sh\necho \"$@\" >> \"$SLURM_FAKE/scancel.calls\"\necho CANCELLED > \"$SLURM_FAKE/state\"\n",
}


def install_fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """Put the fake commands first on PATH (for this process and the children it starts); return the folder they
    record into (``script.sh``, ``sacct.calls``, ``scancel.calls``, ``state``)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    (record / "state").write_text("PENDING\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_FAKE", str(record))
    return record
