"""Poison isolation: series are read, decoded and segmented in a child process that may die.

A corrupt file can do more than raise: a native decoder can panic (pylibjpeg-rle raises
``pyo3_runtime.PanicException``, a BaseException), crash the interpreter (SIGSEGV, abort) or
never return. In the service's own process any of these stops every later series. So the
processor runs in one long-lived child (``spawn``: forking a process that holds CUDA contexts
and threads is unsafe), which opens the model once and takes one series per request. When the
child dies or overruns the per-series time limit, the parent kills it, that series alone fails
with one sentence, and the next series gets a fresh child.

The child is built from a *factory*, ``"module:function"`` (or ``"file.py:function"``) plus keyword arguments, imported
in the child; it returns ``processor(files, out_dir) -> outcome``. Only the Python API takes a
factory (tests load their crashing processors this way); the CLI always uses
:func:`segmenter_factory`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from edgeseg.stream._log import event

# Interrupt-like exceptions are never swallowed: they mean "stop", not "bad series".
_STOP_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def default_time_limit_s(n_files: int) -> float:
    """Generous: a slow CPU segments a large volume in well under this; a hang is far beyond."""
    return max(120.0, 2.0 * n_files)


def segmenter_factory(
    bundle: str,
    *,
    backend: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    formats: Sequence[str] = ("seg",),
) -> Callable[[list[Path], Path], Any]:
    """The production child: a Segmenter opened once, :func:`edgeseg.run.process_series` per series."""
    from edgeseg.run import process_series
    from edgeseg.segmenter import Segmenter

    segmenter = Segmenter.open(bundle, backend=backend, precision=precision, threads=threads)
    fmt = tuple(formats)

    def process(files: list[Path], out_dir: Path):
        return process_series(segmenter, files, out_dir, formats=fmt)

    return process


def _load_factory(spec: str) -> Callable[..., Callable]:
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(f"a processor factory is 'module:function' or 'file.py:function'; got {spec!r}")
    if module.endswith(".py"):  # a file by path (tests keep their crashing processors there)
        loader_spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load {module}")
        mod = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(mod)
        return getattr(mod, name)
    return getattr(importlib.import_module(module), name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _child_main(conn: Connection, factory: str, kwargs: dict) -> None:
    # The parent decides when the child stops (it closes the pipe); a Ctrl-C or a SIGTERM sent
    # to the whole process group must not kill a series half-way and get it quarantined.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        processor = _load_factory(factory)(**kwargs)
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        try:
            conn.send(("error", exc))
        except Exception:  # noqa: BLE001 (an exception that does not pickle: send its text)
            conn.send(("error", RuntimeError(_one_line(exc))))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        if request is None:
            return
        files, out_dir = request
        try:
            conn.send(("outcome", processor(files, out_dir)))
        except _STOP_EXCEPTIONS:
            raise
        except BaseException as exc:  # noqa: BLE001 (a native panic: report it, then exit)
            conn.send(("raised", _one_line(exc)))
            if not isinstance(exc, Exception):
                return  # native code unwound through us: a fresh child for the next series


class IsolatedProcessor:
    """A processor that runs ``factory(**kwargs)``'s processor in a child process.

    Parameters
    ----------
    factory:
        ``"module:function"`` importable in the child; called once per child with ``kwargs``.
    kwargs:
        Picklable keyword arguments for the factory.
    time_limit_s:
        Seconds one series may take; None: :func:`default_time_limit_s` of its file count.
    start_timeout_s:
        Seconds the child may take to open its model (a TensorRT engine build can be slow).

    Calling it returns the child's outcome, or a ``failed`` outcome (edgeseg.run.SeriesOutcome)
    saying that the child crashed or overran. It raises only when a fresh child cannot start,
    which the worker retries later like any transient failure.
    """

    def __init__(
        self,
        factory: str,
        kwargs: dict | None = None,
        *,
        time_limit_s: float | None = None,
        start_timeout_s: float = 1800.0,
    ):
        self.factory = factory
        self.kwargs = dict(kwargs or {})
        self.time_limit_s = time_limit_s
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self.starts = 0
        self.last_start_ms: float | None = None

    # -- child life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child now (else the first series does); raises the factory's exception."""
        if self._proc is not None and self._proc.is_alive():
            return
        self._discard()
        t0 = time.perf_counter()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main, args=(child, self.factory, self.kwargs), name="edgeseg-series", daemon=True
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            kind, payload = self._receive(self.start_timeout_s)
        except _ChildGone as gone:
            self._discard()
            raise RuntimeError(f"the segmentation process did not start ({gone})") from None
        if kind == "error":
            self._discard()
            raise payload
        self.starts += 1
        self.last_start_ms = (time.perf_counter() - t0) * 1e3
        event("series_process_started", pid=payload, start_ms=round(self.last_start_ms, 1))

    def close(self) -> None:
        """Ask the child to exit (it finishes nothing: it is idle between series), then reap it."""
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
        if self._proc is not None:
            self._proc.join(5)
        self._discard()

    def _discard(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def __enter__(self) -> IsolatedProcessor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- one series ------------------------------------------------------------------------------
    def __call__(self, files: list[Path], out_dir: Path):
        from edgeseg.run import SeriesOutcome

        self.start()
        files = [Path(f) for f in files]
        source = str(files[0].parent) if files else "<no files>"
        limit = self.time_limit_s if self.time_limit_s is not None else default_time_limit_s(len(files))
        assert self._conn is not None
        try:
            self._conn.send((files, Path(out_dir)))
            kind, payload = self._receive(limit)
        except _ChildGone as gone:
            self._discard()
            return SeriesOutcome(source, "failed", error=f"{source}: {gone}; set aside so the others go on")
        except (OSError, ValueError) as exc:  # the pipe broke as we sent: the child is gone
            self._discard()
            return SeriesOutcome(source, "failed", error=f"{source}: the child process was lost ({exc})")
        if kind == "raised":
            if self._proc is not None and not self._wait_alive():
                self._discard()
            return SeriesOutcome(source, "failed", error=f"{source}: processing failed ({payload})")
        return payload

    def _wait_alive(self) -> bool:
        # After a BaseException the child exits by itself; give it a moment to do so.
        self._proc.join(0.5)
        return self._proc.is_alive()

    def _receive(self, timeout_s: float) -> tuple[str, Any]:
        """The child's next message; raises _ChildGone when it dies or overruns ``timeout_s``."""
        assert self._conn is not None and self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._proc.kill()
                self._proc.join(10)
                raise _ChildGone(f"processing took longer than the {timeout_s:.0f} s limit and was stopped")
            try:
                if self._conn.poll(min(left, 0.5)):
                    return self._conn.recv()
                gone = not self._proc.is_alive()
            except (EOFError, OSError):
                gone = True  # the pipe closed: the child is gone, its exit code says how
            if gone:
                self._proc.join(5)
                raise _ChildGone(_death(self._proc.exitcode))


class _ChildGone(Exception):
    pass


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (killed, e.g. for lack of memory)" if name == "SIGKILL" else ""
        return f"the process decoding and segmenting it crashed ({name}){hint}"
    return f"the process decoding and segmenting it exited unexpectedly (exit code {exitcode})"
