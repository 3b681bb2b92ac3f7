"""`altgrad report`: what a matrix found, and the answer its tuning protocol supports."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from ..experiments.matrix import layer_suffix
from ..experiments.report_checks import side_effects
from ..experiments.report_failures import format_sentences
from ..experiments.report_files import _f, step_rows, tuning_rows, write_report
from ..experiments.report_files import interval as _interval
from .common import console, user_errors


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column)
    return table


def report(
    source: Path = typer.Argument(..., help="A matrix YAML or its runs directory (with manifest.json)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.md, report.json and PNGs."),
    scale: Path = typer.Option(None, "--scale", help="An `altgrad matrix estimate --out` file: what a larger "
                                                     "matrix would need, in its own section."),
) -> None:
    """The interaction per format (geometry's format-specific benefit) with the checks that
    establish it, the null control, the tuning record, step sizes, every cell and figures."""
    with user_errors():
        analysis, files = write_report(source, out, scale)
        cells = _table("cells (final val loss: mean over seeds; differences paired by seed, 95% t-interval; "
                       "bits per weight with a format)",
                       ("format", "arm", "val loss", "vs BF16", "vs arm A", "bits/param", "diverged"))
        for g in analysis.groups:
            memory = analysis.memory.get(g.key)
            cells.add_row(g.format + layer_suffix(g.layers), g.arm_name, _f(g.mean_loss()),
                          _interval(analysis.vs_baseline.get(g.key)), _interval(analysis.vs_arm_a.get(g.key)),
                          memory.short if memory is not None else "not recorded", f"{g.diverged}/{len(g.cells)}")
        console.print(cells)
        rows = tuning_rows(analysis)
        if rows:
            tuning = _table("tuning (per group; values tried and inherited values in report.md)",
                            ("group", "chosen", "interior", "runs/budget", "resolution"))
            for r in rows:
                tuning.add_row(r["group"], r["chosen"], r["interior"], r["budget"], r["resolution"])
            console.print(tuning)
        steps = _table("step sizes (mean over seeds of the run mean; layer means)",
                       ("format", "arm", "intended", "realized", "decay applied"))
        for where, arm, _, values in step_rows(analysis):
            steps.add_row(where, arm, *values)
        console.print(steps)
        if analysis.comparisons:
            question = _table("the question: interaction (gs - C) - (gm - A), paired by seed",
                              ("format", "optimizer", "interaction [95%]", "Holm p", "resolution"))
            for c in analysis.comparisons:
                question.add_row(c.where, c.optimizer_name, _interval(c.interaction), _f(c.holm_p, ".3g"),
                                 _f(c.resolution))
            console.print(question)
            effects = _table("beside it: update rule (gm - A), storage (C - A, gs - gm), remedies (gs - ECO, "
                             "gs - C-kahan), the same checks",
                             ("effect", "difference [95%]", "Holm p", "resolution", "verdict"))
            beside = side_effects(analysis.comparisons)
            for c, e in beside:
                effects.add_row(c.label(e), _interval(e.paired), _f(e.holm_p, ".3g"), _f(e.resolution),
                                "[green]established[/]" if e.established else "[red]not established[/]")
            console.print(effects)
            for label, effect in [(f"{c.where} {c.optimizer_name}", c.question) for c in analysis.comparisons] + \
                    [(c.label(e), e) for c, e in beside]:
                verdict = "[green]established[/]" if effect.established else "[red]not established[/]"
                console.print(f"{label}: {verdict}", soft_wrap=True)
                for check in effect.checks:
                    if not check.ok:
                        console.print(f"  {check.name}: {check.detail}", soft_wrap=True)
        for n in analysis.not_compared:
            console.print(f"[dim]not compared:[/] {n.text}")
        for found in analysis.frontiers:
            console.print(f"[bold]memory/loss frontier:[/] {found.text}", soft_wrap=True)
        if analysis.sweet_spot is not None:
            for line in analysis.sweet_spot.lines:
                console.print(f"[bold]sweet spot:[/] {line.sentence}", soft_wrap=True)
        if analysis.failures is not None:
            for line in format_sentences(analysis.failures):
                console.print(f"[bold]where it fails:[/] {line}", soft_wrap=True)
        console.print(f"[bold]null control:[/] {analysis.null_control.status}")
        console.print(f"[bold]answer:[/] {analysis.answer}")
        for note in analysis.notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"wrote {', '.join(str(p) for p in files.values())}")
