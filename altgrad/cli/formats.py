"""`altgrad inspect-format`: a format's grid, range and spacing as rich tables or JSON."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.columns import Columns
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..errors import UserError
from ..quantization import REGISTRY, FloatFormat, get_format
from .common import console, number, user_errors

ULP_PROBES = (2.0**-8, 2.0**-4, 0.5, 1.0, 2.0, 16.0, 256.0)


def _layout(fmt: FloatFormat) -> str:
    return " ".join(part for part in ("S", "E" * fmt.exponent_bits, "M" * fmt.mantissa_bits) if part)


def _specials(fmt: FloatFormat) -> tuple[str, str]:
    nan = {"none": "none", "ieee": "e=all ones, m>0", "fn": "S.1..1.1..1"}[fmt.special]
    return ("±inf" if fmt.has_inf else "no"), nan


def _neighbourhood_of_one(fmt: FloatFormat, count: int = 3) -> str:
    values = list(fmt.positive_values)
    index = min(range(len(values)), key=lambda i: abs(values[i] - 1.0))
    around = values[max(0, index - count) : index + count + 1]
    return "  ".join(f"[bold]{number(v)}[/]" if v == values[index] else number(v) for v in around)


def _detail_table(fmt: FloatFormat) -> Table:
    table = Table(title=f"{fmt.name}  ({fmt.spec})", show_header=False, title_justify="left")
    table.add_column("property", style="cyan")
    table.add_column("value")
    inf, nan = _specials(fmt)
    rows = [
        ("bits", f"{fmt.bits}  ({_layout(fmt)})"),
        ("exponent / mantissa bits", f"{fmt.exponent_bits} / {fmt.mantissa_bits}"),
        ("bias", str(fmt.bias)),
        ("max", number(fmt.max)),
        ("min normal", number(fmt.min_normal)),
        ("min subnormal", number(fmt.min_subnormal)),
        ("finite values", str(fmt.num_finite)),
        ("inf", inf),
        ("NaN codes", nan),
        ("dynamic range", f"{fmt.binades:.2f} binades ({len(fmt.exponents)} exponents)"),
    ]
    for probe in ULP_PROBES:
        if fmt.min_positive <= probe <= fmt.max:
            rows.append((f"ULP at {number(probe)}", number(float(fmt.ulp(probe)))))
    rows.append(("grid around 1.0", _neighbourhood_of_one(fmt)))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _grid_table(fmt: FloatFormat) -> Group:
    title = Text(f"{fmt.name}: all {len(fmt.positive_values)} non-negative values", style="bold")
    return Group(title, Columns([number(float(v)) for v in fmt.positive_values], equal=True))


def _all_table(formats: list[FloatFormat]) -> Table:
    table = Table(title="Registered formats", box=None, padding=(0, 1), pad_edge=False, header_style="bold",
                  caption="special: none = all codes finite, fn = one NaN code (OCP E4M3), "
                          "ieee = ±inf and NaNs; ULP: grid spacing at 1.0")
    for column in ("format", "bias", "max", "min normal", "min sub", "values", "special",
                   "binades", "ULP"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("format", "special") else "right")
    for fmt in formats:
        ulp_at_one = number(float(fmt.ulp(1.0))) if fmt.min_positive <= 1.0 <= fmt.max else "-"
        table.add_row(fmt.name, str(fmt.bias),
                      number(fmt.max), number(fmt.min_normal), number(fmt.min_subnormal),
                      str(fmt.num_finite), fmt.special,
                      f"{fmt.binades:.1f}", ulp_at_one)
    return table


def inspect_format(
    name: Optional[str] = typer.Argument(None, help="Registered name (E4M3) or spec (E3M4:bias=3, E2M1)."),
    all_formats: bool = typer.Option(False, "--all", help="One side-by-side table of every registered format."),
    grid: bool = typer.Option(False, "--grid", help="Also list every non-negative value."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a format's bits, range, spacing and grid."""
    with user_errors():
        if all_formats == (name is not None):
            raise UserError("give a format name or --all (not both); e.g. altgrad inspect-format E4M3")
        formats = list(REGISTRY.values()) if all_formats else [get_format(name)]
        if as_json:
            payload = [f.summary() for f in formats] if all_formats else formats[0].summary()
            typer.echo(json.dumps(payload, indent=2))
            return
        if all_formats:
            console.print(_all_table(formats))
        else:
            console.print(_detail_table(formats[0]))
        if grid:
            for fmt in formats:
                console.print(_grid_table(fmt))
