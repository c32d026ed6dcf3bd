"""CUDA graph capture of a fixed sequence of launches, with a plain-launch fallback.

As trtexec does: run the work once normally (and synchronise) before capturing; capture in
thread-local mode; if anything fails during capture (an enqueue that cannot be captured),
abort it and keep launching plainly. A graph freezes shapes and addresses: build a new one
when either changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgeseg.cuda._api import check, runtime_module
from edgeseg.cuda.memory import Stream, capture_scope

log = logging.getLogger("edgeseg")


class GraphRunner:
    """Replays ``enqueue`` on ``stream``: as a CUDA graph once :meth:`capture` succeeded."""

    def __init__(self, stream: Stream, enqueue: Callable[[], None]) -> None:
        self._rt = runtime_module()
        self.stream = stream
        self.enqueue = enqueue
        self._graph = None
        self._exec = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def capture(self) -> bool:
        """Try to capture ``enqueue``; return whether replay will use a graph."""
        rt = self._rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            check(rt.cudaStreamBeginCapture(self.stream.stream, mode), "cudaStreamBeginCapture")
        except Exception as exc:
            log.info("CUDA graph capture unavailable (%s); launching plainly", exc)
            return False
        failure: Exception | None = None
        with capture_scope():  # frees requested until the capture has ended wait for its end
            self.stream.capturing = True  # Event.record turns into graph event nodes
            try:
                self.enqueue()
            except Exception as exc:  # noqa: BLE001 - any failure means: no graph
                failure = exc
            finally:
                self.stream.capturing = False
            err, graph = rt.cudaStreamEndCapture(self.stream.stream)  # always end, even after a failure
        if failure is not None or int(err) != 0 or graph is None:
            if graph is not None and int(err) == 0:
                rt.cudaGraphDestroy(graph)
            log.info("CUDA graph capture failed (%s); launching plainly", failure or err)
            return False
        err, exec_ = rt.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            rt.cudaGraphDestroy(graph)
            log.info("CUDA graph instantiation failed (%s); launching plainly", err)
            return False
        self._graph, self._exec = graph, exec_
        return True

    def run(self) -> None:
        if self._exec is not None:
            check(self._rt.cudaGraphLaunch(self._exec, self.stream.stream), "cudaGraphLaunch")
        else:
            self.enqueue()

    def close(self) -> None:
        if self._exec is not None:
            self._rt.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._graph is not None:
            self._rt.cudaGraphDestroy(self._graph)
            self._graph = None
