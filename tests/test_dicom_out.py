"""``load_volume(ref, out=...)``: decoding straight into caller memory (the GPU path's pinned,
on Jetson GPU-mapped, pool) gives bit-identical volumes to the normal path, on real DICOM."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from edgeseg._exceptions import DicomInputError
from edgeseg.dicom import find_series, load_volume, read_volume

DATA = Path("/work/shared/data/dicom")
ROOTS = ["dcmqi_ct3slice_seg", "dcm_qa_decubitus", "dicom2nifti_headers_random_pixels", "tcia_brain_tumor_progression",
         "dcm_qa_12bit", "pydicom"]  # fmt: skip
PER_ROOT = 6  # series per collection: enough variety (tilt, multi-frame, LUT, compressed), bounded time

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real DICOM files are not present at {DATA}")


class HostPinned:
    """A pool buffer in ordinary host memory (page locking is the only difference)."""

    def __init__(self, n, mapped) -> None:
        self._mem = np.empty(n, np.uint8)
        self.ptr, self.nbytes, self.device_ptr = self._mem.ctypes.data, n, 0

    def close(self) -> None:
        pass


def _series():
    refs = []
    for root in ROOTS:
        if (DATA / root).is_dir():
            refs += find_series([DATA / root]).series[:PER_ROOT]
    return refs


def _same(a, b) -> None:
    assert a.stored.dtype == b.stored.dtype and a.stored.shape == b.stored.shape
    assert a.stored.tobytes() == b.stored.tobytes()  # bit-identical
    np.testing.assert_array_equal(a.slope, b.slope)
    np.testing.assert_array_equal(a.intercept, b.intercept)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (a.spacing, a.sop_instance_uids, a.warnings) == (b.spacing, b.sop_instance_uids, b.warnings)


def test_out_allocator_and_array_give_bit_identical_volumes():
    from edgeseg.cuda.memory import PinnedPool

    refs = _series()
    assert len(refs) >= 10, "expected the shared DICOM collections"
    pool = PinnedPool(mapped=False, factory=HostPinned)
    dtypes = set()
    loaded = 0
    for ref in refs:
        try:
            plain = load_volume(ref)
        except DicomInputError as err:  # undecodable samples: the out= path fails the same way
            with pytest.raises(DicomInputError) as again:
                load_volume(ref, out=pool)
            assert str(again.value) == str(err)
            continue
        loaded += 1
        asked: list = []

        def allocate(shape, dtype, asked=asked):
            asked.append((shape, dtype))
            return np.full(shape, 77, dtype)  # garbage first: every voxel must be written

        via_callable = load_volume(ref, out=allocate)
        assert asked == [(plain.stored.shape, plain.stored.dtype)]
        _same(plain, via_callable)
        given = np.empty_like(plain.stored)
        via_array = load_volume(ref, out=given)
        assert via_array.stored is given
        _same(plain, via_array)
        pooled = load_volume(ref, out=pool)
        _same(plain, pooled)
        assert pool.lookup(pooled.stored) is not None and pooled.stored.flags.c_contiguous
        dtypes.add(plain.stored.dtype)
        del pooled
    gc.collect()
    assert loaded >= 10
    assert pool.idle >= 1  # the pooled volumes gave their memory back
    assert len(dtypes) >= 2  # int16 and uint16 (and float32 where a LUT applies)


def test_out_of_the_wrong_shape_or_read_only_is_refused():
    ref = _series()[0]
    shape = load_volume(ref).stored.shape
    with pytest.raises(ValueError, match="shape"):
        load_volume(ref, out=np.empty((1, 2, 3), np.int16))
    with pytest.raises(ValueError, match="shape"):
        load_volume(ref, out=lambda s, d: np.empty(s, np.float64))
    ro = np.empty(shape, load_volume(ref).stored.dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        load_volume(ref, out=ro)


def test_read_volume_and_run_jobs_pass_the_allocator_through():
    from edgeseg.run import _single_jobs

    folder = DATA / "dcmqi_ct3slice_seg"
    calls: list = []

    def allocate(shape, dtype):
        calls.append(shape)
        return np.empty(shape, dtype)

    files = sorted(p for p in folder.glob("0*.dcm"))
    vol = read_volume(files, out=allocate)
    assert calls == [vol.stored.shape]
    jobs = [j for j in _single_jobs([folder], out=allocate) if hasattr(j, "load")]
    assert jobs and jobs[0].load().stored.shape == calls[-1] and len(calls) == 2
