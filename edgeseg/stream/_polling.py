"""One background-thread shape for the stream's workers: poll until stopped."""

from __future__ import annotations

import threading


class PollingThread:
    """Runs :meth:`poll` on a daemon thread until :meth:`stop`; waits ``poll_s`` whenever a poll
    did nothing (returned 0), and polls again at once when it did work."""

    stop_timeout_s: float = 10.0

    def _init_polling(self, name: str, poll_s: float) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def poll(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the thread to stop after the current poll and wait for it."""
        self._stop.set()
        self._thread.join(self.stop_timeout_s if timeout_s is None else timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.poll():
                self._stop.wait(self.poll_s)
