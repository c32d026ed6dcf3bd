"""Print the API surface of the TensorRT Python bindings on ``sys.path`` as JSON.

Run in a child interpreter (the bindings import over stub libnvinfer libraries that define the
C entry points but no behaviour): every ``trt.X``, ``trt.X.Y`` and ``X.Y`` name, and for each
callable the parameter names of every pybind11 overload, read off its signature docstring.
"""

from __future__ import annotations

import json
import re
import sys

import tensorrt_bindings as trt

SIGNATURE = re.compile(r"^(?:\d+\. )?(\w+)\((.*?)\) ->", re.M)


def _params(doc: str, name: str) -> list[list[str]]:
    out = []
    for m in SIGNATURE.finditer(doc or ""):
        if m.group(1) != name:
            continue
        params, depth, cur = [], 0, ""
        for ch in m.group(2) + ",":  # split on top-level commas (types hold brackets)
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            if ch == "," and depth == 0:
                p = cur.strip().split(":")[0].split("=")[0].strip()
                if p and p != "self" and not p.startswith("*"):
                    params.append(p)
                cur = ""
            else:
                cur += ch
        out.append(params)
    return out


def main() -> None:
    names: set[str] = set()
    sigs: dict[str, list[list[str]]] = {}
    for top in dir(trt):
        if top.startswith("__") and top != "__version__":
            continue
        obj = getattr(trt, top)
        names.add(f"trt.{top}")
        if callable(obj) and not isinstance(obj, type):
            sigs[f"trt.{top}"] = _params(getattr(obj, "__doc__", ""), top)
        if isinstance(obj, type):
            init = getattr(obj, "__init__", None)
            sigs[f"trt.{top}"] = _params(getattr(init, "__doc__", "") or "", "__init__")
            for member in dir(obj):
                if member.startswith("__"):
                    continue
                names.add(f"trt.{top}.{member}")
                names.add(f"{top}.{member}")
                attr = getattr(obj, member, None)
                if callable(attr) and not isinstance(attr, type):
                    sigs[f"{top}.{member}"] = _params(getattr(attr, "__doc__", "") or "", member)
    json.dump({"version": trt.__version__, "names": sorted(names), "signatures": sigs}, sys.stdout)


if __name__ == "__main__":
    main()
