"""edgeseg through a real Triton Inference Server (nvidia-pytriton's tritonserver on 127.0.0.1).

Labels through Triton equal the local CPU run on real series (2D and 3D); a server killed in the
middle of a listener's stream and restarted loses no series and segments none twice; a wrong
model name or an unreachable server is one sentence. Skipped, with the reason, where the
tritonserver wheel or the gRPC client is not installed or cannot run here.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeseg._exceptions import BackendError
from edgeseg.stream.testing import free_port, wait_for

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import threshold_bundle  # noqa: E402

TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3")
TCIA_SERIES = ("26401-T1prereg-52906", "36468-FLAIRreg-58706", "37830-T2reg-78532")
SAG = ("dcm_qa_decubitus", "HFS_t1_fl2d_sag")  # uint16 MR, 35 slices


def _need_triton() -> None:
    pytest.importorskip(
        "tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install 'edgeseg[triton]')"
    )
    from edgeseg.triton.server import find_install, stub_python_bin

    try:
        find_install()
        stub_python_bin()
    except BackendError as exc:
        pytest.skip(f"tritonserver cannot run here: {exc}")


def _start(server) -> None:
    try:
        server.start(wait_s=120)
    except BackendError as exc:
        text = str(exc)
        if "GLIBC" in text or "error while loading shared libraries" in text:
            pytest.skip(f"the nvidia-pytriton tritonserver binary cannot run on this system: {text[:300]}")
        raise


def _server(repo: Path):
    from edgeseg.triton.server import TritonServer

    return TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    return threshold_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(request, tmp_path_factory, tiny):
    """One server with the 2D tiny model and (where deepbet is installed) the 3D brain model."""
    _need_triton()
    from edgeseg.export.triton import write_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    models = {"tiny": tiny}
    write_repository(tiny, repo, model_name="tiny", backend="onnxruntime")
    write_repository(tiny, repo, model_name="tiny-batched", backend="onnxruntime", max_batch=4)
    try:
        brain = request.getfixturevalue("brain_bundle")
    except pytest.skip.Exception:
        brain = None
    if brain is not None:
        write_repository(brain, repo, model_name="brain", backend="onnxruntime")
        models["brain"] = brain
    server = _server(repo)
    _start(server)
    yield server, models
    server.stop()


def _read(dicom_data: Path, *parts: str):
    from edgeseg.dicom import read_volume

    return read_volume(dicom_data.joinpath(*parts))


def _through_triton_and_locally(server, bundle, model, vol, confidence=True):
    from edgeseg.segmenter import Segmenter

    with Segmenter.open(bundle, backend="onnxruntime") as local:
        here = local.segment(vol, with_confidence=confidence)
    with Segmenter.open(bundle, backend=f"triton://{server.grpc_url}/{model}") as remote:
        there = remote.segment(vol, with_confidence=confidence)
        sent = remote.bytes_sent
        assert remote.describe()["backend"] == "triton"
    return here, there, sent


def test_2d_labels_through_triton_equal_the_local_run(served, dicom_data):
    server, models = served
    vol = _read(dicom_data, *SAG)
    assert vol.stored.dtype == np.uint16
    here, there, sent = _through_triton_and_locally(server, models["tiny"], "tiny", vol)
    assert there.labels.dtype == np.uint8 and there.labels.shape == vol.shape
    assert 0.05 < there.labels.mean() < 0.95  # a real mask, not all one value
    np.testing.assert_array_equal(there.labels, here.labels)
    np.testing.assert_array_equal(there.confidence, here.confidence)
    # Stored pixels cross the wire as stored (2 bytes a voxel), not as float32.
    geometry = vol.shape[0] * 16 + 3 * 8 + 16 * 8
    assert sent == vol.stored.nbytes + geometry


def test_2d_dynamic_batching_returns_each_clients_own_labels(served, dicom_data):
    """Concurrent clients on a max_batch_size model: Triton hands several requests to one
    execute(); every client gets the labels of its own series."""
    import threading
    import urllib.request

    from edgeseg.segmenter import Segmenter

    server, models = served
    vols = [_read(dicom_data, *SAG), _read(dicom_data, *TCIA, TCIA_SERIES[1])]
    with Segmenter.open(models["tiny"], backend="onnxruntime") as local:
        expected = [local.segment(v).labels for v in vols]
    results: list[bool] = []

    def client(i: int) -> None:
        with Segmenter.open(models["tiny"], backend=f"triton://{server.grpc_url}/tiny-batched") as seg:
            for _ in range(3):
                results.append(bool(np.array_equal(seg.segment(vols[i % 2]).labels, expected[i % 2])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 12
    url = f"http://{server.host}:{server.http_port}/v2/models/tiny-batched/stats"
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (loopback)
        stats = json.loads(r.read())["model_stats"][0]
    assert int(stats["inference_count"]) == 12


def test_3d_labels_through_triton_equal_the_local_run(served, dicom_data):
    server, models = served
    if "brain" not in models:
        pytest.skip("deepbet is not installed: no 3D bundle to serve")
    vol = _read(dicom_data, *TCIA, TCIA_SERIES[0])
    here, there, _ = _through_triton_and_locally(server, models["brain"], "brain", vol, confidence=False)
    assert 0.02 < there.labels.mean() < 0.7
    np.testing.assert_array_equal(there.labels, here.labels)


def test_wrong_model_name_is_one_sentence_listing_the_models(served):
    from edgeseg.segmenter import Segmenter

    server, models = served
    with pytest.raises(BackendError) as err:
        Segmenter.open(models["tiny"], backend=f"triton://{server.grpc_url}/tinny")
    text = str(err.value)
    assert "\n" not in text and "no ready model 'tinny'" in text and "tiny (ready)" in text, text


def test_cli_says_one_line_for_a_wrong_model_and_an_unreachable_server(served, tmp_path, dicom_data):
    from click.testing import CliRunner

    from edgeseg.cli import main

    server, models = served
    src = str(dicom_data.joinpath(*SAG))
    for target, expect in (
        (f"triton://{server.grpc_url}/nope", "has no ready model 'nope'"),
        (f"triton://127.0.0.1:{free_port()}/tiny", "is unreachable"),
    ):
        r = CliRunner().invoke(
            main, ["run", str(models["tiny"]), src, "-o", str(tmp_path), "--backend", target]
        )
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.output


def test_another_bundle_than_the_servers_is_refused(served):
    from edgeseg.segmenter import Segmenter

    server, models = served
    if "brain" not in models:
        pytest.skip("deepbet is not installed: no second bundle")
    with pytest.raises(BackendError, match="serves another bundle"):
        Segmenter.open(models["brain"], backend=f"triton://{server.grpc_url}/tiny")


# -- Triton killed in the middle of a stream ----------------------------------------------------


@pytest.fixture(scope="module")
def restartable(tmp_path_factory, tiny):
    _need_triton()
    from edgeseg.export.triton import write_repository

    repo = tmp_path_factory.mktemp("triton-kill") / "repo"
    write_repository(tiny, repo, model_name="tiny", backend="onnxruntime")
    server = _server(repo)
    _start(server)
    yield server
    server.stop()


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_triton_killed_mid_stream_and_restarted_segments_every_series_once(
    restartable, tiny, tmp_path, dicom_data, round_
):
    """A watched folder's listener; Triton is SIGKILLed after the first series and restarted
    while the other two wait in the journal: all three segmented, each exactly once."""
    from edgeseg.stream.isolation import IsolatedProcessor
    from edgeseg.stream.service import ServiceConfig, StreamService

    server = restartable
    if server.proc is None or server.proc.poll() is not None:
        _start(server)
    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    # The listener's production processor: the Segmenter in a child process (isolation).
    processor = IsolatedProcessor(
        "edgeseg.stream.isolation:segmenter_factory",
        {"bundle": str(tiny), "backend": f"triton://{server.grpc_url}/tiny?wait=1&timeout=60"},
    )
    processor.start()
    svc = StreamService(
        ServiceConfig(out_dir=out, watch=drop, series_timeout_s=0.3, watch_stable_s=0.2), processor
    )
    svc.start()
    try:

        def drop_series(name: str) -> None:
            for f in sorted(dicom_data.joinpath(*TCIA, name).glob("*.dcm")):
                shutil.copyfile(f, drop / f"{name}-{f.name}")

        def delivered() -> int:
            return sum(1 for r in svc.journal.series_rows() if r["state"] in ("segmented", "delivered"))

        drop_series(TCIA_SERIES[0])
        assert wait_for(lambda: delivered() == 1, 60), svc.journal.series_rows()
        server.kill()  # a crash: no clean shutdown
        drop_series(TCIA_SERIES[1])
        drop_series(TCIA_SERIES[2])

        def waiting() -> bool:
            rows = [r for r in svc.journal.series_rows() if r["state"] == "complete"]
            return len(rows) == 2 and all(r["reason"] for r in rows)

        assert wait_for(waiting, 60), svc.journal.series_rows()  # both found the server away
        _start(server)
        assert wait_for(lambda: delivered() == 3, 90), svc.journal.series_rows()
        time.sleep(0.5)  # a second run of any of them would show now
        rows = svc.journal.series_rows()
    finally:
        svc.stop()
        processor.close()
    assert len(rows) == 3
    assert all(r["runs"] == 1 for r in rows), rows  # none twice
    assert not [r for r in rows if r["state"] == "quarantined"], rows  # none lost
    segs = sorted(out.glob("*_seg.dcm"))
    assert len(segs) == 3, segs


def test_waiting_for_the_server_never_uses_up_a_series_attempts(tmp_path):
    """However many times a series finds the server away, it is not set aside for it; an
    ordinary transient failure still counts."""
    from edgeseg.stream.journal import Journal

    j = Journal(tmp_path / "j.sqlite")
    j.add_instance("a", "s", source="t", now=1.0)
    j.mark_complete(now=10.0, quiet_s=1.0)
    for n in range(6):  # twice the worker's max_attempts
        claim = j.claim("s")
        assert claim is not None and claim.attempts == 1, (n, claim)
        j.retry_later(claim, "Triton at h:1 did not answer", 0.0, count_attempt=False)
    claim = j.claim("s")
    j.retry_later(claim, "device busy", 0.0)
    assert j.attempts("s") == 1 and j.series_state("s") == "complete"
    assert j.claim("s").attempts == 2
    j.close()


def test_cli_export_serve_run_and_sigterm(tiny, tmp_path, dicom_data):
    """The README's commands: export-triton, triton serve (a subprocess), run --backend
    triton://…; SIGTERM stops the server and its stubs."""
    import os
    import signal
    import subprocess

    from click.testing import CliRunner

    from edgeseg.cli import main

    _need_triton()
    repo = tmp_path / "repo"
    r = CliRunner().invoke(
        main, ["export-triton", str(tiny), str(repo), "--instances", "2", "--backend", "onnxruntime"]
    )
    assert r.exit_code == 0, r.output
    config = (repo / "tiny" / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in config and (repo / "tiny" / "1" / tiny.name).is_file()
    grpc, http = free_port(), free_port()
    cmd = [sys.executable, "-m", "edgeseg", "triton", "serve", str(repo), "--grpc-port", str(grpc)]
    cmd += ["--http-port", str(http), "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:  # "tritonserver ready: …" once the models are loaded
            seen.append(line)
            if line.startswith(("tritonserver ready", "error", "tritonserver exited")):
                break
        assert seen and seen[-1].startswith("tritonserver ready"), "".join(seen)
        out = tmp_path / "out"
        src = str(dicom_data.joinpath(*SAG))
        backend = f"triton://127.0.0.1:{grpc}/tiny"
        r = CliRunner().invoke(main, ["run", str(tiny), src, "-o", str(out), "--backend", backend, "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output[r.output.index("{") :])
        assert doc["succeeded"] == 1 and doc["backend"]["backend"] == "triton"
        assert len(list(out.glob("*_seg.dcm"))) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    log = (repo.parent / ".repo-tritonserver" / "tritonserver.log").read_text()
    assert "successfully unloaded 'tiny'" in log
    ours = [p for p in os.listdir("/proc") if p.isdigit()]
    stubs = []
    for pid in ours:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"triton_python_backend_stub" in cmdline and str(repo).encode() in cmdline:
            stubs.append(pid)
    assert not stubs, stubs
