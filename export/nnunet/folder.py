"""Reading an nnU-Net v2 results folder: dataset.json, plans.json, fingerprint, fold checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseg._exceptions import ExportError

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def is_nnunet_folder(path: str | Path) -> bool:
    """True for a directory holding nnU-Net's plans.json (what build-engine dispatches on)."""
    p = Path(path)
    return p.is_dir() and (p / "plans.json").is_file()


@dataclass
class NnunetFolder:
    """What a results folder holds, read and checked; checkpoints are loaded by :meth:`load`."""

    path: Path
    dataset_json: dict[str, Any]
    plans: dict[str, Any]
    fingerprint: dict[str, Any] | None
    configuration: str
    trainer: str
    plans_name: str
    checkpoints: dict[str, Path] = field(default_factory=dict)  # fold → checkpoint file

    def load(self, fold: str) -> dict[str, Any]:
        """The checkpoint of ``fold`` as a dict.

        nnU-Net checkpoints are full pickles (``init_args`` holds a ``torch.device``), so this
        needs ``torch.load(weights_only=False)``, which can run code stored in the file: it is
        only ever called on the folder the user named on the command line.
        """
        import torch

        path = self.checkpoints[fold]
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file: one sentence, not a traceback
            raise ExportError(f"{path}: cannot read the nnU-Net checkpoint ({exc})") from None
        if not isinstance(ck, dict) or "network_weights" not in ck:
            raise ExportError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
        return ck


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None


def read_folder(path: str | Path, folds: list[str] | None = None, checkpoint: str = "final") -> NnunetFolder:
    """Read ``path`` (``<Trainer>__<Plans>__<config>``); ``folds`` default to every ``fold_*``
    with the checkpoint (else ``all``)."""
    root = Path(path)
    if not is_nnunet_folder(root):
        raise ExportError(f"{root}: not an nnU-Net results folder (no plans.json)")
    if checkpoint not in CHECKPOINTS:
        raise ExportError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    parts = root.name.split("__")
    if len(parts) != 3:
        raise ExportError(
            f"{root}: the folder name must be <Trainer>__<Plans>__<configuration>, as nnU-Net writes it"
        )
    trainer, plans_name, configuration = parts
    for name in ("dataset.json", "plans.json"):
        if not (root / name).is_file():
            raise ExportError(f"{root}: no {name} (copy the whole results folder)")
    fp = root / "dataset_fingerprint.json"
    ckname = CHECKPOINTS[checkpoint]
    if folds is None:
        found = sorted(
            (p for p in root.glob("fold_*") if (p / ckname).is_file()),
            key=lambda p: (not p.name[5:].isdigit(), int(p.name[5:]) if p.name[5:].isdigit() else 0),
        )
        names = [p.name[5:] for p in found]
        numbered = [n for n in names if n != "all"]
        folds = numbered or names
    if not folds:
        raise ExportError(f"{root}: no fold_*/{ckname} to export")
    checkpoints: dict[str, Path] = {}
    for f in folds:
        ck = root / f"fold_{f}" / ckname
        if not ck.is_file():
            raise ExportError(f"{root}: fold {f} has no {ckname}")
        checkpoints[str(f)] = ck
    return NnunetFolder(
        path=root,
        dataset_json=_json(root / "dataset.json"),
        plans=_json(root / "plans.json"),
        fingerprint=_json(fp) if fp.is_file() else None,
        configuration=configuration,
        trainer=trainer,
        plans_name=plans_name,
        checkpoints=checkpoints,
    )
