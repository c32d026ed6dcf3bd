"""Frame streams: cine DICOM at its frame rate and an OpenCV video, latest-frame-wins."""

from __future__ import annotations

import time

import numpy as np

from edgeseg.stream.frames import dicom_cine, run_frames, video


def _slow_threshold(delay_s: float):
    seen: list[int] = []

    def segment(frame: np.ndarray) -> np.ndarray:
        time.sleep(delay_s)  # a model slower than the frame rate
        seen.append(int(frame.sum()))
        return (frame > np.percentile(frame, 70)).astype(np.uint8)

    return segment, seen


def test_cine_replay_drops_frames_instead_of_queueing(dicom_data, tmp_path):
    cine = dicom_data / "pydicom" / "mr" / "emri_small.dcm"  # 10 frames, 25 fps by default
    segment, seen = _slow_threshold(0.1)
    t = time.perf_counter()
    report = run_frames(dicom_cine(cine), segment, tmp_path / "overlays")
    elapsed = time.perf_counter() - t
    assert report.read == 10
    assert report.segmented + report.dropped == 10 and report.dropped > 0
    assert elapsed < 10 * 0.1  # never worked through a backlog
    # The newest frame is always the one segmented last.
    import pydicom

    last = pydicom.dcmread(str(cine)).pixel_array[-1]
    assert seen[-1] == int(last.sum())
    assert report.p50_ms is not None and report.p99_ms >= report.p50_ms
    assert len(list((tmp_path / "overlays").glob("frame-*.png"))) == report.segmented


def test_video_file_through_opencv(dicom_data, tmp_path):
    import cv2
    import pydicom

    frames = pydicom.dcmread(str(dicom_data / "pydicom" / "mr" / "emri_small.dcm")).pixel_array
    path = tmp_path / "cine.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 64), isColor=False)
    for f in frames:
        writer.write(cv2.normalize(f, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    writer.release()
    segment, _ = _slow_threshold(0.0)
    report = run_frames(video(str(path)), segment, None)
    assert report.read == 10 and report.segmented >= 1
