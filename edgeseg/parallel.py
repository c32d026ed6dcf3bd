"""Memory-bound numpy loops split across the engine's threads (numpy releases the GIL in them).

Preprocessing, the blend and postprocessing run while the engine is idle, so its threads are
free then; each part writes its own rows of one output, so the result is the same floats.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

SPLIT_MIN = 1 << 17  # elements of work below which splitting it across threads does not pay
PLANE_MIN = 1 << 18  # elements per call below which a Python loop of calls gains nothing from threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def plane_threads(plane: int, threads: int) -> int:
    """Threads for a Python loop of numpy calls on ``plane`` elements each: 1 for small planes,
    whose calls are too short to run while the other threads hold the GIL."""
    return threads if plane >= PLANE_MIN else 1


def split_rows(n: int, threads: int, fn: Callable[[slice], None], work: int) -> None:
    """``fn`` over ``threads`` contiguous parts of ``range(n)`` at once, or ``fn(slice(0, n))``
    here when there is little ``work`` (elements) or one thread."""
    parts = min(threads, n)
    if parts <= 1 or work < SPLIT_MIN:
        fn(slice(0, n))
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < parts - 1:  # noqa: SLF001 (no public size)
            _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="edgeseg-split")
    bounds = [n * i // parts for i in range(parts + 1)]
    # the caller takes the first part itself: one thread fewer to wake, and none idles waiting
    rest = [_pool.submit(fn, slice(a, b)) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        fn(slice(bounds[0], bounds[1]))
    finally:
        for f in rest:
            f.result()
