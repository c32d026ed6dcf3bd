"""Frame streams: cine DICOM replayed at its frame rate, or a video file / capture device.

2D per-frame segmentation with latest-frame-wins: the reader never waits for the model and
keeps only the newest frame, so a slow model drops frames instead of building a backlog.
Overlays are written as PNG; per-frame latency (frame ready → labels) is reported as p50/p99.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class LatestSlot:
    """A one-item mailbox: ``put`` replaces what is there (counting it as dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[int, np.ndarray, float] | None = None
        self._closed = False
        self.dropped = 0

    def put(self, index: int, frame: np.ndarray) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = (index, frame, time.perf_counter())
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def get(self, timeout_s: float = 1.0) -> tuple[int, np.ndarray, float] | None:
        """The newest frame (index, pixels, time put), or None once closed and empty."""
        with self._cond:
            while self._item is None and not self._closed:
                if not self._cond.wait(timeout_s):
                    return None
            item, self._item = self._item, None
            return item


def dicom_cine(path: str | Path, *, realtime: bool = True) -> Iterator[np.ndarray]:
    """Frames of a multi-frame DICOM, paced by (0018,1063) 'Frame Time' (ms) when ``realtime``."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        frames = ds.pixel_array
    except Exception as exc:
        raise ValueError(f"{path}: cannot read frames from this DICOM file ({type(exc).__name__})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        raise ValueError(f"{path}: palette-colour cine cannot be segmented (grayscale or RGB/YBR only)")
    if samples == 3:
        # Ultrasound and endoscopy cines are stored in colour; the models see luminance.
        # pydicom already converted YBR to RGB; Rec. 601 luma weights, as scanners use.
        frames = frames.reshape((-1, *frames.shape[-3:])) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if frames.ndim == 2:
        frames = frames[None]
    frame_s = float(ds.get("FrameTime", 0) or 0) / 1e3 or (1.0 / float(ds.get("CineRate", 0) or 25))
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        if realtime:
            time.sleep(max(0.0, start + i * frame_s - time.perf_counter()))
        yield np.asarray(frame)


def _opencv():
    from edgeseg._optional import require

    return require("cv2", extra="video", feature="Reading video files and capture devices ('--frames')")


def write_overlay(path: Path, bgr: np.ndarray) -> None:
    """Write an :func:`overlay` image as PNG with Pillow (a runtime dependency), atomically."""
    import io

    from edgeseg._optional import require
    from edgeseg.atomic import write_bytes_atomic

    image = require("PIL.Image", extra="", feature="Writing frame overlays")
    buf = io.BytesIO()
    image.fromarray(np.ascontiguousarray(bgr[..., ::-1])).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue(), fsync=False)


def video(source: str | int) -> Iterator[np.ndarray]:
    """Grayscale frames of a video file or capture device (OpenCV), at the source's own pace.

    Raises
    ------
    BackendError
        OpenCV is not installed (it is not a runtime dependency): the message says how to get it.
    """
    cv2 = _opencv()
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ValueError(f"'--frames' source cannot be opened by OpenCV: {source!r}")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
    finally:
        cap.release()


@dataclass
class FrameReport:
    """What a frame stream did: frames read, segmented and dropped, latency percentiles (ms)."""

    read: int = 0
    segmented: int = 0
    dropped: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else None

    @property
    def p99_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else None


def segmenter_frame_fn(segmenter) -> Callable[[np.ndarray], np.ndarray]:
    """A per-frame function from a Segmenter: the frame is a one-slice Volume."""
    from edgeseg.volume import Volume

    def segment(frame: np.ndarray) -> np.ndarray:
        return segmenter.segment(Volume.from_array(frame[None].astype(np.float32))).labels[0]

    return segment


def overlay(frame: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """An 8-bit BGR image: the frame windowed to its 1-99 percentiles, labels tinted red."""
    f = frame.astype(np.float32)
    lo, hi = np.percentile(f, (1, 99))
    g = np.clip((f - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    bgr = np.stack([g, g, g], axis=-1)
    mask = labels > 0
    bgr[mask] = (0.5 * bgr[mask] + 0.5 * np.array([0, 0, 255])).astype(np.uint8)
    return bgr


def run_frames(
    frames: Iterator[np.ndarray],
    segment: Callable[[np.ndarray], np.ndarray],
    out_dir: str | Path | None = None,
    *,
    every_overlay: int = 1,
) -> FrameReport:
    """Read ``frames`` on a thread, segment the latest one on this thread until the source ends.

    Parameters
    ----------
    frames:
        2D (y, x) arrays, e.g. :func:`dicom_cine` or :func:`video`.
    segment:
        (y, x) frame → (y, x) uint8 labels.
    out_dir:
        Where ``frame-NNNNNN.png`` overlays go (None: none written).
    every_overlay:
        Write one overlay every this many segmented frames.
    """
    slot = LatestSlot()
    report = FrameReport()

    def reader() -> None:
        try:
            for i, frame in enumerate(frames):
                slot.put(i, frame)
                report.read += 1
        finally:
            slot.close()

    thread = threading.Thread(target=reader, name="edgeseg-frames", daemon=True)
    thread.start()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    while True:
        item = slot.get()
        if item is None:
            if not thread.is_alive():
                break
            continue
        index, frame, t_put = item
        labels = segment(frame)
        report.latencies_ms.append((time.perf_counter() - t_put) * 1e3)
        report.segmented += 1
        if out is not None and report.segmented % every_overlay == 0:
            write_overlay(out / f"frame-{index:06d}.png", overlay(frame, labels))
    thread.join(5)
    report.dropped = slot.dropped
    return report
