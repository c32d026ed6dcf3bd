"""Calibration sets from real hippocampus NIfTI and real DICOM: sampling, split, cache, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_path

from edgeseg import CalibrationError
from edgeseg.spec import load_spec

SPEC2D = REPO / "examples" / "hippocampus" / "spec2d.json"
SPEC3D = REPO / "examples" / "hippocampus" / "spec3d.json"


def hippo_subset(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """Folders of symlinks to the first ``n`` hippocampus images and labels (read in place)."""
    root = shared_path("seg", "msd_task04_hippocampus")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for p in sorted((root / "imagesTr").glob("*.nii.gz"))[:n]:
        (images / p.name).symlink_to(p)
        (labels / p.name).symlink_to(root / "labelsTr" / p.name)
    return images, labels


def test_2d_set_is_sampled_split_by_series_and_cached(tmp_path, monkeypatch):
    from edgeseg.calib import dataset
    from edgeseg.calib.dataset import CalibrationSet

    images, labels = hippo_subset(tmp_path, 12)
    spec = load_spec(str(SPEC2D))
    cs = CalibrationSet.from_paths(
        [images], spec, labels=labels, max_samples=40, cache_dir=tmp_path / "cache"
    )
    assert 0 < len(cs) <= 40
    assert all(s.shape == (1, 64, 48) and s.dtype == np.float32 for s in cs.samples)
    hold = {h.name for h in cs.holdout}
    assert len(hold) == 2 and not hold & set(cs.summary["calibration_series"])
    assert all(h.labels is not None and h.labels.shape == h.volume.shape for h in cs.holdout)
    # Stratified: every used series contributes, and some samples are background-only slices.
    assert len(cs.summary["calibration_series"]) >= 8
    assert cs.summary["from_cache"] is False and len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_reads(*a, **k):
        raise AssertionError("the cache should make re-reading images unnecessary")

    monkeypatch.setattr(dataset, "read_nifti", no_reads)
    again = CalibrationSet.from_paths(
        [images], spec, labels=labels, max_samples=40, cache_dir=tmp_path / "cache"
    )
    assert again.summary["from_cache"] is True
    assert len(again) == len(cs) and all(np.array_equal(a, b) for a, b in zip(again.samples, cs.samples))
    assert [h.name for h in again.holdout] == [h.name for h in cs.holdout]
    assert np.array_equal(again.holdout[0].volume.stored, cs.holdout[0].volume.stored)


def test_3d_set_uses_the_runtime_patches(tmp_path):
    from edgeseg.calib.dataset import CalibrationSet

    images, _ = hippo_subset(tmp_path, 4)
    cs = CalibrationSet.from_paths(images, load_spec(str(SPEC3D)), max_samples=6)
    assert 0 < len(cs) <= 6 and all(s.shape == (1, 32, 48, 32) for s in cs.samples)
    assert len(cs.holdout) == 1 and cs.holdout[0].labels is None


def test_2d_sliding_window_set_holds_the_windows_the_model_sees(tmp_path):
    # nnU-Net 2d models slide a fixed patch over each slice: a whole slice is not a model input.
    import dataclasses

    from edgeseg.calib.dataset import CalibrationSet

    images, _ = hippo_subset(tmp_path, 4)
    spec = dataclasses.replace(load_spec(str(SPEC2D)), patch_size=(32, 32), overlap=0.5)
    cs = CalibrationSet.from_paths(images, spec, max_samples=12)
    assert 0 < len(cs) <= 12 and all(s.shape == (1, 32, 32) for s in cs.samples)
    assert len({s.tobytes() for s in cs.samples}) == len(cs)  # windows of distinct slices


def test_a_real_dicom_series_calibrates(dicom_data):
    from edgeseg.calib.dataset import CalibrationSet

    cs = CalibrationSet.from_paths(
        dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag", load_spec(str(SPEC2D))
    )
    assert len(cs) >= 4 and cs.samples[0].shape == (1, 64, 48)
    assert cs.holdout == []  # one series: nothing to hold out


def test_folders_without_images_are_one_sentence(tmp_path):
    from edgeseg.calib.dataset import CalibrationSet

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(CalibrationError, match="no usable image series"):
        CalibrationSet.from_paths([tmp_path], load_spec(str(SPEC2D)))
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationSet.from_paths([tmp_path / "absent"], load_spec(str(SPEC2D)))
