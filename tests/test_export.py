"""PyTorch → ONNX export with a parity check on a real pretrained model."""

import numpy as np
import pytest

from edgeseg import ExportError
from edgeseg.spec import Label, ModelSpec

torch = pytest.importorskip("torch")


def test_torchscript_export_has_parity_on_a_real_series(brain_model, brain_spec, dicom_data):
    from edgeseg.dicom import read_volume
    from edgeseg.export.build import model_inputs_from_volume
    from edgeseg.export.onnx_export import check_parity, load_torch_model, torch_to_onnx

    spec = brain_spec
    vol = read_volume(dicom_data / "dcm_qa_decubitus" / "HFS_t1_fl2d_sag")
    inputs = model_inputs_from_volume(vol, spec)
    assert inputs[0].shape == (1, 1, 128, 128, 128)
    model = load_torch_model(brain_model)
    onnx_bytes = torch_to_onnx(model, inputs[0], spec)
    report = check_parity(model, onnx_bytes, inputs, spec)
    assert report.passed, report
    assert report.label_agreement > 0.999 and report.max_rel < 1e-2


class _TwoHeads(torch.nn.Module):
    """A deep-supervision style net: the first output is the full-resolution one."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.nn.functional.avg_pool2d(y, 2)


def test_multi_output_models_keep_the_first_output():
    import onnx

    from edgeseg.export.onnx_export import torch_to_onnx

    spec = ModelSpec(dims=2, labels=[Label(1, "a")], target_shape=(16, 16))
    data = torch_to_onnx(_TwoHeads(), np.zeros((1, 1, 16, 16), np.float32), spec)
    m = onnx.load_from_string(data)
    assert len(m.graph.output) == 1


def test_bad_model_files_get_one_sentence(tmp_path):
    from edgeseg.export.onnx_export import load_torch_model, onnx_from_file

    junk = tmp_path / "model.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="cannot load as TorchScript"):
        load_torch_model(junk)
    bad_onnx = tmp_path / "model.onnx"
    bad_onnx.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        onnx_from_file(bad_onnx)
    with pytest.raises(ExportError, match="no such model file"):
        load_torch_model(tmp_path / "absent.pt")


class _Unexportable(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs()  # not representable in opset 17


def test_failed_export_is_an_export_error():
    from edgeseg.export.onnx_export import torch_to_onnx

    spec = ModelSpec(dims=2, labels=[Label(1, "a")], target_shape=(8, 8))
    with pytest.raises(ExportError, match="ONNX export failed"):
        torch_to_onnx(_Unexportable(), np.zeros((1, 1, 8, 8), np.float32), spec)


class _SmallUNet(torch.nn.Module):
    """Conv + InstanceNorm + LeakyReLU, a strided conv down and a transposed conv up, a skip:
    the operators of nnU-Net's and MONAI's U-Nets."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.InstanceNorm2d(4, affine=True), torch.nn.LeakyReLU()
        )
        self.down = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.head(torch.cat([e, self.up(torch.relu(self.down(e)))], dim=1))


def _inputs(n=(1, 3)):
    rng = np.random.default_rng(1)
    return [rng.standard_normal((b, 1, 32, 24)).astype(np.float32) for b in n]


def test_auto_exports_through_torch_export_with_parity_and_a_dynamic_batch():
    import onnx

    from edgeseg.export.onnx_export import export_checked

    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], target_shape=(32, 24))
    x = _inputs()
    res = export_checked(_SmallUNet().eval(), x[0], x, spec)  # batch 1 exported, 3 checked
    assert res.exporter == "dynamo" and res.fallback_reason is None
    assert res.parity.passed and res.parity.exporter == "dynamo" and res.parity.max_rel < 1e-4
    m = onnx.load_from_string(res.onnx)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18


def test_auto_falls_back_to_torchscript_when_dynamo_cannot_export(monkeypatch):
    from edgeseg.export import onnx_export

    real = onnx_export.torch_to_onnx

    def no_dynamo(model, example, spec, *, opset=17, exporter="torchscript"):
        if exporter == "dynamo":
            raise ExportError("ONNX export failed (dynamo exporter): unsupported op")
        return real(model, example, spec, opset=opset, exporter=exporter)

    monkeypatch.setattr(onnx_export, "torch_to_onnx", no_dynamo)
    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], target_shape=(32, 24))
    x = _inputs()
    res = onnx_export.export_checked(_SmallUNet().eval(), x[0], x, spec)
    assert res.exporter == "torchscript" and res.parity.passed
    assert "dynamo exporter" in res.fallback_reason


def test_torchscript_models_take_the_torchscript_exporter(tmp_path):
    from edgeseg.export.onnx_export import export_checked

    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], target_shape=(32, 24))
    x = _inputs()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(_SmallUNet().eval(), torch.from_numpy(x[0])), str(path))
    res = export_checked(path, x[0], x, spec)
    assert res.exporter == "torchscript" and res.scripted and res.parity.passed
    with pytest.raises(ExportError, match="TorchScript model cannot go through torch.export"):
        export_checked(path, x[0], x, spec, exporter="dynamo")


def test_the_bundle_manifest_says_which_exporter_made_it(tmp_path):
    from edgeseg.bundle import Bundle
    from edgeseg.export.build import build_bundle

    spec = ModelSpec(dims=2, labels=[Label(1, "a"), Label(2, "b")], target_shape=(32, 24))
    said = []
    out = tmp_path / "m.edgeseg"
    build_bundle(_SmallUNet().eval(), spec, out, name="m", measure_engines=False, progress=said.append)
    prov = Bundle.open(out).manifest["provenance"]
    assert prov["export"] == {"exporter": "dynamo", "requested": "auto"}
    assert prov["parity"]["exporter"] == "dynamo"
    assert any("torch.export (dynamo)" in s for s in said)
