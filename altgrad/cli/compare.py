"""`altgrad compare RUN_A RUN_B [...]`: a table of runs with verdicts against the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from ..experiments.compare import DEFAULT_TOLERANCE, Comparison, compare_runs
from ..experiments.plots import plot_runs
from ..experiments.runs import load_run
from ..optim.memory import PARTS as MEMORY_PARTS
from .common import cell, console, fitted_width, user_errors

VERDICT_STYLE = {"PASS": "bold green", "INVESTIGATE": "bold yellow", "reference": "dim"}


def comparison_table(comparison: Comparison) -> Table:
    table = Table(title=f"runs vs {comparison.rows[0].name} (tolerance {comparison.tolerance:.0%})",
                  title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)  # no column rules, single spaces: fits an 80-column terminal
    show_status = any(row.status != "completed" for row in comparison.rows)  # diverged, interrupted
    # Best val, perplexity and the loss ratio are in --json (and the ratio in each verdict's reason
    # below the table): the table fits 80 columns.
    columns = ("run", "format", *(("status",) if show_status else ()), "final val", "grad cos",
               "bit stall", "stall ratio", "max overflow", "rank vs ref", "verdict")
    rows = [[row.name, row.label, *((row.status,) if show_status else ()), cell(row.final_val_loss),
             cell(row.mean_grad_cos), cell(row.mean_bit_stall),
             cell(row.mean_stall_ratio), cell(row.max_overflow, ".1e"), cell(row.rank_vs_reference, ".3f"),
             row.verdict]
            for row in comparison.rows]
    for index, column in enumerate(columns):
        # In a narrow terminal headers and run names wrap; numbers and verdicts keep their width.
        # A label wraps between format and arm ("e5m2" / "manifold-sr"), never inside a word.
        # Headers wrap between words; each other column is exactly as wide as its widest word.
        width = fitted_width([word for cells in rows
                              for word in (cells[index].split() if column == "format" else [cells[index]])], column)
        table.add_column(column, justify="left" if column in ("run", "format", "status", "verdict") else "right",
                         min_width=None if column == "run" else width,
                         max_width=None if column in ("run", "format") else width,
                         overflow="fold")
    for cells in rows:
        cells[-1] = f"[{VERDICT_STYLE[cells[-1]]}]{cells[-1]}[/]"
        table.add_row(*cells)
    return table


def memory_table(comparison: Comparison) -> Table:
    """One row per run: its bits per weight with a format (total and parts) as its summary
    recorded them; "not recorded" for a run from before the record, "-" without weight formats."""
    table = Table(title="bits per parameter: the training state of the weights with a format",
                  title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in ("run", "total", *MEMORY_PARTS):
        table.add_column(column, justify="left" if column == "run" else "right", overflow="fold")
    for row in comparison.rows:
        if not row.memory_recorded:
            table.add_row(row.name, "not recorded", *("-" for _ in MEMORY_PARTS))
        elif row.memory is None:
            table.add_row(row.name, "no weight format", *("-" for _ in MEMORY_PARTS))
        else:
            table.add_row(row.name, cell(row.memory.get("total"), ".4g"),
                          *(cell(row.memory.get(part), ".4g") for part in MEMORY_PARTS))
    return table


def collapse_line(name: str, collapse: dict) -> str:
    """Where a run failed, in one paragraph: the step and why, then its zero-update regions."""
    def layers(pairs):
        return ", ".join(f"{layer.removeprefix('transformer.')} {value:.3f}" for layer, value in pairs) or "-"

    sparsity = sorted(collapse.get("gradient_sparsity", {}).items(), key=lambda item: -item[1])[:3]
    where = f" (layers at step {collapse['measured_at']})" if "measured_at" in collapse else ""
    return (f"[bold red]collapse:[/] {name} at step {collapse['step']}: {collapse['reason']}{where}; "
            f"zero gradients: {layers(sparsity)}; highest stall: {layers(collapse['highest_stall'])}; "
            f"highest gradient underflow: {layers(collapse['highest_underflow'])}")


def compare(
    runs: list[str] = typer.Argument(..., help="Run folder names; the first is the reference."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the runs are."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, help="Relative val-loss increase that still PASSes."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write loss curves and key metrics to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Compare runs: losses, perplexity, gradient fidelity, bit-stall, overflow, and a verdict."""
    with user_errors():
        if len(runs) < 2:
            raise typer.BadParameter("give at least two runs: the reference first")
        records = [load_run(runs_dir, name) for name in runs]
        comparison = compare_runs(records, tolerance)
        if plot is not None:
            plot_runs(records, plot)
        if as_json:
            typer.echo(json.dumps(comparison.to_dict(), indent=2))
        else:
            console.print(comparison_table(comparison))
            console.print(memory_table(comparison))
            for row in comparison.rows:
                if row.reason:
                    console.print(f"[{VERDICT_STYLE[row.verdict]}]{row.verdict}[/] {row.name}: {row.reason}")
            for row in comparison.rows:
                if row.collapse:
                    console.print(collapse_line(row.name, row.collapse))
            held = [row.name for row in comparison.rows if not row.collapse and row.status == "completed"]
            if held:
                console.print(f"no collapse (validation loss stayed below its step-0 value, no divergence): "
                              f"{', '.join(held)}")
            for row in comparison.rows:
                if row.rank_warnings:
                    console.print(f"[yellow]rank:[/] {row.name}: effective rank below its threshold in "
                                  f"{row.rank_warnings} layer measurement(s) (summary.json, alerts rank_drop/<layer>)")
            for note in comparison.notes:
                console.print(f"[yellow]note:[/] {note}")
            if plot is not None:
                console.print(f"plot written to {plot}")
