"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


def parse_list(value: str | None, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip().lower() for v in (value or "").split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise click.BadParameter(
            f"unknown value(s) {bad}; choose from {', '.join(allowed)}", param_hint=option
        )
    return items


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain Markdown-style table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
