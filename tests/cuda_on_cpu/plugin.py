"""pytest plugin for the sanitized child process: the CPU model of CUDA replaces cuda-python.

Loaded with ``-p cuda_on_cpu.plugin`` (plugins load before conftest.py and the test modules),
so ``edgeseg.cuda`` and the GPU tests see a device and run every kernel through cuda_cpu.h.
``EDGESEG_CPU_KERNEL_MUTATION`` (JSON ``{"file", "old", "new"}`` or a list of them) compiles a broken
copy of a kernel file instead of the real one, for the tests that prove the checks can fail.
Results go to ``EDGESEG_CPU_RESULTS`` (JSON lines), launched kernel names to ``EDGESEG_CPU_LAUNCHED``.
"""

from __future__ import annotations

import json
import os
import tempfile

from . import runtime

# edgeseg's cubin cache would keep the path of a library built from an older cuda_cpu.h (its
# key is the kernel source only); build.py has its own cache keyed by everything.
os.environ["EDGESEG_CACHE"] = tempfile.mkdtemp(prefix="edgeseg-cpu-cubins-")
DEVICE = runtime.install()


def _write(record: dict) -> None:
    # One JSON line per event, flushed at once: if a sanitizer aborts the process, the parent
    # still knows which case was running.
    path = os.environ.get("EDGESEG_CPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _write({"nodeid": nodeid, "event": "start"})


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        _write({"nodeid": report.nodeid, "event": report.when, "outcome": report.outcome,
                "longrepr": str(report.longrepr)[-6000:] if report.longrepr else ""})  # fmt: skip


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("EDGESEG_CPU_LAUNCHED")
    if path:
        with open(path, "w") as f:
            json.dump(sorted(set(DEVICE.launches)), f)
