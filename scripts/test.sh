#!/usr/bin/env bash
# Install everything, then run the full test suite (GUI tests under Xvfb through pytest-xvfb).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
