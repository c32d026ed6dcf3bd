"""Issue 10's fixes found by reading: optional OpenCV through require(), and CLI registration."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from edgeseg._exceptions import BackendError


def test_video_without_opencv_says_how_to_install_it(monkeypatch):
    from edgeseg.stream import frames

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'edgeseg\[video\]'"):
        next(frames.video("clip.avi"))


def test_frame_overlays_need_no_opencv(monkeypatch, tmp_path):
    from PIL import Image

    from edgeseg.stream import frames

    monkeypatch.setitem(sys.modules, "cv2", None)
    frame = np.arange(64 * 48, dtype=np.float32).reshape(48, 64)
    labels = (frame > frame.mean()).astype(np.uint8)
    report = frames.run_frames(iter([frame, frame]), lambda f: labels, tmp_path, every_overlay=1)
    pngs = sorted(tmp_path.glob("frame-*.png"))
    assert report.segmented >= 1 and len(pngs) == report.segmented
    rgb = np.asarray(Image.open(pngs[0]))
    assert rgb.shape == (48, 64, 3)
    assert (rgb[labels > 0][:, 0] > rgb[labels > 0][:, 2]).all()  # labels tinted red, not blue


def test_every_command_is_registered():
    from edgeseg.cli import main

    assert {"build-engine", "run", "info", "validate", "bench"} <= set(main.commands)


def test_a_broken_command_module_is_an_error_naming_it(monkeypatch):
    import edgeseg.cli

    monkeypatch.setitem(sys.modules, "edgeseg.cli.bench", None)
    with pytest.raises(ImportError, match="'bench' command cannot be loaded"):
        importlib.reload(edgeseg.cli)
    monkeypatch.undo()
    importlib.reload(edgeseg.cli)
