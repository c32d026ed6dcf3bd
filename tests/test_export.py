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
