"""API contract without TensorRT or a GPU: the scan of every TensorRT / cuda-bindings name our
modules touch (checked against TensorRT's real 10.3 and 11.4 bindings in
test_tensorrt_real_bindings.py; cuda-bindings 12.x from tests/api_surfaces and the installed
13.x), nothing removed in TensorRT 11 is used; plus the engine cache's refusal of mismatched
engines."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from edgeseg._exceptions import BackendError, EngineMismatchError
from edgeseg.spec import Label, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
SURFACES = Path(__file__).parent / "api_surfaces"
TRT_MODULES = ["edgeseg/backends/tensorrt.py", "export/tensorrt_build.py", "edgeseg/backends/engine_cache.py"]
CUDA_MODULES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "edgeseg" / "cuda").glob("*.py"))
# Receiver names in our code → the TensorRT class they hold.
TRT_RECEIVERS = {
    "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
    "profile": "IOptimizationProfile", "err": "ParserError", "ctx": "IExecutionContext",
    "self.context": "IExecutionContext", "self.engine": "ICudaEngine", "self._runtime": "Runtime",
    "inp": "ITensor",
}  # fmt: skip
CUDA_RECEIVERS = {"rt": "runtime", "self._rt": "runtime", "runtime": "runtime", "drv": "driver",
                  "self._drv": "driver", "nv": "nvrtc", "self._nvrtc": "nvrtc"}  # fmt: skip
REMOVED_IN_11 = {"trt.BuilderFlag.FP16", "trt.BuilderFlag.INT8", "trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
                 "IBuilderConfig.int8_calibrator", "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8"}  # fmt: skip


def _surface(name: str) -> set[str]:
    lines = (SURFACES / name).read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _references(path: str, receivers: dict[str, str], module_alias: str | None) -> set[str]:
    """Every ``alias.X.Y`` and ``receiver.member`` in ``path`` (+ getattr(alias.X, "NAME"))."""
    tree = ast.parse((ROOT / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None:
                continue
            if (
                module_alias
                and dotted.startswith(module_alias + ".")
                and not isinstance(getattr(node, "ctx", None), ast.Store)
            ):
                found.add("trt" + dotted[len(module_alias) :])
            for recv, cls in receivers.items():
                if dotted.startswith(recv + ".") and dotted.count(".") == recv.count(".") + 1:
                    found.add(f"{cls}.{dotted[len(recv) + 1 :]}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            base, attr = _dotted(node.args[0]), node.args[1]
            if (
                module_alias
                and base
                and base.split(".")[0] == module_alias
                and isinstance(attr, ast.Constant)
            ):
                found.add("trt" + base[len(module_alias) :] + "." + attr.value)
    # Prefixes of longer chains (trt.Logger of trt.Logger.WARNING) are checked through the chain.
    return {n for n in found if not any(o.startswith(n + ".") for o in found)}


def _trt_refs() -> set[str]:
    refs: set[str] = set()
    for path in TRT_MODULES:
        refs |= _references(path, TRT_RECEIVERS, "trt")
    return refs


def test_scan_finds_the_tensorrt_calls():
    refs = _trt_refs()
    for must in ("IExecutionContext.execute_async_v3", "Runtime.deserialize_cuda_engine",
                 "Builder.build_serialized_network", "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                 "IBuilderConfig.set_timing_cache", "ParserError.node_operator"):  # fmt: skip
        assert must in refs


def test_nothing_removed_in_tensorrt_11_is_used():
    assert not (_trt_refs() & REMOVED_IN_11)
    # Attribute names and getattr strings anywhere in the code (docstrings may mention them).
    names = set()
    for path in TRT_MODULES:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
                and len(node.args) > 1
            ):
                names.add(getattr(node.args[1], "value", None))
    banned = {"FP16", "INT8", "int8_calibrator", "EXPLICIT_BATCH", "platform_has_fast_fp16", "platform_has_fast_int8",
              "platform_has_tf32"}  # fmt: skip
    assert not (names & banned)


def _cuda_refs() -> set[str]:
    refs: set[str] = set()
    for path in CUDA_MODULES + TRT_MODULES:
        for ref in _references(path, CUDA_RECEIVERS, None):
            refs.add(ref.split(".", 2)[0] + "." + ref.split(".", 2)[1])
    return refs


def test_every_cuda_bindings_name_exists_in_12x_surface():
    refs = _cuda_refs()
    assert (
        "runtime.cudaMemcpyAsync" in refs
        and "driver.cuLaunchKernel" in refs
        and "nvrtc.nvrtcGetCUBIN" in refs
    )
    missing = sorted(refs - _surface("cuda-bindings-12.x.txt"))
    assert not missing, f"not in cuda-bindings 12.x: {missing}"


def test_every_cuda_bindings_name_exists_in_installed_13x():
    bindings = pytest.importorskip("cuda.bindings")
    from cuda.bindings import driver, nvrtc, runtime

    assert int(bindings.__version__.split(".")[0]) >= 13
    mods = {"runtime": runtime, "driver": driver, "nvrtc": nvrtc}
    missing = sorted(r for r in _cuda_refs() if not hasattr(mods[r.split(".")[0]], r.split(".")[1]))
    assert not missing, f"not in cuda-bindings {bindings.__version__}: {missing}"


# -- engine cache ---------------------------------------------------------------------------------


def _spec() -> ModelSpec:
    return ModelSpec(dims=3, labels=[Label(1, "a")], patch_size=(32, 64, 64), batch_size=2)


def _key(**kw):
    from edgeseg.backends.engine_cache import EngineKey

    base = dict(trt_version="10.3.0", sm="sm_87", gpu="orin", onnx_sha256="ab" * 32, precision="int8")
    return EngineKey(**{**base, **kw})


def test_engine_is_built_once_then_cached(tmp_path):
    from edgeseg.backends.engine_cache import load_or_build

    calls, lines = [], []

    def fake_builder(onnx, spec, *, workspace_mb, timing_cache, echo):
        calls.append((onnx, workspace_mb, Path(timing_cache).name))
        return b"PLAN"

    args = (b"onnx", "ab" * 32, _spec(), "int8")
    plan, path, built = load_or_build(
        *args, key=_key(), root=tmp_path, builder=fake_builder, echo=lines.append, workspace_mb=512
    )
    assert (plan, built) == (b"PLAN", True) and calls == [(b"onnx", 512, "timing.cache")]
    assert path == tmp_path / "engines/10.3.0/sm_87_orin" / f"{'ab' * 32}-int8.plan"
    assert json.loads(path.with_suffix(".json").read_text())["sm"] == "sm_87"
    assert any("building it once" in s for s in lines)
    plan, _, built = load_or_build(*args, key=_key(), root=tmp_path, builder=fake_builder, echo=lines.append)
    assert (plan, built, len(calls)) == (b"PLAN", False, 1)


def test_mismatched_engine_is_refused_naming_both_sides(tmp_path):
    from edgeseg.backends.engine_cache import check_bundle_engine, check_metadata, load_or_build

    load_or_build(
        b"o", "ab" * 32, _spec(), "int8", key=_key(), root=tmp_path, builder=lambda *a, **k: b"P", echo=print
    )
    meta_path = next(tmp_path.rglob("*.json"))
    meta = json.loads(meta_path.read_text())
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.3\.0 for sm_87.*TensorRT 11\.1\.0 on sm_90"):
        check_metadata(meta, _key(trt_version="11.1.0", sm="sm_90", gpu="h100"), "x")
    meta["sm"] = "sm_89"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(EngineMismatchError, match="sm_89.*sm_87"):
        load_or_build(b"o", "ab" * 32, _spec(), "int8", key=_key(), root=tmp_path, builder=None)
    with pytest.raises(EngineMismatchError, match="TensorRT 10.16.1"):
        check_bundle_engine("engines/10.16.1/sm_87/int8.plan", _key())
    check_bundle_engine("engines/10.3.0/sm_87/int8.plan", _key())


def test_profile_shapes_follow_the_spec():
    from edgeseg.export.tensorrt_build import profile_shapes

    assert profile_shapes(_spec()) == ((1, 1, 32, 64, 64), (2, 1, 32, 64, 64), (2, 1, 32, 64, 64))
    two_d = ModelSpec(dims=2, labels=[Label(1, "a")], target_shape=(250, 250), divisible_by=16, batch_size=8)
    assert profile_shapes(two_d) == ((1, 1, 256, 256), (8, 1, 256, 256), (8, 1, 256, 256))
    dyn = ModelSpec(dims=3, labels=[Label(1, "a")], divisible_by=16)
    lo, opt, hi = profile_shapes(dyn, ("N", 1, "D", 96, "W"))
    assert lo == (1, 1, 32, 96, 32) and hi == (1, 1, 256, 96, 256)  # whole volumes stop at 256 per axis


def test_parser_errors_become_one_sentence():
    from edgeseg.export.tensorrt_build import parser_error_sentence

    class Err:
        def node(self):
            return 7

        def node_name(self):
            return "/enc/conv3"

        def node_operator(self):
            return "ConvTranspose"

        def desc(self):
            return "kernel weights must be initializers"

    class Parser:
        num_errors = 2

        def get_error(self, i):
            return Err()

    msg = parser_error_sentence(Parser())
    assert msg == ("TensorRT cannot parse ONNX node '/enc/conv3' (operator ConvTranspose): "
                   "kernel weights must be initializers (1 more error(s))")  # fmt: skip


def test_tensorrt_backend_refuses_clearly_without_tensorrt():
    pytest.importorskip("cuda.bindings")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from edgeseg.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError, match=r"pip install 'edgeseg\[gpu\]'"):
        TensorRTBackend(b"plan")


def test_engine_cache_key_names_the_optimization_profile(tmp_path):
    """One ONNX shipped with two specs whose profiles differ must not share an engine: the
    second would be refused at set_input_shape (outside its profile) on the device."""
    from dataclasses import replace

    from edgeseg.backends.engine_cache import load_or_build, profile_id
    from edgeseg.export.tensorrt_build import profile_shapes

    spec = _spec()
    other = replace(spec, batch_size=4)
    assert profile_shapes(spec) != profile_shapes(other)
    assert profile_id(spec) != profile_id(other) and profile_id(spec) == profile_id(replace(spec))
    assert profile_id(spec) == profile_id(replace(spec, overlap=0.75))  # not a profile input
    builds = []

    def builder(onnx, s, **kw):
        builds.append(s.batch_size)
        return f"PLAN{s.batch_size}".encode()

    paths = []
    for s in (spec, other, spec):
        key = _key(profile=profile_id(s))
        plan, path, _ = load_or_build(
            b"o", "ab" * 32, s, "int8", key=key, root=tmp_path, builder=builder, echo=print
        )
        assert plan == f"PLAN{s.batch_size}".encode()
        paths.append(path)
    assert builds == [2, 4] and paths[0] == paths[2] != paths[1]
    assert json.loads(paths[1].with_suffix(".json").read_text())["profile"] == profile_id(other)
