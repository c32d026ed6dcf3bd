"""NIfTI and PNG outputs, and the write_outputs dispatch, on the dcmqi 3-slice CT and its liver SEG."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from edgeseg import Label
from edgeseg.outputs import (
    OutputError,
    read_seg_labels,
    write_nifti,
    write_outputs,
    write_png_montage,
    write_volume_nifti,
)
from edgeseg.outputs.png import ALPHA, tile_layout

nib = pytest.importorskip("nibabel")
Image = pytest.importorskip("PIL.Image")

LIVER = Label(1, "Liver", (221, 130, 101), type=("10200004", "SCT", "Liver"))


@pytest.fixture(scope="module")
def ct3():
    from edgeseg.dicom import read_volume

    folder = shared_path("dicom", "dcmqi_ct3slice_seg")
    volume = read_volume(sorted(folder.glob("0?.dcm")))
    return volume, read_seg_labels(folder / "liver_seg.dcm", volume)


# -- NIfTI --------------------------------------------------------------------------------------


def _lps_from_headers(volume, x, y, z):
    """LPS mm of voxel (column x, row y, slice z) straight from the DICOM headers (not the affine)."""
    ds = {str(h.SOPInstanceUID): h for h in volume.headers}
    out = []
    for xi, yi, zi in zip(x, y, z, strict=True):
        h = ds[volume.sop_instance_uids[zi]]
        ipp = np.array([float(v) for v in h.ImagePositionPatient])
        iop = np.array([float(v) for v in h.ImageOrientationPatient])
        row_sp, col_sp = (float(v) for v in h.PixelSpacing)
        out.append(ipp + xi * col_sp * iop[:3] + yi * row_sp * iop[3:])
    return np.array(out)


def test_label_nifti_places_label_voxels_where_dicom_does(ct3, tmp_path):
    volume, liver = ct3
    path = write_nifti(liver, volume, tmp_path / "liver.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8 and data.shape == (512, 512, 3)  # (i, j, k) = (x, y, z)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), liver)
    np.testing.assert_allclose(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_intent()[0] == "label"

    i, j, k = np.nonzero(data)
    pick = np.linspace(0, len(i) - 1, 50).astype(int)
    i, j, k = i[pick], j[pick], k[pick]
    ras = (img.affine @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    lps = _lps_from_headers(volume, i, j, k)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-3)
    # The qform (what qform-only readers use) agrees too: this stack is not sheared.
    np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-4)


def test_image_nifti_holds_modality_values_on_the_same_grid(ct3, tmp_path):
    volume, liver = ct3
    img_path = write_volume_nifti(volume, tmp_path / "image.nii.gz")
    lab_path = write_nifti(liver, volume, tmp_path / "labels.nii.gz")
    img, lab = nib.load(img_path), nib.load(lab_path)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and data.shape == lab.shape
    np.testing.assert_array_equal(img.affine, lab.affine)
    hu = volume.stored.astype(np.float32) + np.float32(-1024.0)  # this CT: slope 1, intercept -1024
    np.testing.assert_array_equal(data.transpose(2, 1, 0), hu)
    assert -200 < float(np.median(data[np.asarray(lab.dataobj) > 0])) < 300  # liver HU


# -- PNG ----------------------------------------------------------------------------------------


def test_png_montage_size_and_label_tint(ct3, tmp_path):
    volume, liver = ct3
    center, width = 40.0, 400.0
    path = write_png_montage(
        volume, liver, tmp_path / "m.png", [LIVER], window=(center, width), tile_size=None
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        picks, rows, cols = tile_layout(3)
        assert (picks, rows, cols) == ([0, 1, 2], 2, 2)
        assert im.size == (cols * 512, rows * 512)
        rgb = np.asarray(im)

    # A liver pixel away from the outline: 60 % grey + 40 % liver colour.
    z = 1
    inner = liver[z].astype(bool)
    inner = (
        inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
    )
    ys, xs = np.nonzero(inner)
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    hu = float(volume.stored[z, y, x]) * volume.slope[z] + volume.intercept[z]
    grey = np.clip((hu - (center - width / 2)) * 255.0 / width, 0, 255)
    expected = np.round((1 - ALPHA) * grey + ALPHA * np.array(LIVER.color))
    tile_y, tile_x = divmod(z, cols)
    got = rgb[tile_y * 512 + y, tile_x * 512 + x].astype(float)
    np.testing.assert_allclose(got, expected, atol=1.5)
    assert got[0] > got[2]  # tinted towards the liver colour (red > blue)

    # Background stays grey; an outline pixel carries the pure label colour.
    by, bx = 5, 5
    assert liver[z, by, bx] == 0 and len(set(rgb[tile_y * 512 + by, tile_x * 512 + bx])) == 1
    edge = liver[z].astype(bool) & ~inner
    ey, ex = (int(v[0]) for v in np.nonzero(edge))
    assert tuple(rgb[tile_y * 512 + ey, tile_x * 512 + ex]) == LIVER.color
    # The unused fourth tile is black.
    assert not rgb[512:, 512:].any()


def test_png_montage_tiles_are_scaled_and_sampled(ct3, tmp_path):
    volume, liver = ct3
    path = write_png_montage(volume, liver, tmp_path / "s.png", [LIVER], max_tiles=2)
    with Image.open(path) as im:
        assert im.size == (2 * 256, 1 * 256)  # slices 0 and 2, square pixels → 256x256 tiles
    assert tile_layout(35, 16)[0] == [0, 2, 5, 7, 9, 11, 14, 16, 18, 20, 23, 25, 27, 29, 32, 34]


# -- dispatch -----------------------------------------------------------------------------------


def test_write_outputs_writes_every_format_under_the_stem(ct3, tmp_path):
    volume, liver = ct3
    conf = np.full(volume.shape, 230, np.uint8)
    paths = write_outputs(
        liver,
        volume,
        tmp_path,
        formats=("seg", "nifti", "png"),
        labels_spec=[LIVER],
        stem="series-0123abcd",
        algorithm_name="edgeseg-test",
        algorithm_version="1",
        confidence=conf,
    )
    assert set(paths) == {"seg", "nifti", "nifti_image", "nifti_confidence", "png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    header = volume.headers[0]
    for p in paths.values():
        assert p.parent == tmp_path and p.name.startswith("series-0123abcd_")
        assert str(header.PatientName) not in p.name and str(header.PatientID) not in p.name
    np.testing.assert_array_equal(read_seg_labels(paths["seg"], volume), liver)


def test_write_outputs_refuses_bad_formats_and_stems(ct3, tmp_path):
    volume, liver = ct3
    kw = {"labels_spec": [LIVER], "algorithm_name": "a", "algorithm_version": "1"}
    with pytest.raises(OutputError, match="unknown output format"):
        write_outputs(liver, volume, tmp_path, formats=("rtstruct",), stem="s", **kw)
    for stem in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(OutputError, match="'stem'"):
            write_outputs(liver, volume, tmp_path, formats=("png",), stem=stem, **kw)
    assert not list(tmp_path.iterdir())
