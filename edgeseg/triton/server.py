"""Start the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, on one box.

A convenience for a single machine and for the tests; production runs NVIDIA's container. What
the wheel needs that it does not do by itself (measured):

- the Python-backend stub for *this* interpreter's version lives in ``python_backend_stubs/``
  and must be copied into ``backends/python/`` of a backends folder (we build one, next to
  the repository, by linking the wheel's files);
- the stub links ``libpython3.X.so``: ``LD_LIBRARY_PATH`` must name this interpreter's lib
  folder first, or the system's libpython (another build, or none) is picked up;
- the server and its backends link the wheel's bundled libraries (``nvidia_pytriton.libs``);
- the stub's embedded Python finds its ``sys.prefix`` from the ``python3`` first on ``PATH``:
  this environment's ``bin`` goes first so the models import edgeseg and its engines;
- the wheel's stub (0.7.0) is built against NumPy 1.x: under NumPy 2 it reads every input
  tensor as its first element repeated and returns empty outputs, silently. Where this
  environment has NumPy 2, the stubs run in a small venv (:func:`stub_python_bin`) with
  NumPy 1.26 first and this environment's packages (edgeseg, ONNX Runtime, OpenVINO) after;
- shutdown after SIGTERM takes 1–10 s.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from edgeseg._exceptions import BackendError

WHEEL = "nvidia-pytriton"


@dataclass
class TritonInstall:
    """Where the wheel's server binary, backends, stub and bundled libraries are."""

    binary: Path
    backends: Path
    stub: Path
    libs: Path


def find_install() -> TritonInstall:
    """The wheel's files, or :class:`BackendError` saying what is missing and how to install it."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise BackendError(
            "the tritonserver binary comes from the 'nvidia-pytriton' wheel, which is not installed: "
            "pip install --no-deps nvidia-pytriton (or use NVIDIA's tritonserver container)"
        ) from None
    root = Path(str(dist.locate_file("pytriton"))) / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = TritonInstall(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=Path(str(dist.locate_file("nvidia_pytriton.libs"))),
    )
    for what, path in (("server binary", found.binary), (f"Python {version} stub", found.stub)):
        if not path.exists():
            raise BackendError(f"the nvidia-pytriton wheel has no {what} at {path}")
    return found


def backends_dir(install: TritonInstall, where: Path) -> Path:
    """A backends folder whose ``python/`` holds the wheel's backend plus this interpreter's stub."""
    out = where / "backends"
    py = out / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (install.backends / "python").iterdir():
        if src.is_file():
            _link_or_copy(src, py / src.name)
    _link_or_copy(install.stub, py / "triton_python_backend_stub")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


STUB_ENV_VAR = "EDGESEG_TRITON_STUB_ENV"


def stub_env_dir() -> Path:
    return Path(os.environ.get(STUB_ENV_VAR) or Path(sys.prefix) / "triton-stub-env")


def stub_site_packages() -> Path:
    """Where NumPy 1.x for the stubs goes (``pip install --no-deps --target THIS numpy==1.26.4``)."""
    v = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return stub_env_dir() / "lib" / v / "site-packages"


def stub_python_bin() -> Path:
    """The ``bin`` folder whose ``python3`` gives the stubs their ``sys.prefix``.

    With NumPy 1.x here, this environment's own. With NumPy 2, a small venv of the same base
    interpreter whose site-packages holds NumPy 1.26 and then (by a .pth) this environment's
    site-packages: the stubs get NumPy 1.x and everything else from here. The stub ignores
    ``PYTHONPATH``, so a prefix of its own is the way to put a package first for it alone."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    env, site_dir = stub_env_dir(), stub_site_packages()
    if not any(site_dir.glob("numpy-1.*.dist-info")):
        raise BackendError(
            "the Triton Python stub of nvidia-pytriton is built against NumPy 1.x and this environment "
            f"has NumPy {numpy.__version__} (it would read every tensor wrong): install NumPy 1.26 for the "
            f"stub alone with '{sys.executable} -m pip install --no-deps --target {site_dir} "
            "numpy==1.26.4' (scripts/setup.sh does)"
        )
    if not (env / "pyvenv.cfg").exists():
        import venv

        venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    import site

    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # addsitedir also runs this environment's .pth files (an editable edgeseg install's finder).
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
    pth = site_dir / "zz-edgeseg-main-env.pth"
    if not pth.exists() or pth.read_text() != lines:
        pth.write_text(lines)
    return env / "bin"


def server_env(install: TritonInstall) -> dict[str, str]:
    """The environment tritonserver and its Python stubs need (see the module docstring)."""
    env = os.environ.copy()
    py_lib = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (py_lib, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = f"{stub_python_bin()}:{env.get('PATH', '')}"
    # The models import edgeseg from wherever this process imports it (a source checkout too).
    import edgeseg

    src_root = str(Path(edgeseg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = ":".join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
    return env


class TritonServer:
    """A running tritonserver on ``host``; stop it with :meth:`stop` (or use it as a context)."""

    def __init__(
        self,
        repo: str | Path,
        *,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int | None = 8002,
        host: str = "127.0.0.1",
        work_dir: str | Path | None = None,
        log_file: str | Path | None = None,
        extra_args: list[str] | None = None,
    ):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise BackendError(f"{repo}: no such model repository folder")
        self.host, self.grpc_port, self.http_port, self.metrics_port = (
            host,
            grpc_port,
            http_port,
            metrics_port,
        )
        self.work_dir = Path(work_dir) if work_dir else self.repo.parent / f".{self.repo.name}-tritonserver"
        self.log_file = Path(log_file) if log_file else self.work_dir / "tritonserver.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, install: TritonInstall) -> list[str]:
        args = [
            str(install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends_dir(install, self.work_dir)}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=" + ("true" if self.metrics_port else "false"),
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        if self.metrics_port:
            args += [f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        return args + self.extra_args

    def start(self, *, wait_s: float = 120.0) -> TritonServer:
        """Start the server and wait until every model is ready (or raise with its log's tail)."""
        install = find_install()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 (the child keeps writing to it)
        self.proc = subprocess.Popen(
            self.command(install),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(install),
            start_new_session=True,  # its stubs are its children: one group to signal
        )
        log.close()
        self.wait_ready(wait_s)
        return self

    def wait_ready(self, wait_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + wait_s
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BackendError(f"tritonserver exited with code {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback URL we built)
                    if r.status == 200:
                        return
            time.sleep(0.25)
        self.stop()
        raise BackendError(f"tritonserver was not ready after {wait_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a crash, for tests)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (a clean shutdown takes 1–10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
