"""Smoke test for benchmarks/bench_pipelines.py: a tiny model on one real CT slice, once."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_path


def _load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    path = REPO / "benchmarks" / "bench_pipelines.py"
    spec = importlib.util.spec_from_file_location("bench_pipelines", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_pipelines"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_smallest_pipeline_writes_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    shared_path("dicom", "pydicom", "ct", "CT_small.dcm")
    monkeypatch.setenv("EDGESEG_BENCH_TINY", "1")  # adds the tiny case (workers inherit it)
    bench = _load_bench()
    args = bench.parse_args(
        [
            "--quick",
            "--models",
            "tiny_ct",
            "--pipelines",
            "edgeseg_fp32",
            "--no-profile",
            "--import-repeats",
            "0",
        ]
        + ["--out", str(tmp_path)]
    )
    doc = bench.run(args)
    text = bench.report(doc, tmp_path)

    assert "| tiny_ct | edgeseg_fp32 |" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    pipes = {p["name"]: p for p in saved["models"][0]["pipelines"]}
    assert pipes["edgeseg_fp32"]["median_ms"]["e2e"] > 0
    assert pipes["edgeseg_fp32"]["peak_rss_mib"] > 0
    assert (tmp_path / "pipelines.png").stat().st_size > 0
