"""Survey: what ``edgeseg run BUNDLE INPUT --format seg --json`` makes of every real DICOM we have.

For the whole of ``../shared/data/dicom`` in one run (one output folder: outcomes that share a
file would overwrite each other there) and for every folder of it on its own, through the real
command line (click, in process) with a tiny real bundle (a 2D ONNX model that thresholds the
z-scored image, ONNX Runtime on the CPU), it counts:

- series parts found (``find_series``), parts that load (``load_volume``), SEG written,
  refused with a reason (grouped by reason, paths and numbers taken out);
- outputs that two outcomes share (each is a result lost to an overwrite);
- ``dciodvfy`` (dicom3tools) errors in every SEG written.

    python benchmarks/survey_shared_dicom.py [--root DIR] [--json FILE] [--no-folders] [--pydicom]

Exit status 0 always (it measures); ``--strict`` exits 1 when an output is shared or a SEG has
dciodvfy errors.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "dicom"
DCIODVFY = shutil.which("dciodvfy")


def tiny_bundle(folder: Path) -> Path:
    """A real 2D bundle: Identity over a z-scored 32x32 slice, thresholded at 0.5."""
    from onnx import TensorProto, helper

    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.spec import Label, ModelSpec, ZScore

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = ModelSpec(
        dims=2,
        labels=[Label(1, "bright")],
        intensity=[ZScore()],
        target_shape=(32, 32),
        output="threshold",
        batch_size=8,
    )
    return write_bundle(
        folder / "survey.edgeseg", spec=spec, models={"fp32": model.SerializeToString()}, name="survey"
    )


def dciodvfy_errors(path: str | Path) -> list[str]:
    """``dciodvfy``'s error lines for ``path`` (``Error``/``Abort``); [] when valid."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, timeout=120)
    lines = (run.stdout + b"\n" + run.stderr).decode("utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.startswith(("Error", "Abort"))]


def _reason_class(error: str) -> str:
    """The reason without paths, labels, details in brackets and numbers, so that equal reasons
    group together (the example printed keeps them)."""
    text = error
    # Drop the leading "path: " or "path (label): " (labels may hold ": " themselves).
    m = re.match(r"^(/\S*(?: \(.*?\))?): ", text)
    if m:
        text = text[m.end() :]
    text = re.sub(r"\([^()]*\)", "(…)", text)
    text = re.sub(r"/\S+|\b[\w.-]+\.dcm\b", "<file>", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:120]


def _cli_run(bundle: Path, inputs: list[Path], out: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from edgeseg.cli import main

    args = ["run", str(bundle), *map(str, inputs), "-o", str(out), "--format", "seg", "--json"]
    args += ["--backend", "onnxruntime"]
    r = CliRunner().invoke(main, args, catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return {"crash": f"{type(r.exception).__name__}: {r.exception}", "outcomes": []}
    text = r.stdout if hasattr(r, "stdout") else r.output
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {"crash": text[-300:], "outcomes": []}
    except json.JSONDecodeError:
        return {"crash": "output is not JSON: " + text[-300:], "outcomes": []}


def survey_one(bundle: Path, inputs: list[Path], out: Path, *, check_seg: bool) -> dict[str, Any]:
    """Scan, load and run ``inputs``; counts plus the reasons and problems found."""
    from edgeseg.dicom import find_series, load_volume

    scan = find_series(inputs)
    loaded = 0
    load_errors: list[str] = []
    for ref in scan.series:
        try:
            load_volume(ref)
            loaded += 1
        except Exception as exc:  # noqa: BLE001 (counted: the CLI must say the same thing)
            load_errors.append(str(exc))
    t = time.perf_counter()
    doc = _cli_run(bundle, inputs, out)
    run_s = time.perf_counter() - t
    outcomes = doc.get("outcomes", [])
    by_output: dict[str, list[int]] = defaultdict(list)
    segs: list[str] = []
    refused: Counter[str] = Counter()  # series parts
    rejected: Counter[str] = Counter()  # files that are no part of any series
    examples: dict[str, str] = {}
    write_refused = 0
    # Outcomes of series parts follow the outcomes of rejected files, in scan order.
    n_rej = len(scan.rejected)
    aligned = len(outcomes) == n_rej + len(scan.series)
    for i, o in enumerate(outcomes):
        if o["status"] == "ok":
            for path in o["outputs"].values():
                by_output[path].append(i)
            if "seg" in o["outputs"]:
                segs.append(o["outputs"]["seg"])
        elif o["status"] in ("failed", "skipped"):
            cls = _reason_class(o["error"] or "")
            if aligned and i >= n_rej:
                refused[cls] += 1
                write_refused += 1
            else:
                cls = f"{o['status']}: {cls}"
                rejected[cls] += 1
            examples.setdefault(cls, o["error"] or "")
    shared = {p: ids for p, ids in by_output.items() if len(ids) > 1}
    seg_errors: dict[str, list[str]] = {}
    if check_seg and DCIODVFY:
        for path in sorted(set(segs)):
            errs = dciodvfy_errors(path)
            if errs:
                seg_errors[path] = errs
    return {
        "inputs": [str(p) for p in inputs],
        "crash": doc.get("crash"),
        "files_rejected": len(scan.rejected),
        "parts_found": len(scan.series),
        "parts_loaded": loaded,
        "outcomes": len(outcomes),
        "ok": sum(o["status"] == "ok" for o in outcomes),
        "skipped": sum(o["status"] == "skipped" for o in outcomes),
        "failed": sum(o["status"] == "failed" for o in outcomes),
        "parts_failed": write_refused,
        "parts_loaded_not_written": max(0, write_refused - len(load_errors)) if aligned else None,
        "seg_written": len(segs),
        "seg_files": len(set(segs)),
        "shared_outputs": len(shared),
        "results_lost": sum(len(ids) - 1 for ids in shared.values()),
        "refused": dict(refused.most_common()),
        "rejected": dict(rejected.most_common()),
        "examples": examples,
        "segs_checked": len(set(segs)) if DCIODVFY and check_seg else 0,
        "segs_with_errors": len(seg_errors),
        "dciodvfy_errors": sum(len(v) for v in seg_errors.values()),
        "dciodvfy_examples": dict(list(seg_errors.items())[:5]),
        "run_s": round(run_s, 2),
    }


def folders_of(root: Path) -> list[Path]:
    """Every folder under ``root`` that holds files, given as its own files (not its subfolders)."""
    out = []
    for d in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        files = sorted(p for p in d.iterdir() if p.is_file())
        if files:
            out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--json", type=Path, default=None, help="write the full survey here")
    ap.add_argument("--no-folders", action="store_true", help="only the whole-tree run")
    ap.add_argument("--pydicom", action="store_true", help="also pydicom's own test files")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args(argv)

    roots = [args.root]
    if args.pydicom:
        from pydicom.data import get_testdata_file

        roots.append(Path(get_testdata_file("CT_small.dcm")).parent)
    report: dict[str, Any] = {"root": [str(r) for r in roots], "dciodvfy": DCIODVFY, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="edgeseg-survey-") as tmp:
        tmp_path = Path(tmp)
        bundle = tiny_bundle(tmp_path)
        runs: list[tuple[str, list[Path], bool]] = [("whole tree", roots, True)]
        if not args.no_folders:
            for root in roots:
                for d in folders_of(root):
                    files = sorted(p for p in d.iterdir() if p.is_file())
                    runs.append((str(d.relative_to(root.parent)), files, False))
        for n, (name, inputs, check) in enumerate(runs):
            report["runs"][name] = survey_one(bundle, inputs, tmp_path / f"out{n}", check_seg=check)
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    whole = report["runs"]["whole tree"]
    folder_lost = sum(r["results_lost"] for r in report["runs"].values())
    bad = whole["dciodvfy_errors"] or folder_lost or whole["crash"]
    return 1 if (args.strict and bad) else 0


def _print(report: dict[str, Any]) -> None:
    whole = report["runs"]["whole tree"]
    print(f"# edgeseg survey of {', '.join(report['root'])}")
    print()
    keys = ["files_rejected", "parts_found", "parts_loaded", "seg_written", "parts_failed", "results_lost"]
    head = ["run", "rejected files", "parts", "loaded", "SEG written", "parts refused", "lost"]
    rows = [[name, *(str(r[k]) for k in keys)] for name, r in report["runs"].items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    print(
        f"whole tree: {whole['parts_found']} series parts, {whole['parts_loaded']} load, "
        f"{whole['seg_written']} SEG written to {whole['seg_files']} distinct files, "
        f"{whole['parts_failed']} parts refused ({whole['parts_loaded_not_written']} of them loaded), "
        f"{whole['files_rejected']} files rejected ({whole['skipped']} not images), "
        f"{whole['results_lost']} results lost to shared outputs"
    )
    if whole["crash"]:
        print(f"CLI CRASHED: {whole['crash']}")
    print(
        f"dciodvfy: {whole['segs_checked']} SEG checked, {whole['segs_with_errors']} with errors, "
        f"{whole['dciodvfy_errors']} error lines"
        + ("" if report["dciodvfy"] else " (dciodvfy not installed)")
    )
    for path, errs in whole["dciodvfy_examples"].items():
        print(f"  {Path(path).name}: {errs[0]}")
    print()
    print("series parts refused, by reason (whole tree; one example each):")
    for cls, n in whole["refused"].items():
        print(f"  {n:4d}  {cls}\n        e.g. {whole['examples'][cls][:200]}")
    print("files that are no part of a series, by reason (whole tree):")
    for cls, n in whole["rejected"].items():
        print(f"  {n:4d}  {cls}")
    folder_lost = {k: r["results_lost"] for k, r in report["runs"].items() if r["results_lost"]}
    if folder_lost:
        print(f"results lost per folder run: {folder_lost}")


if __name__ == "__main__":
    sys.exit(main())
