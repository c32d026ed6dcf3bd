"""scripts/gpu_check.sh: one line and exit 2 without a GPU; every name it imports exists."""

from __future__ import annotations

import ast
import importlib
import subprocess
from pathlib import Path

import pytest
from gpu_util import gpu_skip_reason

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_in_one_line():
    if gpu_skip_reason() is None:
        pytest.skip("a GPU is here: run scripts/gpu_check.sh itself")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU ("), r.stdout


def test_every_name_the_script_imports_exists():
    tree = ast.parse((ROOT / "scripts" / "gpu_check.py").read_text())
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeseg"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name} does not exist"
                checked += 1
    assert checked >= 15
    # The pipeline internals it drives (not imported by name).
    from edgeseg.cuda.pipeline import GpuPipeline

    for attr in ("_stage_source", "_preprocess_program"):
        assert hasattr(GpuPipeline, attr)
