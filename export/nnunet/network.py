"""Rebuilding an nnU-Net v2 network from its plans and loading a fold's weights."""

from __future__ import annotations

import importlib
from typing import Any

from edgeseg._exceptions import ExportError

# Names in plans.json are imported; only these packages may be named (the plans come from a
# folder, and importing is running code).
_ALLOWED = ("dynamic_network_architectures.", "torch.nn.")


def _locate(name: str, field: str) -> Any:
    if not name.startswith(_ALLOWED):
        raise ExportError(
            f"plans field {field} names {name!r}: only dynamic_network_architectures networks "
            "and torch.nn layers are rebuilt"
        )
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"plans field {field}: cannot import {name!r} ({exc})") from None


def build_network(config: dict[str, Any], config_name: str, in_channels: int, num_outputs: int):
    """The plans' architecture with deep supervision off, as nnU-Net's get_network_from_plans."""
    arch = config.get("architecture")
    where = f"configurations.{config_name}.architecture"
    if not isinstance(arch, dict) or "network_class_name" not in arch:
        raise ExportError(f"plans field {where} is missing (plans from nnU-Net < 2.4 are not supported)")
    kwargs = dict(arch.get("arch_kwargs") or {})
    for key in arch.get("_kw_requires_import") or []:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], f"{where}.arch_kwargs.{key}")
    cls = _locate(arch["network_class_name"], f"{where}.network_class_name")
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=in_channels, num_classes=num_outputs, **kwargs)
    except TypeError as exc:
        raise ExportError(f"plans field {where}.arch_kwargs does not fit {cls.__name__} ({exc})") from None


def load_weights(net, checkpoint: dict[str, Any], source: str):
    """Load ``network_weights`` (strict; the ``_orig_mod.`` prefix torch.compile adds is removed)."""
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["network_weights"].items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ExportError(f"{source}: the weights do not fit the plans' network ({first})") from None
    return net.eval()


class Ensemble:
    """Factory for a module that averages several folds' raw outputs (nnU-Net averages logits)."""

    @staticmethod
    def of(nets: list):
        import torch

        class _Mean(torch.nn.Module):
            def __init__(self, members: list) -> None:
                super().__init__()
                self.members = torch.nn.ModuleList(members)

            def forward(self, x):
                y = self.members[0](x)
                for m in self.members[1:]:
                    y = y + m(x)
                return y * (1.0 / len(self.members))

        return nets[0] if len(nets) == 1 else _Mean(nets).eval()
