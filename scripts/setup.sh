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
# nnU-Net v2 for tests/test_nnunet_import.py (which skips without it). `pip install nnunetv2` pulls
# timm → torchvision → a CUDA torch that replaces the CPU one: nnunetv2 itself without its
# dependencies, the ones it needs by name. Failure-tolerant: the rest of the setup stands alone.
if $PIP install -q --no-deps "nnunetv2==2.8.1" \
  && $PIP install -q "acvl-utils<0.3" batchgenerators batchgeneratorsv2 SimpleITK scikit-image \
    scikit-learn pandas tifffile imagecodecs yacs einops blosc2 graphviz seaborn requests tqdm; then
  # nnU-Net finds trainers only in its own trainer folder: the test asset's short trainer goes there.
  .venv/bin/python -c "import nnunetv2, shutil, pathlib; shutil.copyfile('tests/assets/nnunet/nnUNetTrainer_edgesegShort.py', pathlib.Path(nnunetv2.__path__[0]) / 'training' / 'nnUNetTrainer' / 'nnUNetTrainer_edgesegShort.py')" \
    || echo "warning: could not install the nnU-Net test trainer" >&2
else
  echo "warning: nnunetv2 not installed; tests/test_nnunet_import.py will skip" >&2
fi
# Triton (tests/test_triton.py and `edgeseg triton serve` skip/refuse without it). The gRPC client
# (the `triton` extra) and nvidia-pytriton's tritonserver binary; pytriton itself pins numpy<2 and
# protobuf<7 for its own Python API, which edgeseg does not use: the wheel --no-deps. Its Python
# backend stub is built against NumPy 1.x, so the stubs get NumPy 1.26 in a folder of their own
# (edgeseg.triton.server.stub_python_bin). Failure-tolerant like the block above.
if $PIP install -q --no-deps "tritonclient==2.73.0" "nvidia-pytriton==0.7.0" \
  && $PIP install -q "grpcio>=1.81.1" python-rapidjson packaging "ml-dtypes<=0.5.4" urllib3 \
  && $PIP install -q --no-deps --upgrade --target \
    "$(.venv/bin/python -c 'from edgeseg.triton.server import stub_site_packages as s; print(s())')" \
    "numpy==1.26.4"; then
  .venv/bin/python -c "from edgeseg.triton.server import find_install, stub_python_bin; find_install(); stub_python_bin(); print('tritonserver ready to start')" \
    || echo "warning: the tritonserver wheel cannot run here; tests/test_triton.py will skip" >&2
else
  echo "warning: Triton packages not installed; tests/test_triton.py will skip" >&2
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__)"  # 2.13.0+cpu expected here
.venv/bin/python -c "import edgeseg, onnxruntime; print('edgeseg', edgeseg.__version__, 'with onnxruntime', onnxruntime.__version__)"
