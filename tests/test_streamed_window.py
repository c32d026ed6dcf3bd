"""The streamed sliding window (edgeseg.sliding_window) gives the whole-volume buffer's labels.

The reference here is the blend edgeseg ran before streaming: one float32 buffer of K classes ×
the whole volume, every window's weighted output added in, divided by the weight sum, argmax.
Both run the same real ONNX Runtime session on real MR volumes (MSD hippocampus), in 3D and
with 2D patches, with test-time mirroring, a 2-model ensemble graph and confidence.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import shared_path

from edgeseg.backends.onnxruntime import OrtBackend
from edgeseg.preprocess import labels_to_source, output_to_source_grid, to_labels, window_starts
from edgeseg.segmenter import Segmenter
from edgeseg.sliding_window import SlabBlender, WindowPlan, batches, mirror_sets, window_weights
from edgeseg.spec import Label, ModelSpec, ZScore
from edgeseg.volume import Volume

onnx = pytest.importorskip("onnx")

CASES = ("hippocampus_367", "hippocampus_359")


def _conv_net(dims: int, classes: int, *, ensemble: int = 1, seed: int = 0) -> bytes:
    """3×3(×3) conv → ReLU → 1×1 conv: outputs depend on neighbours, so windows matter. With
    ``ensemble`` > 1, that many such nets averaged in one graph (a fold ensemble's shape)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sp = ["d", "h", "w"][-dims:]
    nodes, inits, outs = [], [], []
    for m in range(ensemble):
        w1 = rng.standard_normal((6, 1) + (3,) * dims).astype(np.float32) * 0.5
        w2 = rng.standard_normal((classes, 6) + (1,) * dims).astype(np.float32)
        b2 = rng.standard_normal(classes).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(a, f"{n}{m}") for a, n in ((w1, "W1_"), (w2, "W2_"), (b2, "B2_"))]
        nodes += [
            helper.make_node("Conv", ["image", f"W1_{m}"], [f"h{m}"], pads=[1] * (2 * dims)),
            helper.make_node("Relu", [f"h{m}"], [f"r{m}"]),
            helper.make_node("Conv", [f"r{m}", f"W2_{m}", f"B2_{m}"], [f"o{m}"]),
        ]
        outs.append(f"o{m}")
    if ensemble == 1:
        nodes[-1].output[0] = "logits"
    else:
        inits.append(numpy_helper.from_array(np.array(1.0 / ensemble, np.float32), "inv_n"))
        nodes += [helper.make_node("Sum", outs, ["s"]), helper.make_node("Mul", ["s", "inv_n"], ["logits"])]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *sp])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, *sp])
    g = helper.make_graph(nodes, "convnet", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _whole_buffer(seg: Segmenter, volume, conf: bool):
    """The pre-streaming blend: K × the whole (padded) volume in one buffer."""
    spec = seg.spec
    prepared = seg._pre(volume)
    patch = tuple(spec.patch_size)
    nd = len(patch)
    grid, x = prepared.grid, prepared.array
    items = x[:, :, : grid[1], : grid[2]] if nd == 2 else x[None, :, : grid[0], : grid[1], : grid[2]]
    size = items.shape[2:]
    if spec.window_padding == "center":
        padded = tuple(max(s, p) for s, p in zip(size, patch))
        off = tuple((P - s) // 2 for P, s in zip(padded, size))
        xp = np.full((*items.shape[:2], *padded), spec.pad_value, dtype=np.float32)
        xp[(slice(None), slice(None), *(slice(o, o + s) for o, s in zip(off, size)))] = items
        items = xp
    else:  # padded after the image to the spec's padded shape (the Segmenter cuts windows unpadded)
        full = seg._pre.padded_shape(grid)
        padded, off = (full if nd == 3 else full[1:]), (0,) * nd
        xp = np.full((*items.shape[:2], *padded), spec.pad_value, dtype=np.float32)
        xp[(slice(None), slice(None), *(slice(0, s) for s in size))] = items
        items = xp
    starts = list(itertools.product(*(window_starts(P, p, spec.overlap) for P, p in zip(padded, patch))))
    weight = window_weights(patch, spec.window_weights)
    wsum = np.zeros(padded, dtype=np.float32)
    for st in starts:
        wsum[tuple(slice(a, a + p) for a, p in zip(st, patch))] += weight
    jobs = [(i, st) for i in range(items.shape[0]) for st in starts]
    mirrors = mirror_sets(spec.mirror_axes, 2) if seg.tta else []
    acc = None
    for k in range(0, len(jobs), spec.batch_size):
        group = jobs[k : k + spec.batch_size]
        batch = np.stack(
            [items[(i, slice(None), *(slice(a, a + p) for a, p in zip(st, patch)))] for i, st in group]
        )
        out = np.array(seg.backend.infer(batch), copy=True)
        for axes in mirrors:
            out += np.flip(seg.backend.infer(np.ascontiguousarray(np.flip(batch, axes))), axes)
        if mirrors:
            out *= np.float32(1.0 / (len(mirrors) + 1))
        if acc is None:
            acc = np.zeros((items.shape[0], out.shape[1], *padded), dtype=np.float32)
        for j, (i, st) in enumerate(group):
            acc[(i, slice(None), *(slice(a, a + p) for a, p in zip(st, patch)))] += out[j] * weight
    acc *= np.reciprocal(wsum)
    acc = acc[(slice(None), slice(None), *(slice(o, o + s) for o, s in zip(off, size)))]
    vol = acc.transpose(1, 0, 2, 3)[None] if nd == 2 else acc
    if nd == 3 and spec.window_padding == "end":
        vol = vol[:, :, : grid[0], : grid[1], : grid[2]]
    vol = output_to_source_grid(vol, prepared, spec)
    lab, c = to_labels(vol, spec, with_confidence=conf)
    return labels_to_source(lab[0], prepared), (labels_to_source(c[0], prepared) if conf else None)


LABELS = [Label(1, "anterior"), Label(2, "posterior")]
SPECS = {
    # edgeseg's own 3D windows: end padding, its Gaussian; upsampled so there are many slabs
    "3d": dict(dims=3, target_spacing=(0.6, 0.6, 0.6), patch_size=(16, 24, 16), overlap=0.5, divisible_by=8,
               batch_size=3),
    # overlap 0.25: slabs of unequal depth, 3 per window
    "3d_overlap_quarter": dict(dims=3, target_spacing=(0.7, 0.7, 0.7), patch_size=(16, 24, 16), overlap=0.25,
                               batch_size=2),
    # nnU-Net's: centred padding (the patch is deeper than the volume), its Gaussian, all mirrors
    "3d_nnunet_mirrors": dict(dims=3, patch_size=(40, 40, 24), window_padding="center",
                              window_weights="nnunet_gaussian", mirror_axes=(0, 1, 2), batch_size=2),
    # 2D patches over every slice, nnU-Net style, mirrored in-plane
    "2d_patch_mirrors": dict(dims=2, patch_size=(32, 24), window_padding="center",
                             window_weights="nnunet_gaussian", mirror_axes=(0, 1), batch_size=5),
    # per-channel sigmoid + threshold: the blend is divided by the weight sum
    "3d_threshold": dict(dims=3, patch_size=(16, 24, 16), overlap=0.5, divisible_by=8, batch_size=4,
                         output="threshold", activation="logits"),
    # the output back to the source grid with order 1 before argmax (nnU-Net): the whole output is kept
    "3d_output_linear": dict(dims=3, target_spacing=(1.3, 1.3, 1.3), patch_size=(16, 16, 16), overlap=0.5,
                             window_padding="center", output_interpolation="linear", batch_size=2),
}  # fmt: skip


@pytest.fixture(scope="module")
def volumes():
    from edgeseg.nifti_input import read_nifti

    root = shared_path("seg", "msd_task04_hippocampus", "imagesTr")
    return [read_nifti(root / f"{c}.nii.gz") for c in CASES]


# every spec with one model; the 2-model ensemble graph on one 3D and one 2D spec
@pytest.mark.parametrize("name,ensemble", [(n, 1) for n in SPECS] + [("3d", 2), ("2d_patch_mirrors", 2)])
def test_streamed_labels_equal_the_whole_volume_buffer(volumes, name, ensemble):
    kw = dict(SPECS[name])
    dims = kw.pop("dims")
    classes = 2 if kw.get("output") == "threshold" else 3
    spec = ModelSpec(dims=dims, labels=LABELS, intensity=[ZScore()], ensemble=ensemble, **kw)
    seg = Segmenter(spec, OrtBackend(_conv_net(len(spec.patch_size), classes, ensemble=ensemble)))
    for vol in volumes:
        for conf in (False, True):
            res = seg.segment(vol, with_confidence=conf)
            ref, ref_conf = _whole_buffer(seg, vol, conf)
            assert res.labels.shape == vol.shape
            assert len(np.unique(ref)) > 1  # a real segmentation, not a constant
            np.testing.assert_array_equal(res.labels, ref)
            if conf:
                np.testing.assert_array_equal(res.confidence, ref_conf)


def test_tta_off_runs_the_plain_pass_only(volumes):
    kw = dict(SPECS["3d_nnunet_mirrors"])
    kw.pop("dims")
    spec = ModelSpec(dims=3, labels=LABELS, intensity=[ZScore()], **kw)
    be = OrtBackend(_conv_net(3, 3))
    on, off = Segmenter(spec, be), Segmenter(spec, be, tta=False)
    assert on.describe()["mirrors"] == 7 and off.describe()["mirrors"] == 0
    ref, _ = _whole_buffer(off, volumes[0], False)
    np.testing.assert_array_equal(off.segment(volumes[0]).labels, ref)
    assert not np.array_equal(on.segment(volumes[0]).labels, ref)  # the mirrors do change labels


@pytest.mark.parametrize(
    "size,patch,overlap,roi",
    [((70, 33, 29), (16, 24, 16), 0.5, None), ((61, 40, 40), (24, 16, 16), 0.25, None),
     ((9, 30, 31), (1, 16, 16), 0.5, None), ((16, 16, 16), (16, 16, 16), 0.5, None),
     ((100, 20, 20), (20, 20, 20), 0.9, None),
     ((70, 33, 29), (16, 24, 16), 0.5, ((0, 61), (0, 30), (0, 23))),  # end padding
     ((61, 40, 40), (24, 16, 16), 0.25, ((5, 50), (3, 37), (9, 31))),  # centred padding
     ((9, 30, 31), (1, 16, 16), 0.5, ((0, 9), (7, 21), (0, 31)))],
)  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2])
def test_slab_blender_matches_a_whole_buffer_and_holds_one_patch_depth(size, patch, overlap, roi, threads,
                                                                        monkeypatch):  # fmt: skip
    import edgeseg.parallel as parallel

    monkeypatch.setattr(parallel, "SPLIT_MIN", 0)  # split even these small windows across the threads
    rng = np.random.default_rng(1)
    weight = window_weights(patch if patch[0] > 1 else patch[1:])
    plan = WindowPlan(size, patch, overlap, weight, roi)
    k = 5
    outs = [rng.standard_normal((k, *patch)).astype(np.float32) for _ in plan.starts]
    full = np.zeros((k, *size), np.float32)
    wsum = np.zeros(size, np.float32)
    for (a, b, c), o in zip(plan.starts, outs):
        box = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
        full[(slice(None), *box)] += o * plan.weight
        wsum[box] += plan.weight
    full *= np.reciprocal(wsum)
    box = tuple(slice(a, b) for a, b in plan.roi)
    full = full[(slice(None), *box)]
    got = np.full(full.shape, np.nan, np.float32)
    seen: list[tuple[int, int]] = []

    def finish(lo, hi, slab):
        seen.append((lo, hi))
        got[:, lo - plan.roi[0][0] : hi - plan.roi[0][0]] = slab

    blender = SlabBlender(plan, k, finish, normalize=True, threads=threads)
    for group in plan.batches(3):
        for w in group:
            blender.add(w, outs[w])
    blender.close()
    np.testing.assert_array_equal(got, full)  # the same floats, not merely close
    assert seen == sorted(seen) and seen[0][0] == plan.roi[0][0] and seen[-1][1] == plan.roi[0][1]
    assert blender.peak_open <= patch[0]  # never more than one patch depth of rows open
    longest = max(hi - lo for lo, hi in plan.slabs)
    assert blender.ring.shape[1] == plan.ring_rows <= patch[0] + longest - 1 or plan.ring_rows == longest
    assert blender.ring.shape[2:] == full.shape[2:]  # only the box is held


@pytest.mark.parametrize("size,patch,roi", [((70, 33, 29), (16, 24, 16), None),
                                             ((61, 40, 40), (24, 16, 16), ((5, 50), (3, 37), (9, 31)))])
def test_a_difference_blend_is_the_weighted_sum_of_the_class_differences(size, patch, roi):
    # The 2-class argmax blend keeps one channel: sum over windows of weight * (y1 - y0), in
    # window order, the first write a product: the same floats as a whole buffer of them.
    rng = np.random.default_rng(9)
    plan = WindowPlan(size, patch, 0.5, window_weights(patch), roi)
    outs = [rng.standard_normal((2, *patch)).astype(np.float32) for _ in plan.starts]
    full = np.zeros((1, *size), np.float32)
    for (a, b, c), o in zip(plan.starts, outs):
        full[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] += (o[1:] - o[:1]) * plan.weight
    full = full[(slice(None), *(slice(a, b) for a, b in plan.roi))]
    got = np.full(full.shape, np.nan, np.float32)

    def finish(lo, hi, slab):
        got[:, lo - plan.roi[0][0] : hi - plan.roi[0][0]] = slab

    blender = SlabBlender(plan, 1, finish, normalize=False, difference=True, threads=2)
    for w in range(len(plan.starts)):
        blender.add(w, outs[w])
    blender.close()
    np.testing.assert_array_equal(got, full)
    with pytest.raises(ValueError, match="1 channel"):
        SlabBlender(plan, 2, finish, normalize=False, difference=True)


def test_two_class_windows_without_confidence_give_the_argmax_of_the_whole_volume():
    # Sign-only blending on a per-voxel net: every window sees the same values at a voxel, so
    # the sign of the weighted sum of (y1 - y0) is exactly the sign of y1 - y0, which is the
    # 2-class argmax; the grid is deeper than the source (labels on the kept rows only).
    from test_segmenter import _pointwise_onnx

    rng = np.random.default_rng(3)
    vol = Volume.from_array(rng.standard_normal((20, 37, 41)).astype(np.float32) * 10)  # both classes
    labels = [Label(1, "a")]
    be = OrtBackend(_pointwise_onnx(3, classes=2))
    whole = ModelSpec(dims=3, labels=labels, target_shape=(48, 37, 41), interpolation="nearest")
    sliding = ModelSpec(dims=3, labels=labels, target_shape=(48, 37, 41), interpolation="nearest",
                        patch_size=(16, 16, 16), overlap=0.5, batch_size=3)  # fmt: skip
    want = Segmenter(whole, be).segment(vol).labels
    got = Segmenter(sliding, be).segment(vol).labels
    assert 0.2 < want.mean() < 0.8
    np.testing.assert_array_equal(got, want)
    # with confidence the two channels are blended and divided as before: the same labels
    np.testing.assert_array_equal(Segmenter(sliding, be).segment(vol, with_confidence=True).labels, want)


def test_a_window_cut_from_the_unpadded_image_is_the_window_of_a_padded_copy():
    from edgeseg.segmenter import cut_window

    rng = np.random.default_rng(12)
    image = rng.standard_normal((2, 9, 11, 7)).astype(np.float32)
    pad = 8
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad), (pad, pad)), constant_values=-3.0)
    dst = np.empty((2, 6, 5, 8), np.float32)
    for start in [(0, 0, 0), (-2, 3, -4), (5, 8, 1), (-7, -6, -8), (9, 0, 0), (4, 9, 3), (3, -5, 6)]:
        cut_window(image, start, dst, -3.0)
        want = padded[(slice(None), *(slice(a + pad, a + pad + w) for a, w in zip(start, dst.shape[1:])))]
        np.testing.assert_array_equal(dst, want)


def test_batches_short_or_filled_last():
    assert batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(7, 3, fill=True) == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert batches(2, 4, fill=True) == [[0, 1, 1, 1]]
    with pytest.raises(ValueError, match="at least that big"):
        WindowPlan((8, 8, 8), (16, 8, 8), 0.5, np.ones((16, 8, 8), np.float32))
