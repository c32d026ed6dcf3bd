"""DCMTK as the real peers: echoscu/storescu as the scanner (every transfer syntax the listener
accepts), storescp as the PACS receiving the SEG through --forward."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from edgeseg.stream._log import uid_key
from edgeseg.stream.scp import transfer_syntaxes
from edgeseg.stream.service import ServiceConfig, StreamService
from edgeseg.stream.testing import free_port, wait_for

TCIA = ("tcia_brain_tumor_progression", "PGBM-003_Study3", "26401-T1prereg-52906")  # 22 MR slices
SAG = ("dcm_qa_decubitus", "HFS_t1_fl2d_sag")  # unsigned 12-bit MR (JPEG-LS near-lossless needs it)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# transfer syntax → (source series, how it is made: storescu option, or a DCMTK encoder command)
# A file already compressed in ../shared/data is used where a CT/MR one exists (JPEG 2000).
PLAN = {
    "1.2.840.10008.1.2.1": (TCIA, ["-xe"], None),
    "1.2.840.10008.1.2": (TCIA, ["-xi"], None),
    "1.2.840.10008.1.2.1.99": (TCIA, ["-xd"], None),
    "1.2.840.10008.1.2.2": (TCIA, ["-xf", "{cfg}", "BIG"], None),
    "1.2.840.10008.1.2.4.70": (TCIA, ["-xs"], ["dcmcjpeg", "+e1"]),
    "1.2.840.10008.1.2.4.57": (TCIA, ["-xf", "{cfg}", "JPEG57"], ["dcmcjpeg", "+el"]),
    "1.2.840.10008.1.2.4.50": (TCIA, ["-xy"], ["dcmcjpeg", "+eb"]),
    "1.2.840.10008.1.2.4.51": (TCIA, ["-xx"], ["dcmcjpeg", "+ee"]),
    "1.2.840.10008.1.2.4.80": (TCIA, ["-xt"], ["dcmcjpls", "+el"]),
    "1.2.840.10008.1.2.4.81": (SAG, ["-xu"], ["dcmcjpls", "+en"]),
    "1.2.840.10008.1.2.5": (TCIA, ["-xr"], ["dcmcrle"]),
    "1.2.840.10008.1.2.4.90": (("pydicom", "mr", "MR_small_jp2klossless.dcm"), ["-xv"], None),
    "1.2.840.10008.1.2.4.91": (("pydicom", "mr", "MR2_J2KI.dcm"), ["-xw"], None),
}

# storescu has no option for JPEG Lossless process 14 (.57), and with -xb it also offers little
# endian, which the listener prefers: profiles in storescu's config file format offer one each.
STORESCU_CFG = """[[TransferSyntaxes]]
[JPEG57]
TransferSyntax1 = 1.2.840.10008.1.2.4.57
[BIG]
TransferSyntax1 = 1.2.840.10008.1.2.2
[[PresentationContexts]]
[JPEG57]
PresentationContext1 = MRImageStorage\\JPEG57
[BIG]
PresentationContext1 = MRImageStorage\\BIG
[[Profiles]]
[JPEG57]
PresentationContexts = JPEG57
[BIG]
PresentationContexts = BIG
"""


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed (Debian package dcmtk)")


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def brain_processor(brain_bundle):
    from edgeseg.segmenter import Segmenter
    from edgeseg.stream.cli_support import segmenter_processor

    seg = Segmenter.open(brain_bundle, backend="cpu")
    yield segmenter_processor(seg)
    seg.close()


def _prepare(dicom_data: Path, ts: str, work: Path) -> tuple[list[Path], list[str], str]:
    """Files for one transfer syntax, as their own series; (files, storescu options, series UID)."""
    parts, options, encoder = PLAN[ts]
    src = dicom_data.joinpath(*parts)
    files = [src] if src.is_file() else sorted(src.glob("*.dcm"))
    out = work / ts
    out.mkdir(parents=True)
    series = generate_uid()
    made = []
    for i, f in enumerate(files):
        target = out / f"{i:03d}.dcm"
        if encoder is None:
            shutil.copyfile(f, target)
        else:
            r = _run([*encoder, str(f), str(target)])
            assert r.returncode == 0, (encoder, r.stderr)
        # A new series and new instances, so that every syntax is a series of its own.
        r = _run(["dcmodify", "-nb", "-m", f"(0020,000e)={series}", "-gin", str(target)])
        assert r.returncode == 0, r.stderr
        made.append(target)
    if encoder is not None or src.is_file():
        assert str(pydicom.dcmread(made[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
    return made, options, series


def test_echoscu_and_storescu_in_every_transfer_syntax_then_storescp_gets_the_segs(
    tmp_path, dicom_data, brain_processor
):
    _need("echoscu", "storescu", "storescp", "dcmodify", "dcmcjpeg", "dcmcjpls", "dcmcrle")
    assert set(PLAN) == set(transfer_syntaxes()), "a transfer syntax the listener accepts is not tested"
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), "+uf", str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cfg = ServiceConfig(
        out_dir=tmp_path / "out",
        listen=("127.0.0.1", free_port()),
        forward=[f"PACS@127.0.0.1:{pacs_port}"],
        series_timeout_s=0.5,
        forward_base_delay_s=0.2,
        forward_max_delay_s=0.5,
    )
    svc = StreamService(cfg, brain_processor)
    svc.start()
    try:
        port = str(svc.listener.port)
        r = _run(["echoscu", "-aec", "EDGESEG", "127.0.0.1", port])
        assert r.returncode == 0, r.stderr
        sent: dict[str, str] = {}
        cfg = tmp_path / "storescu.cfg"
        cfg.write_text(STORESCU_CFG)
        for ts in PLAN:
            files, options, series = _prepare(dicom_data, ts, tmp_path / "in")
            options = [o.replace("{cfg}", str(cfg)) for o in options]
            r = _run(["storescu", "-aec", "EDGESEG", "-aet", "SCANNER", *options, "127.0.0.1", port,
                      *map(str, files)])  # fmt: skip
            assert r.returncode == 0, (ts, r.stdout, r.stderr)
            sent[series] = ts
        # What the listener received really came in each syntax (the spool keeps it as sent).
        got: dict[str, str] = {}
        for f in (tmp_path / "out" / ".spool" / "incoming").rglob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            got[str(ds.SeriesInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
        wrong = {ts: got.get(series) for series, ts in sent.items() if got.get(series) != ts}
        assert not wrong, wrong
        by_key = {uid_key(series): ts for series, ts in sent.items()}

        def settled() -> bool:
            rows = svc.journal.series_rows()
            return len(rows) == len(PLAN) and all(r["state"] in ("delivered", "quarantined") for r in rows)

        assert wait_for(settled, 90)
        outcome = {by_key.get(r["key"]): (r["state"], r["reason"]) for r in svc.journal.series_rows()}
        print("transfer syntax outcomes:", outcome)
        assert all(state == "delivered" for state, _ in outcome.values()), outcome
        segs = [pydicom.dcmread(p) for p in pacs_dir.iterdir()]
        assert all(s.SOPClassUID == SEG_STORAGE for s in segs)
        referenced = {s.ReferencedSeriesSequence[0].SeriesInstanceUID for s in segs}
        assert referenced == set(sent), {sent[s] for s in set(sent) - referenced}
    finally:
        svc.stop()
        pacs.terminate()
        try:
            pacs.wait(10)
        except subprocess.TimeoutExpired:
            pacs.kill()
            pacs.wait(5)
