#!/usr/bin/env bash
# First run: install everything into .venv, copy the brain-tissue sample project, install its shipped pretrained
# checkpoints (every method, a few MB) and infer pseudo labels of every method with them (a minute or two on a
# 2-core CPU), print the review queue and the exact commands to review in napari and to train; open napari with
# the docks when a display is present.  Nothing is trained unless asked (--train: the tiny preset of every method,
# minutes on a 2-core CPU; --preset quick: about half an hour).
# Usage: scripts/run.sh [PROJECT_DIR] [--methods supervised,diffrect,diffcl,genericssl] [--train] [--preset P]
#                       [--steps N] [--device auto|cuda|mps|cpu] [--no-viewer]
#        PROJECT_DIR defaults to ./semiseg-sample (relative to where you run it); an existing project is reused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
echo "[install] $ROOT/.venv (scripts/install.sh) ..."
bash "$ROOT/scripts/install.sh"
echo "[install] done in $(( $(date +%s) - START )) s"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
exec "$VENV/bin/python" -m backend.cli.demo "$@"
