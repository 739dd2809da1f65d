#!/usr/bin/env bash
# Install napari-semiseg and everything it needs into .venv (CPU torch), from scratch or incrementally.
# Usage: scripts/install.sh            (sourced by run.sh and test.sh)
# GPU users: see README "GPU install" (CUDA torch, then `pip install --no-build-isolation ".[cuda]"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# Debian/Ubuntu libraries Qt needs to open windows under Xvfb (tests) or a real display.
QT_DEBS="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0 libxcb-randr0
 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1"
# A real PACS for the DICOM tests (tests/helpers/orthanc.py starts its own instance on 127.0.0.1, a free port).
PACS_DEBS="orthanc orthanc-dicomweb"
if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
  missing=""
  for deb in $QT_DEBS $PACS_DEBS; do dpkg -s "$deb" >/dev/null 2>&1 || missing="$missing $deb"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The CPU build of torch, pinned: without the pin a dependency's build step pulls a multi-GB CUDA torch.
export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
