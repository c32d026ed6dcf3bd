"""``edgeseg doctor`` on this machine: what it has, and a sentence for what the GPU path lacks."""

from __future__ import annotations

import json

from click.testing import CliRunner


def test_doctor_reports_this_machine():
    from edgeseg.cli import main
    from edgeseg.cuda import device_count

    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["Python"]["ok"] and checks["CPU"]["ok"] and "usable threads" in checks["CPU"]["detail"]
    assert checks["ONNX Runtime"]["ok"] and "onnxruntime" in doc["engines"]
    for c in doc["checks"]:  # every missing piece says how to get it, or is the GPU itself
        assert c["ok"] or c["fix"] or c["name"].startswith("GPU"), c
    if device_count() == 0:
        assert doc["gpu_path"].startswith("the GPU path cannot run here: missing ")
        assert "tensorrt" not in doc["engines"]
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "engines usable here:" in text and doc["gpu_path"] in text


def test_a_failing_probe_is_one_line(monkeypatch):
    import edgeseg.doctor as doctor

    def broken(report):
        raise OSError("no /proc here")

    monkeypatch.setattr(doctor, "_cache", broken)
    report = doctor.diagnose()
    last = report.checks[-1]
    assert not last.ok and "the check itself failed: OSError: no /proc here" in last.detail
    assert any(c.name == "ONNX Runtime" for c in report.checks)  # the others still ran
