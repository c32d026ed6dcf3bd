import json

import pytest

from edgeseg import SpecError
from edgeseg.spec import Label, ModelSpec, PercentileClip, Scale, Window, ZScore, load_spec


def _spec(**kw):
    base = dict(dims=3, labels=[Label(1, "brain")])
    base.update(kw)
    return ModelSpec(**base)


def test_json_round_trip_keeps_every_field():
    s = _spec(
        intensity=[Window(40, 400), PercentileClip(1, 99), ZScore(nonzero=True), Scale(2.0, -1.0)],
        orientation="ras",
        target_spacing=(1.0, 1.0, 1.0),
        patch_size=(64, 64, 64),
        divisible_by=16,
        labels=[Label(1, "a", (1, 2, 3)), Label(2, "b", type=("12738006", "SCT", "Brain"))],
    )
    back = ModelSpec.from_json(s.to_json())
    assert back == s
    assert back.orientation == "RAS"
    assert back.num_classes == 3
    assert json.loads(s.to_json())["intensity"][0] == {
        "kind": "window",
        "center": 40,
        "width": 400,
        "out_min": 0.0,
        "out_max": 1.0,
    }


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(dims=4), "'dims'"),
        (dict(orientation="RAX"), "orientation"),
        (dict(orientation="RRS"), "orientation"),
        (dict(target_spacing=(1, 1, 1), target_shape=(8, 8, 8)), "either"),
        (dict(dims=2, patch_size=(8, 8, 8)), "sliding window"),  # 2D windows are (H, W)
        (dict(overlap=1.0), "overlap"),
        (dict(labels=[Label(1, "a"), Label(1, "b")]), "distinct"),
        (dict(labels=[]), "at least one"),
        (dict(in_channels=2, per_channel_intensity=[[ZScore()]]), "per_channel_intensity"),
        (dict(interpolation="quintic"), "'interpolation'"),
        (dict(output_interpolation="cubic"), "'output_interpolation'"),
        (dict(output_interpolation="linear"), "sliding window"),  # only the nnU-Net window does it
        (dict(anisotropy_threshold=0.5), "anisotropy_threshold"),
    ],
)
def test_invalid_specs_are_refused_with_the_field_named(kw, words):
    with pytest.raises(SpecError, match=words):
        _spec(**kw)


def test_unknown_step_and_field_are_named(tmp_path):
    d = _spec().to_dict()
    d["intensity"] = [{"kind": "sharpen"}]
    with pytest.raises(SpecError, match="sharpen"):
        ModelSpec.from_dict(d)
    d = _spec().to_dict()
    d["patchsize"] = [1, 2, 3]
    with pytest.raises(SpecError, match="patchsize"):
        ModelSpec.from_dict(d)


def test_load_spec_errors_name_the_file(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=str(bad)):
        load_spec(str(bad))
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(str(tmp_path / "missing.json"))


def test_nnunet_resampling_fields_round_trip_and_old_specs_keep_linear():
    s = _spec(
        patch_size=(32, 32, 32),
        window_padding="center",
        interpolation="cubic",
        separate_lowres_axis=True,
        anisotropy_threshold=2.5,
        output_interpolation="linear",
        intensity_before_resampling=True,
    )
    assert ModelSpec.from_json(s.to_json()) == s
    old = _spec().to_dict()  # a bundle written before these fields existed
    for name in (
        "separate_lowres_axis",
        "anisotropy_threshold",
        "output_interpolation",
        "intensity_before_resampling",
    ):
        del old[name]
    back = ModelSpec.from_dict(old)
    assert (back.interpolation, back.separate_lowres_axis, back.output_interpolation) == (
        "linear",
        False,
        "nearest",
    )
    assert back.intensity_before_resampling is False
