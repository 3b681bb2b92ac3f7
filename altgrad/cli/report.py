"""`altgrad report`: what a matrix found, with paired intervals, figures and a plain answer."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from ..experiments.matrix import layer_suffix
from ..experiments.report_files import interval as _interval
from ..experiments.report_files import write_report
from .common import console, user_errors


def report(
    source: Path = typer.Argument(..., help="A matrix YAML or its runs directory (with manifest.json)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.md, report.json and PNGs."),
) -> None:
    """Final losses, paired differences with 95% intervals, the geometry benefit per format, figures."""
    with user_errors():
        analysis, files = write_report(source, out)
        table = Table(title="cells (final val loss: mean over seeds; differences paired by seed, 95% t-interval)",
                      title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("format", "arm", "val loss", "vs BF16", "diverged"):
            table.add_column(column, justify="left" if column in ("format", "arm") else "right")
        for g in analysis.groups:
            loss = g.mean_loss()
            table.add_row(g.format + layer_suffix(g.layers),
                          g.arm, "n/a" if loss != loss else f"{loss:.4f}",
                          _interval(analysis.vs_baseline.get(g.key)), f"{g.diverged}/{len(g.cells)}")
        console.print(table)
        if analysis.benefits:
            benefit = Table(title="geometry benefit (geometry arm - control, same seed)", title_justify="left",
                            box=box.SIMPLE_HEAD, pad_edge=False)
            for column in ("format", "arm", "vs", "difference [95%]", "beyond noise"):
                benefit.add_column(column)
            for b in analysis.benefits:
                benefit.add_row(b.format + layer_suffix(b.layers), b.arm,
                                b.control, _interval(b.paired), "yes" if b.real(analysis.noise_floor) else "no")
            console.print(benefit)
        console.print(f"[bold]answer:[/] {analysis.answer}")
        console.print(f"[dim]{analysis.limits}[/]")
        for note in analysis.notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"wrote {', '.join(str(p) for p in files.values())}")
