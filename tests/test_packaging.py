"""The runtime stays light: importing it (and every runtime module) never loads build-time or GPU
libraries, and every CLI command answers --help."""

import pkgutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

HEAVY = ("torch", "onnx", "tensorrt", "cuda", "onnxscript", "onnxconverter_common")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_edgeseg_is_light():
    assert _loaded_after("import edgeseg") == []
    assert _loaded_after("import edgeseg.cli") == []


def test_every_runtime_module_imports_without_build_or_gpu_libraries():
    import edgeseg

    runtime = [
        m.name
        for m in pkgutil.walk_packages(edgeseg.__path__, "edgeseg.")
        if not m.name.startswith(("edgeseg.export", "edgeseg.calib", "edgeseg.__main__"))
    ]
    assert "edgeseg.segmenter" in runtime
    code = "\n".join(f"import {name}" for name in runtime)
    assert _loaded_after(code) == []


@pytest.mark.parametrize("command", [[], ["build-engine"], ["run"], ["info"], ["bench"]])
def test_cli_help(command):
    from edgeseg.cli import main

    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output
