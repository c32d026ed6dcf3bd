"""Import optional dependencies inside the function that needs them, with a useful error."""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeseg._exceptions import BackendError


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`BackendError` naming the feature and the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the exact reason (missing .so, wrong CUDA) matters to the user
        raise BackendError(
            f"{feature} needs the Python module '{module}', which could not be imported ({exc}). "
            f"Install it with: pip install 'edgeseg[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
