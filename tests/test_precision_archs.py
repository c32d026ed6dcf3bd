"""Real architectures through export → calibration → Q/DQ rules → fp16 → gate, in 2D and 3D.

MONAI UNet (InstanceNorm, its default), SegResNet, BasicUNet and nnU-Net's PlainConvUNet
(InstanceNorm, ConvTranspose, deep supervision on: the export keeps the first output). Small
versions, briefly trained on hippocampus data so that their outputs mean something.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from edgeseg.spec import Label, ModelSpec, ZScore

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("onnxconverter_common")

STEPS = {2: 30, 3: 12}


def make(arch: str, dims: int):
    if arch == "plainconvunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        norm = torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d
        return PlainConvUNet(
            1,
            3,
            (8, 16, 32),
            conv,
            3,
            (1, 2, 2),
            (1, 1, 1),
            3,
            (1, 1),
            False,
            norm,
            {"affine": True},
            None,
            None,
            torch.nn.LeakyReLU,
            {"inplace": True},
            deep_supervision=True,
        )
    from monai.networks import nets

    if arch == "unet":
        return nets.UNet(dims, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    if arch == "segresnet":
        return nets.SegResNet(
            dims, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1, 1), blocks_up=(1, 1)
        )
    return nets.BasicUNet(dims, 1, 3, features=(8, 8, 16, 16, 32, 8))


def spec_for(dims: int) -> ModelSpec:
    labels = [Label(1, "anterior"), Label(2, "posterior")]
    if dims == 2:
        return ModelSpec(
            dims=2, labels=labels, intensity=[ZScore()], target_shape=(64, 48), divisible_by=16, batch_size=8
        )
    return ModelSpec(
        dims=3, labels=labels, intensity=[ZScore()], patch_size=(32, 48, 32), divisible_by=16, overlap=0.25
    )


@pytest.fixture(scope="module")
def hippo_cases():
    root = shared_path("seg", "msd_task04_hippocampus")
    images = sorted((root / "imagesTr").glob("*.nii.gz"))
    return [(p, root / "labelsTr" / p.name) for p in images]


def brief_training(net, dims: int, cases, seed: int = 0):
    """A few dozen steps on hippocampus: enough for outputs that depend on the anatomy."""
    import importlib.util

    from conftest import REPO

    from edgeseg.preprocess import Preprocessor

    spec_mod = importlib.util.spec_from_file_location(
        "hippo_train", REPO / "examples" / "hippocampus" / "train.py"
    )
    train = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(train)  # type: ignore[union-attr]
    del Preprocessor
    torch.manual_seed(seed)
    spec = spec_for(dims)
    train.load_spec = lambda d: spec  # train on this test's spec, the same preprocessing code
    model = train.train(dims, cases, steps=STEPS[dims], batch=16 if dims == 2 else 2, model=net, log_every=0)
    return model


ARCHS = ["unet", "segresnet", "basicunet", "plainconvunet"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_quantizes_and_is_gated(arch, dims, hippo_cases, tmp_path):
    from edgeseg.bundle import Bundle
    from edgeseg.calib.dataset import CalibrationSet, Case
    from edgeseg.calib.qdq_rules import check_qdq
    from edgeseg.export.build import build_bundle
    from edgeseg.nifti_input import read_nifti

    spec = spec_for(dims)
    net = brief_training(make(arch, dims), dims, hippo_cases[:12])
    calib_cases = [Case(p.name, (lambda p=p: read_nifti(p)), lab, [p]) for p, lab in hippo_cases[100:104]]
    held = [Case(p.name, (lambda p=p: read_nifti(p)), lab, [p]) for p, lab in hippo_cases[200:202]]
    calib = CalibrationSet.from_cases(calib_cases, held, spec, max_samples=16 if dims == 2 else 8)
    out = tmp_path / f"{arch}{dims}d.edgeseg"
    report = build_bundle(
        net,
        spec,
        out,
        name=arch,
        precisions=["fp16", "int8"],
        calibration=calib,
        gate={"min_dice": 0.0, "method": "percentile"},  # report only: no sensitivity run
        force=True,
    )
    b = Bundle.open(out)
    assert b.precisions == ["fp32", "fp16", "int8", "int8_cpu"]
    check_qdq(b.onnx("int8"))
    acc = b.manifest["accuracy"]
    assert acc["fp16"]["voxel_agreement"] > 0.995, acc["fp16"]
    assert acc["int8"]["voxel_agreement"] > 0.9, acc["int8"]
    assert np.isfinite(acc["int8"]["mean_dice_vs_fp32"])
    assert report.parity and report.parity["passed"]
