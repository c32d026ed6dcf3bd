#!/usr/bin/env bash
# Set up a development/quickstart environment in .venv (used by README and CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[export,quickstart,dev]"
# deepbet ships the quickstart's pretrained weights inside its wheel; its own GUI/runtime
# dependencies are not needed to read them.
$PIP install -q --no-deps "deepbet==1.0.2"
# nnU-Net's network definitions without timm → torchvision, which would replace the CPU torch
# with a CUDA build (PlainConvUNet needs neither).
$PIP install -q "monai>=1.4" "einops"
$PIP install -q --no-deps "dynamic-network-architectures==0.4.4"
.venv/bin/python -c "import edgeseg, onnxruntime; print('edgeseg', edgeseg.__version__, 'with onnxruntime', onnxruntime.__version__)"
