#!/usr/bin/env bash
# One GPU check of everything CI cannot run (issue 22): on a CUDA machine, install what is missing, then
#   1. every method's training steps and whole-volume inference at a preset, AMP on (bench/speed.py --device cuda):
#      s/step, s/volume, peak GPU memory;
#   2. mamba-ssm's selective-scan kernel against the pure-PyTorch scan (max abs difference, forward and backward);
#   3. a two-process NCCL DDP training step (needs 2 GPUs; said skipped on one);
# and print one table (bench/results/gpu-check.md). Target: under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh [--preset quick] [--methods "diffrect diffcl genericssl"] [--no-install]
#                           [--wheels DIR] [--dry-run]
#
# Without a CUDA device it prints why and exits 0 (CI runs that path); a wrong argument exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
preset=quick
methods="supervised diffrect diffcl genericssl"
install=1
wheels=.whl
dry=0
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=${2:?--preset needs a value}; shift 2 ;;
    --methods) methods=${2:?--methods needs a value}; shift 2 ;;
    --wheels) wheels=${2:?--wheels needs a value}; shift 2 ;;
    --no-install) install=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python}
[ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
plan() { echo "gpu_check: $*"; }
if [ "$dry" = 1 ]; then
  plan "would install from ${wheels} (install=${install}), build mamba-ssm in the background"
  plan "would run bench/speed.py --device cuda --presets ${preset} --methods ${methods}"
  plan "would run bench/gpu_kernels.py (kernel vs scan, NCCL DDP step)"
  exit 0
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False, or torch does not import)"
  exit 0
fi
log=$(mktemp -d)
if [ "$install" = 1 ]; then
  # the image has a CUDA torch: never let pip replace it; the project and its pure-Python deps only
  if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$py" -m pip install --quiet --no-index --find-links "$wheels" monai nibabel SimpleITK h5py scipy >"$log/pip.txt" 2>&1
  else
    "$py" -m pip install --quiet monai nibabel SimpleITK h5py scipy >"$log/pip.txt" 2>&1
  fi
  "$py" -m pip install --quiet --no-deps -e . >>"$log/pip.txt" 2>&1 || { cat "$log/pip.txt"; exit 1; }
  # mamba-ssm compiles its kernels with nvcc (minutes): in the background, capped, the scan check waits for it
  ( timeout 420 "$py" -m pip install --quiet --no-build-isolation mamba-ssm >"$log/mamba.txt" 2>&1 ) &
  mamba_pid=$!
fi
start=$(date +%s)
timeout 300 "$py" bench/speed.py --device cuda --presets "$preset" --methods $methods --steps 10 --warmup 3 \
  --out "$log" > "$log/speed.txt" 2>&1 || echo "gpu_check: bench/speed.py failed or ran out of time (see below)"
[ -n "${mamba_pid:-}" ] && wait "$mamba_pid"
timeout 120 "$py" bench/gpu_kernels.py > "$log/kernels.txt" 2>&1 || echo "gpu_check: bench/gpu_kernels.py failed"
{
  echo "# GPU check ($(date -u +%Y-%m-%d), $(( $(date +%s) - start )) s after install)"
  echo
  "$py" -c 'import torch; print(f"- {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
  echo
  sed -n '/^|/p' "$log/speed.txt"
  echo
  sed -n '/^|/p' "$log/kernels.txt"
} | tee bench/results/gpu-check.md
tail -5 "$log/speed.txt" "$log/kernels.txt"
