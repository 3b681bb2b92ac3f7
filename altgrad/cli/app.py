"""The Typer application; each command lives in its own module."""

from __future__ import annotations

import typer

from .. import __version__
from .compare import compare
from .data import prepare_data
from .formats import inspect_format
from .matrix import matrix_app
from .report import report
from .train import train

app = typer.Typer(
    name="altgrad",
    help="Exact FP8 simulation and geometry-aware optimizers for low-precision training research.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("inspect-format")(inspect_format)
app.command("prepare-data")(prepare_data)
app.command("train")(train)
app.command("compare")(compare)
app.add_typer(matrix_app, name="matrix")
app.command("report")(report)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"altgrad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """AltGrad: which 8-bit float format benefits most from geometry-aware weight updates?"""


def main() -> None:
    app()
