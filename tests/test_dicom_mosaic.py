"""Siemens MOSAIC un-tiling, checked against dcm2niix on the real MOSAIC files in ../shared/data.

The oracle is dcm2niix (Debian package ``dcm2niix``) converting the same file: edgeseg's Volume and
nibabel's reading of dcm2niix's NIfTI must describe the same voxels in world coordinates (the
index axes may be permuted or flipped: dcm2niix flips the rows, edgeseg orders slices along
row x column), the same affine to 1e-3 mm and identical values.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_path

from edgeseg.dicom import find_series, load_volume, read_volume
from edgeseg.dicom.mosaic import CsaError, csa_image_header, mosaic_layout, parse_csa
from edgeseg.outputs.nifti import ras_affine

nib = pytest.importorskip("nibabel")

DECUBITUS = ("dcm_qa_decubitus", "HFS_ep2d_diff_mosaic_1file")
MOSAICS = [
    ("dcm_qa_12bit", "12bitUnsigned.dcm"),
    ("dcm_qa_12bit", "12bitUnsigned_0x0F0F.dcm"),
    ("dcm_qa_12bit", "12bitSigned_0x0F0F.dcm"),
    DECUBITUS,
]
AFFINE_TOL_MM = 1e-3


def _file(*parts: str) -> Path:
    path = shared_path("dicom", *parts)
    return next(iter(sorted(path.glob("*.dcm")))) if path.is_dir() else path


def _dcm2niix(src: Path, out: Path) -> list:
    """dcm2niix's conversion of ``src`` (a file, or a folder of one series) as nibabel images."""
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix is not installed (Debian package dcm2niix): no oracle for MOSAIC un-tiling")
    out.mkdir(parents=True, exist_ok=True)
    args = [exe, "-b", "n", "-z", "n", "-f", "out", "-o", str(out)]
    args += ["-s", "y", str(src)] if src.is_file() else [str(src)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return [nib.load(p) for p in sorted(out.glob("*.nii"))]


def _sign_extend_if_unextended(data: np.ndarray, ds) -> np.ndarray:
    # dcm2niix before v1.0.20230411 masks signed 12-bit data without extending the sign from
    # HighBit (dcm_qa_12bit was made to show it): 0x0F0F comes out as 3855, not -241 as its
    # README documents. Extend it, so the comparison is still exact on every other bit.
    stored, allocated = int(ds.BitsStored), int(ds.BitsAllocated)
    if int(ds.PixelRepresentation) != 1 or stored >= allocated or data.max() < 2 ** (stored - 1):
        return data
    sign = 1 << (stored - 1)
    return ((data.astype(np.int64) & ((1 << stored) - 1)) ^ sign) - sign


def _compare(volume, img, ds) -> dict:
    """Map the NIfTI's voxel grid onto the Volume's in world space; compare geometry and values."""
    a_ours, a_theirs = ras_affine(volume), img.affine
    index_map = np.linalg.inv(a_ours) @ a_theirs  # NIfTI (i, j, k) -> Volume (x, y, z)
    perm = np.round(index_map)
    assert np.abs(index_map - perm).max() < 1e-3, f"the voxel grids do not coincide:\n{index_map}"
    assert sorted(np.abs(perm[:3, :3]).sum(axis=0)) == [1, 1, 1], "not a permutation of the index axes"
    affine_diff = float(np.abs(a_ours @ perm - a_theirs).max())
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3])  # dcm2niix writes a 4D image with one volume
    ijk = np.indices(data.shape).reshape(3, -1)
    xyz = (perm[:3, :3] @ ijk + perm[:3, 3:4]).astype(np.int64)
    nz, ny, nx = volume.shape
    assert xyz.min() == 0 and list(xyz.max(axis=1)) == [nx - 1, ny - 1, nz - 1], "the grids differ in extent"
    ours = volume.stored[xyz[2], xyz[1], xyz[0]]
    theirs = _sign_extend_if_unextended(data.reshape(-1), ds)
    slope, inter = img.header.get_slope_inter()  # None, None: unscaled
    slope, inter = (1.0 if slope is None else slope), (0.0 if inter is None else inter)
    return {
        "affine_diff": affine_diff,
        "values_equal": bool(np.array_equal(ours.astype(np.int64), theirs.astype(np.int64))),
        "rescale_equal": bool(np.all(volume.slope == slope) and np.all(volume.intercept == inter)),
    }


@pytest.mark.parametrize("parts", MOSAICS, ids=[p[-1][:24] for p in MOSAICS])
def test_untiled_volume_matches_dcm2niix(parts, tmp_path):
    path = _file(*parts)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    volume = read_volume(path)
    (img,) = _dcm2niix(path, tmp_path)
    layout = mosaic_layout(ds)
    assert volume.shape == (layout.n_images, layout.tile_rows, layout.tile_cols)
    assert sorted(volume.shape) == sorted(img.shape[:3])
    got = _compare(volume, img, ds)
    assert got["affine_diff"] <= AFFINE_TOL_MM, got
    assert got["values_equal"] and got["rescale_equal"], got
    assert volume.warnings == []


def test_known_geometry_of_the_decubitus_dwi():
    ds = pydicom.dcmread(_file(*DECUBITUS), stop_before_pixels=True)
    csa = csa_image_header(ds)
    assert csa["NumberOfImagesInMosaic"] == ["25"] and len(csa["SliceNormalVector"]) == 3
    layout = mosaic_layout(ds)
    assert (layout.n_images, layout.grid, layout.tile_rows, layout.tile_cols) == (25, 5, 128, 128)
    # Tile 0's corner is IPP moved by half the mosaic-minus-tile size along the rows and columns.
    shift = layout.positions[0] - np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(np.linalg.norm(shift), np.hypot(256, 256) * 1.71875, rtol=1e-9)
    assert layout.spacing == pytest.approx(float(ds.SpacingBetweenSlices))


def test_signed_12bit_mosaic_keeps_the_documented_values():
    # dcm_qa_12bit's README: the stripes of the signed file are -241 (0x0F0F) and -1 (0xFFFF).
    signed = read_volume(_file("dcm_qa_12bit", "12bitSigned_0x0F0F.dcm"))
    unsigned = read_volume(_file("dcm_qa_12bit", "12bitUnsigned_0x0F0F.dcm"))
    stripes = unsigned.stored == 3855
    assert stripes.any() and np.all(signed.stored[stripes] == -241)
    assert np.all(signed.stored[unsigned.stored == 4095] == -1)


def test_slices_stored_against_the_normal_are_reversed_like_dcm2niix_places_them(tmp_path):
    # Negating the column cosine makes row x column point against the CSA SliceNormalVector:
    # the Volume then orders the tiles backwards; in world space both readers must still agree.
    ds = pydicom.dcmread(_file(*DECUBITUS))
    iop = [float(v) for v in ds.ImageOrientationPatient]
    ds.ImageOrientationPatient = iop[:3] + [-v for v in iop[3:]]
    path = tmp_path / "in" / "flipped.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    volume = read_volume(path)
    normal = np.cross(volume.direction[:, 0], volume.direction[:, 1])
    assert volume.direction[:, 2] @ normal > 0.99  # z along row x column
    (img,) = _dcm2niix(path, tmp_path / "out")
    got = _compare(volume, img, ds)
    assert got["affine_diff"] <= AFFINE_TOL_MM and got["values_equal"], got
    original = read_volume(_file(*DECUBITUS))
    np.testing.assert_array_equal(volume.stored[::-1], original.stored)


# -- the CSA header itself -----------------------------------------------------------------


def _as_old_layout(sv10: bytes) -> bytes:
    """The same header in the layout without the SV10 magic: item lengths in the first word,
    offset by the first tag's item count (as SPM and nibabel read that layout)."""
    out = bytearray(sv10[8:])
    pos, first = 8, None
    (n_tags,) = struct.unpack_from("<I", out, 0)
    for _ in range(n_tags):
        n_items = struct.unpack_from("<i", out, pos + 76)[0]
        first = n_items if first is None else first
        pos += 84
        for _ in range(n_items):
            length = struct.unpack_from("<i", out, pos + 4)[0]
            struct.pack_into("<i", out, pos, length + first)
            pos += 16 + length + (-length) % 4
    return bytes(out)


def test_csa_header_in_both_layouts_reads_the_same():
    ds = pydicom.dcmread(_file(*DECUBITUS), stop_before_pixels=True)
    raw = ds[0x0029, 0x1010].value
    assert raw[:4] == b"SV10"
    new = parse_csa(raw)
    assert parse_csa(_as_old_layout(raw)) == new
    assert len(new) > 50 and new["NumberOfImagesInMosaic"] == ["25"]


def test_damaged_csa_header_is_a_csa_error_never_a_struct_error():
    raw = pydicom.dcmread(_file(*DECUBITUS), stop_before_pixels=True)[0x0029, 0x1010].value
    rng = np.random.default_rng(10)
    cases = [raw[:n] for n in range(0, len(raw), 97)]
    for _ in range(200):
        b = bytearray(raw)
        for i in rng.integers(0, len(b), 4):
            b[i] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    errors = 0
    for case in cases:
        try:
            parse_csa(case)
        except CsaError as err:
            errors += 1
            assert str(err).startswith(("the CSA", "a CSA"))
    assert errors >= len(raw) // 97  # every truncation is detected


def test_unusable_mosaic_headers_are_one_sentence_rejections(tmp_path):
    ds = pydicom.dcmread(_file(*DECUBITUS))
    no_count = copy.deepcopy(ds)
    del no_count[0x0029, 0x1010]  # the CSA image header
    del no_count[0x0019, 0x100A]  # and the private copy of NumberOfImagesInMosaic
    tilted = copy.deepcopy(ds)
    tilted.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: contradicts the slice normal
    cases = {"no_count.dcm": (no_count, "NumberOfImagesInMosaic"), "tilted.dcm": (tilted, "contradicts")}
    for name, (bad, _) in cases.items():
        bad.save_as(tmp_path / name)
    scan = find_series(tmp_path)
    assert scan.series == []
    reasons = {Path(err.path).name: err.reason for err in scan.rejected}
    for name, (_, words) in cases.items():
        assert "Siemens MOSAIC" in reasons[name] and words in reasons[name]
        assert reasons[name].count(".") == 0 and "\n" not in reasons[name]


def test_without_the_csa_header_the_private_count_still_untiles_it(tmp_path):
    ds = pydicom.dcmread(_file(*DECUBITUS))
    del ds[0x0029, 0x1010]
    ds.save_as(tmp_path / "no_csa.dcm")
    volume = read_volume(tmp_path / "no_csa.dcm")
    assert volume.shape == (25, 128, 128)
    assert any("SliceNormalVector" in w for w in volume.warnings)
    np.testing.assert_array_equal(volume.stored, read_volume(_file(*DECUBITUS)).stored)


# -- a series of MOSAIC instances: one volume per instance -----------------------------------


def test_each_mosaic_instance_is_its_own_part(tmp_path):
    # The shared DWI has one MOSAIC; two copies with other SOP Instance UIDs and instance numbers
    # make the two-direction series that a real DWI/fMRI export is.
    src = pydicom.dcmread(_file(*DECUBITUS))
    for number in (1, 2):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[src.SOPInstanceUID, str(number)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        ds.save_as(tmp_path / f"{number}.dcm")
    scan = find_series(tmp_path)
    assert scan.rejected == [] and len(scan.series) == 2
    labels = [ref.label for ref in scan.series]
    assert [("MOSAIC volume, instance 1" in x, "MOSAIC volume, instance 2" in x) for x in labels] == [
        (True, False),
        (False, True),
    ]
    volumes = [load_volume(ref) for ref in scan.series]
    assert [v.shape for v in volumes] == [(25, 128, 128)] * 2
    assert len({v.sop_instance_uids[0] for v in volumes}) == 2


def _nibabel_dwi_pair(into: Path) -> Path:
    """nibabel's two real Siemens DWI MOSAICs of one series (b=0 and b=1000), unpacked into ``into``."""
    import gzip

    data = Path(nib.__file__).parent / "nicom" / "tests" / "data"
    sources = [data / "siemens_dwi_0.dcm.gz", data / "siemens_dwi_1000.dcm.gz"]
    if not all(p.is_file() for p in sources):
        pytest.skip(f"nibabel's Siemens DWI test files are not installed under {data}")
    into.mkdir()
    for src in sources:
        (into / src.name.removesuffix(".gz")).write_bytes(gzip.decompress(src.read_bytes()))
    return into


def test_a_real_two_volume_dwi_series_gives_one_part_per_volume_like_dcm2niix(tmp_path):
    folder = _nibabel_dwi_pair(tmp_path / "in")
    scan = find_series(folder)
    assert scan.rejected == [] and len(scan.series) == 2
    assert len({ref.series_instance_uid for ref in scan.series}) == 1
    (img,) = _dcm2niix(folder, tmp_path / "out")
    assert img.shape == (128, 128, 48, 2)  # dcm2niix: one 4D image, volumes in instance order
    for ref in scan.series:
        ds = ref.datasets[ref.files[0]]
        number = int(ds.InstanceNumber)
        assert f"MOSAIC volume, instance {number}" in ref.label
        volume = load_volume(ref)
        frame = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., number - 1], img.affine, img.header)
        got = _compare(volume, frame, ds)
        assert got["affine_diff"] <= AFFINE_TOL_MM and got["values_equal"], (number, got)


# -- end to end --------------------------------------------------------------------------------


def _run(bundle: Path, series: Path, out: Path, formats: str) -> tuple[int, dict]:
    from click.testing import CliRunner

    from edgeseg.cli import main

    args = [
        "run",
        str(bundle),
        str(series),
        "-o",
        str(out),
        "--format",
        formats,
        "--json",
        "--backend",
        "cpu",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    doc = json.loads(result.output)
    (outcome,) = doc["outcomes"]
    return result.exit_code, outcome


def test_edgeseg_run_segments_the_mosaic(tmp_path, brain_bundle):
    series = shared_path("dicom", *DECUBITUS)
    code, outcome = _run(brain_bundle, series, tmp_path, "nifti")
    assert code == 0 and outcome["status"] == "ok", outcome
    labels = nib.load(outcome["outputs"]["nifti"])
    np.testing.assert_allclose(labels.affine, ras_affine(read_volume(series)), atol=1e-4)
    assert labels.shape == (128, 128, 25)
    inside = (np.asanyarray(labels.dataobj) > 0).mean()
    assert 0.05 < inside < 0.6, inside  # a brain mask: not nothing, not everything


def test_edgeseg_run_writes_a_seg_for_the_mosaic(tmp_path, brain_bundle):
    """The SEG of a MOSAIC: one frame per untiled slice, placed by the Volume's affine, referencing
    the MOSAIC instance, valid for dciodvfy and read back onto the Volume as the NIfTI mask."""
    from dciodvfy import dciodvfy_errors

    from edgeseg.outputs import read_seg_labels

    series = shared_path("dicom", *DECUBITUS)
    code, outcome = _run(brain_bundle, series, tmp_path, "seg,nifti")
    assert code == 0 and outcome["status"] == "ok", outcome
    volume = read_volume(series)
    mask = np.transpose(np.asanyarray(nib.load(outcome["outputs"]["nifti"]).dataobj), (2, 1, 0))
    assert mask.any()
    got = read_seg_labels(outcome["outputs"]["seg"], volume)
    np.testing.assert_array_equal(got, mask)

    seg = pydicom.dcmread(outcome["outputs"]["seg"])
    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == volume.series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in series_ref.ReferencedInstanceSequence] == [
        volume.sop_instance_uids[0]
    ]
    assert seg.FrameOfReferenceUID == volume.headers[0].FrameOfReferenceUID
    assert (int(seg.Rows), int(seg.Columns)) == volume.shape[1:]
    # Every frame lies on a slice of the Volume (the affine's plane positions).
    inverse = np.linalg.inv(volume.affine)
    for item in seg.PerFrameFunctionalGroupsSequence:
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        x, y, z = (inverse @ np.array([*ipp, 1.0]))[:3]
        assert abs(x) < 1e-3 and abs(y) < 1e-3 and abs(z - round(z)) < 1e-3
    assert dciodvfy_errors(outcome["outputs"]["seg"]) == []
