#!/usr/bin/env bash
# Install everything, then run the main job: build the sample project, train and infer every method on it
# (tiny budgets on CPU), print the review queue, and open napari with the docks when a display is present.
# Usage: scripts/run.sh [PROJECT_DIR]      (default: ./semiseg-sample)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python -m backend.demo "${1:-semiseg-sample}"
