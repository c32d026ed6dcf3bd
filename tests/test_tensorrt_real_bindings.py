"""Every TensorRT call the code makes, checked against the real Python bindings of both majors.

PyPI ships TensorRT's bindings as wheels without libnvinfer: ``tensorrt-cu12-bindings==10.3.0``
(JetPack 6) and ``==11.4.0.106``. Each is installed into a cache folder, imported in a child
interpreter over stub libraries that only define the C entry points it links against
(tests/trt_bindings/stub_libnvinfer.c), and its surface read: every class, method, property and
enum member, and each callable's parameter names. Then every ``trt.*`` name and receiver method
the code uses must exist, with the keyword arguments it passes and no more positional ones
than some overload takes. Skipped with the reason where pip or a C compiler is unavailable.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_tensorrt_contract import REMOVED_IN_11, ROOT, TRT_MODULES, TRT_RECEIVERS, _dotted, _trt_refs

HERE = Path(__file__).parent / "trt_bindings"
WHEELS = {"10.3": "tensorrt-cu12-bindings==10.3.0", "11.4": "tensorrt-cu12-bindings==11.4.0.106"}
CACHE = Path(os.environ.get("EDGESEG_TEST_CACHE", Path.home() / ".cache" / "edgeseg-tests")) / "trt-bindings"


def _install(version: str) -> Path:
    target = CACHE / version
    if not (target / "tensorrt_bindings" / "tensorrt.so").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(tmp),
            WHEELS[version],
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"cannot install {WHEELS[version]}: {r.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _stubs(major: str) -> Path:
    out = CACHE / f"stubs-{major}"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub libnvinfer")
    out.mkdir(parents=True, exist_ok=True)
    for lib in ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin"):
        so = out / f"{lib}.so.{major}"
        if not so.exists():
            cmd = [
                cc,
                "-shared",
                "-fPIC",
                f"-Wl,-soname,{so.name}",
                "-o",
                str(so),
                str(HERE / "stub_libnvinfer.c"),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module", params=sorted(WHEELS))
def surface(request) -> dict:
    version = request.param
    site = _install(version)
    env = {**os.environ, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": str(_stubs(version.split(".")[0]))}
    r = subprocess.run(
        [sys.executable, str(HERE / "dump_surface.py")], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, f"the {version} bindings do not load over the stubs: {r.stderr[-2000:]}"
    doc = json.loads(r.stdout)
    assert doc["version"].startswith(version)
    return {"version": version, "names": set(doc["names"]), "signatures": doc["signatures"]}


def _calls(source: str) -> list[tuple[str, int, set[str], int]]:
    """(reference, positional count, keyword names, line) of every TensorRT call in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted is None:
            continue
        ref = None
        if dotted.startswith("trt."):
            ref = dotted
        for recv, cls in TRT_RECEIVERS.items():
            if dotted.startswith(recv + ".") and dotted.count(".") == recv.count(".") + 1:
                ref = f"{cls}.{dotted[len(recv) + 1 :]}"
        if ref and not any(isinstance(a, ast.Starred) for a in node.args):
            kws = {k.arg for k in node.keywords if k.arg}
            out.append((ref, len(node.args), kws, node.lineno))
    return out


def _problems(calls, surface) -> list[str]:
    bad = []
    for ref, npos, kws, line in calls:
        if ref not in surface["names"]:
            bad.append(f"line {line}: {ref} does not exist")
            continue
        overloads = surface["signatures"].get(ref)
        if not overloads:  # a property, an enum value or a class without a readable signature
            continue
        if not any(kws <= set(params) and npos <= len(params) for params in overloads):
            bad.append(
                f"line {line}: {ref}({npos} positional, keywords {sorted(kws)}) fits none of {overloads}"
            )
    return bad


def test_every_tensorrt_name_the_code_uses_exists(surface):
    refs = _trt_refs()
    assert len(refs) > 30  # the scan sees the code
    missing = sorted(r for r in refs if r not in surface["names"])
    assert not missing, f"not in TensorRT {surface['version']}: {missing}"


def test_every_tensorrt_call_matches_a_real_signature(surface):
    problems, n = [], 0
    for path in TRT_MODULES:
        calls = _calls((ROOT / path).read_text())
        n += len(calls)
        problems += [f"{path} {p}" for p in _problems(calls, surface)]
    assert n > 20
    assert not problems, f"TensorRT {surface['version']}:\n" + "\n".join(problems)


def test_a_misspelled_or_misused_call_fails_the_check(surface):
    source = (
        "ctx.execute_async_v4(stream)\n"  # no such method
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit=1 << 30)\n"  # wrong keyword
        "ctx.set_tensor_address('x', 0, 1)\n"  # one argument too many
        "ctx.set_tensor_address('x', 0)\n"  # right
    )
    problems = _problems(_calls(source), surface)
    assert len(problems) == 3 and "execute_async_v4 does not exist" in problems[0], problems


def test_what_tensorrt_11_removed_is_really_gone(surface):
    removed = {r for r in REMOVED_IN_11 if r in surface["names"]}
    if surface["version"] == "11.4":
        assert removed == set()
        assert "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED" in surface["names"]
    else:  # 10.3 still has the builder flags and calibrators the code must not use
        assert {"trt.BuilderFlag.FP16", "trt.BuilderFlag.INT8"} <= removed
