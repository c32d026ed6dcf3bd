#!/usr/bin/env bash
# The first-GPU check (scripts/gpu_check.py): kernels vs references, graphs, leaks, bandwidth,
# the fused kernel's share of a device copy, GpuSegmenter vs the CPU Segmenter. One table.
# Uses .venv when present, else the python on PATH (a GPU box with PyTorch/CuPy/cuda-python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
