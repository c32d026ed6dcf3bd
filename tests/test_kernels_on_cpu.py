"""Every CUDA kernel executed on the CPU, under AddressSanitizer and UBSan (issue 13, item 1).

The real ``edgeseg/cuda/kernels/*.cu`` files are compiled with the system g++ against
tests/cuda_on_cpu/cuda_cpu.h (CUDA's execution model: grid and block loops, per-block shared
memory, ``__syncthreads`` as a real barrier between fibers, atomics, fp16 conversion) with
``-fsanitize=address,undefined,float-cast-overflow``. A child Python process, with ASan
preloaded, replaces cuda-python by the CPU model of tests/cuda_on_cpu/runtime.py, so the GPU
path's own code (``GpuPipeline``, ``module.Kernels.launch`` and its argument packing, graph
capture) launches them; the child runs tests/test_cuda_gpu.py's kernel tests (their numpy
references and tolerances, unchanged) and tests/cuda_on_cpu/cases_on_cpu.py (real series and
the awkward cases). Here, each of those must pass — none skipped — with no sanitizer report;
every kernel must have been launched; and two deliberately broken kernels must be caught.

Needs g++ with libasan/libubsan (Debian/Ubuntu: ``apt-get install g++``); no GPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from cuda_on_cpu import build  # noqa: E402

GPU_TESTS = [  # tests/test_cuda_gpu.py, run as they are on a GPU
    "tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference",
    "tests/test_cuda_gpu.py::test_postprocess_kernel_matches_reference",
    "tests/test_cuda_gpu.py::test_pipeline_plain_capture_replay_and_zero_copy_agree[3d]",
]
# The rest of test_cuda_gpu.py also passes on the CPU model, but takes minutes there (200-1000
# replays a test): EDGESEG_CPU_KERNELS_FULL=1 adds it. Not the CuPy/PyTorch test: those libraries
# need a real CUDA device to produce device arrays (cases_on_cpu covers __cuda_array_interface__).
GPU_TESTS_FULL = [
    "tests/test_cuda_gpu.py::test_graph_replay_equals_plain_launch_and_does_not_leak",
    "tests/test_cuda_gpu.py::test_pipeline_plain_capture_replay_and_zero_copy_agree",
]
CASES = "tests/cuda_on_cpu/cases_on_cpu.py"
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "CUDA-ON-CPU ERROR", "ERROR: LeakSanitizer")


def _case_names() -> list[str]:
    tree = ast.parse((REPO / CASES).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def _sanitizer_runtime() -> str:
    try:
        path = subprocess.run([build.CXX, "-print-file-name=libasan.so"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(
            f"these tests need a C++ compiler with AddressSanitizer ({build.CXX}: {exc}); apt-get install g++"
        )
    if not os.path.isabs(path) or not Path(path).is_file():
        pytest.fail(
            f"{build.CXX} has no libasan.so (got {path!r}); apt-get install g++ (libasan comes with it)"
        )
    return path


class ChildRun:
    """One sanitized child pytest run: per-test results, launched kernels, stderr."""

    def __init__(self, tmp: Path, targets: list[str], mutations: list[dict] | None = None,
                 timeout: int = 900) -> None:  # fmt: skip
        self.results_path, self.launched_path = tmp / "results.jsonl", tmp / "launched.json"
        self.metrics_path = tmp / "metrics.jsonl"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            LD_PRELOAD=_sanitizer_runtime(),
            # Python itself leaks by design at exit; everything else ASan checks stays on.
            ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
            EDGESEG_CPU_RESULTS=str(self.results_path),
            EDGESEG_CPU_LAUNCHED=str(self.launched_path),
            EDGESEG_CPU_METRICS=str(self.metrics_path),
            EDGESEG_CPU_KERNEL_MUTATION=json.dumps(mutations or []),
        )
        # --capture=sys: sanitizer reports are written to fd 2 by C code; pytest's default fd
        # capture would swallow them when the process aborts.
        cmd = [sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "cuda_on_cpu.plugin",
               "-p", "no:cacheprovider", "--rootdir", str(REPO), *targets]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.events = [json.loads(line) for line in self._lines(self.results_path)]
        self.launched = (
            set(json.loads(self.launched_path.read_text())) if self.launched_path.is_file() else set()
        )
        self.metrics = [json.loads(line) for line in self._lines(self.metrics_path)]

    @staticmethod
    def _lines(path: Path) -> list[str]:
        return path.read_text().splitlines() if path.is_file() else []

    def sanitizer_report(self) -> str:
        hits = [m for m in SANITIZER_MARKERS if m in self.stderr or m in self.stdout]
        return (self.stderr[-8000:] or self.stdout[-8000:]) if hits else ""

    def outcomes(self, prefix: str) -> dict[str, tuple[str, str]]:
        """nodeid -> (outcome, report) of every child test under ``prefix``; a test that started
        and never reported is "crashed" (a sanitizer or the CPU model aborted the process)."""
        out: dict[str, tuple[str, str]] = {}
        for e in self.events:
            nid = e["nodeid"]
            if not (nid == prefix or nid.startswith(prefix + "[")):
                continue
            if e["event"] == "start":
                out.setdefault(nid, ("crashed", self.stderr[-8000:]))
            else:
                prev = out.get(nid, ("passed", ""))
                if prev[0] in ("crashed", "passed"):  # the worst phase wins
                    out[nid] = (e["outcome"], e.get("longrepr", ""))
        return out


@pytest.fixture(scope="module")
def libraries():
    """Compile the four kernel files once (in parallel, before the child needs them)."""
    from edgeseg.cuda.nvrtc import KERNEL_FILES

    return build.compile_all(list(KERNEL_FILES))


@pytest.fixture(scope="module")
def child(libraries, tmp_path_factory) -> ChildRun:
    targets = GPU_TESTS + (GPU_TESTS_FULL if os.environ.get("EDGESEG_CPU_KERNELS_FULL") else []) + [CASES]
    run = ChildRun(tmp_path_factory.mktemp("cpu-kernels"), targets)
    if run.metrics:  # shown with -s; the numbers of the report
        print("\nkernels on the CPU — measured against the references:")
        for m in run.metrics:
            print("  " + json.dumps(m))
    return run


@pytest.mark.parametrize("name", [t for t in GPU_TESTS] + [f"{CASES}::{n}" for n in _case_names()])
def test_on_cpu_under_sanitizers(child, name):
    got = child.outcomes(name)
    assert got, (
        f"{name} did not run in the child (rc {child.returncode}):\n{child.stdout[-4000:]}{child.stderr[-4000:]}"
    )
    bad = {nid: o for nid, o in got.items() if o[0] != "passed"}
    assert not bad, "\n\n".join(f"{nid}: {o}\n{rep}" for nid, (o, rep) in bad.items())


def test_child_exits_cleanly_without_sanitizer_reports(child):
    report = child.sanitizer_report()
    assert not report, report
    assert child.returncode == 0, f"rc {child.returncode}:\n{child.stdout[-4000:]}\n{child.stderr[-4000:]}"
    skipped = [e["nodeid"] for e in child.events if e.get("outcome") == "skipped"]
    assert not skipped, f"skipped on the CPU model: {skipped}"


def test_every_kernel_was_launched(child, libraries):
    every = {k for lib in libraries for k in lib.kernels}
    assert len(every) >= 21
    missing = every - child.launched
    assert not missing, f"kernels never launched on the CPU: {sorted(missing)}"


def test_barrier_kernels_are_run_as_fibers(libraries):
    """The classification that decides serial vs fiber execution (a kernel reaching
    __syncthreads only through a helper, like zscore_* → block_add, counts)."""
    uses = {k: b for lib in libraries for k, b in lib.kernels.items() if b}
    assert set(uses) == {"radix_hist", "zscore_sum", "zscore_m2"}


# -- the checks can fail ---------------------------------------------------------------------------
OFF_BY_ONE = {  # gather_u8's bounds check lets one thread too many write
    "file": "postprocess.cu",
    "old": "for (i64 i = global_index(); i < total; i += global_stride()) {\n        const int x = (int)(i % nx);",
    "new": "for (i64 i = global_index(); i <= total; i += global_stride()) {\n        const int x = (int)(i % nx);",
}
NO_SYNC = {  # block_add's tree reduction without the barrier between its levels
    "file": "stats.cu",
    "old": "            sb[threadIdx.x] += sb[threadIdx.x + s];\n        }\n        __syncthreads();\n",
    "new": "            sb[threadIdx.x] += sb[threadIdx.x + s];\n        }\n",
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> ChildRun:
    # The reduction case first: the out-of-bounds write aborts the process where it happens.
    return ChildRun(
        tmp_path_factory.mktemp("cpu-kernels-broken"),
        ["tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference",
         f"{CASES}::test_pipeline_plain_captured_replayed[3d-oblique-pad-fp32]"],
        [OFF_BY_ONE, NO_SYNC],
    )  # fmt: skip


def test_missing_syncthreads_in_a_reduction_is_caught(broken):
    got = broken.outcomes("tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference")
    assert len(got) == 3, got
    # intensity1 is PercentileClip + ZScore: the only one that reduces through block_add
    fails = {nid for nid, (o, _) in got.items() if o == "failed"}
    assert fails == {"tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference[intensity1]"}, got
    assert "relative" in got[next(iter(fails))][1] or "assert" in got[next(iter(fails))][1]


def test_off_by_one_bounds_check_is_caught_by_asan(broken):
    got = broken.outcomes(f"{CASES}::test_pipeline_plain_captured_replayed")
    assert [o for o, _ in got.values()] == ["crashed"], got
    assert broken.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in broken.stderr, broken.stderr[-4000:]
    assert "postprocess.cu" in broken.stderr and "gather_u8" in broken.stderr, broken.stderr[-4000:]


EARLY_EXIT = {  # half of radix_hist's threads leave before the barrier the others wait at
    "file": "stats.cu",
    "old": "    for (int i = threadIdx.x; i < 4 * 256; i += blockDim.x) hist[i] = 0u;\n    __syncthreads();\n",
    "new": "    for (int i = threadIdx.x; i < 4 * 256; i += blockDim.x) hist[i] = 0u;\n"
    "    if (threadIdx.x >= 128) return;\n    __syncthreads();\n",
}


def test_barrier_some_threads_never_reach_is_caught(tmp_path):
    run = ChildRun(tmp_path, ["tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference[intensity1]"],
                   [EARLY_EXIT])  # fmt: skip
    assert [
        o for o, _ in run.outcomes("tests/test_cuda_gpu.py::test_preprocess_kernels_match_reference").values()
    ] == ["crashed"], run.stderr[-4000:]
    assert "CUDA-ON-CPU ERROR in kernel radix_hist" in run.stderr and "divergent barrier" in run.stderr, (
        run.stderr[-4000:]
    )
