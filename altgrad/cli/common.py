"""Shared CLI plumbing: consoles and the user-error boundary."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import typer
from rich.console import Console

from ..errors import UserError

console = Console()
error_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into one readable line on stderr and a non-zero exit code."""
    try:
        yield
    except UserError as error:
        error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None


def cell(value: float | None, spec: str = ".4f") -> str:
    """A table cell for a number: "-" when absent; NaN shows as nan (undefined, or a broken run)."""
    return "-" if value is None else format(value, spec)


def fitted_width(cells: Iterable[str], header: str) -> int:
    """A column width that keeps every cell whole, while the header may wrap between its words."""
    return max(*(len(c) for c in cells), *(len(word) for word in header.split()))


def number(value: float | None) -> str:
    """Short exact-looking rendering: 2^k and m·2^k far from 1, else 5 significant digits."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    sign = "-" if value < 0 else ""
    mantissa, exponent = math.frexp(abs(value))
    if mantissa == 0.5 and not 2.0**-4 <= abs(value) <= 2.0**12:
        return f"{sign}2^{exponent - 1}"
    if abs(value) >= 2.0**20:
        return f"{sign}{2 * mantissa:g}·2^{exponent - 1}"
    return f"{value:.5g}"
