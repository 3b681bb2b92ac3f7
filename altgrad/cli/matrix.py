"""`altgrad matrix run | status | estimate | doc`: the experiment matrix from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..experiments.launch import MatrixRunner
from ..experiments.matrix import Cell, load_matrix, with_settings
from ..experiments.status import cell_status
from .common import cell as number_cell
from ..errors import UserError
from .common import console, error_console, user_errors

matrix_app = typer.Typer(help="Run the format x arm x layers x seed matrix; see its status; document it.",
                         no_args_is_help=True)


def _load(file: Path, runs_dir: Optional[Path], data: Optional[str]):
    return with_settings(load_matrix(file), runs_dir=runs_dir, data=data)


def cells_table(cells: list[Cell], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("cell", "format", "arm", "layers", "seed", "steps", "note"):
        table.add_column(column, no_wrap=column != "note")
    for c in cells:
        config = c.config
        note = ", ".join(f"{k}={v:g}" for k, v in c.sweep.items()) if c.sweep else ("expected to fail" if c.expected_failure else "")
        table.add_row(c.folder, c.format, c.arm, c.layers, str(c.seed), str(config.max_steps), note)
    return table


def _options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, each value read as YAML (numbers, booleans, strings)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm takes KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def run(
    file: Path = typer.Argument(..., help="Matrix YAML, e.g. configs/matrix/small.yaml."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Cells at once (local); the CPU threads are divided among them."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and run nothing."),
    launcher: str = typer.Option("local", "--launcher", help="local | slurm (submitit; options under launcher.slurm)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run cells that failed before again."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where the cells go (default: the file's runs_dir)."),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared data for every cell (default: the file's)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per cell (default: CPUs / jobs)."),
    keep_checkpoints: bool = typer.Option(
        False, "--keep-checkpoints", help="Keep a finished cell's checkpoints (default: only its summary, metrics "
                                          "and config stay; a finished cell never resumes)."),
    slurm: Optional[list[str]] = typer.Option(
        None, "--slurm", help="A submitit executor option KEY=VALUE (repeatable; over launcher.slurm in the file), "
                              "e.g. --slurm slurm_partition=gpu --slurm timeout_min=120."),
) -> None:
    """Run every cell (sweeps first): finished cells are skipped, interrupted ones resumed."""
    with user_errors():
        matrix = _load(file, runs_dir, data)
        if dry_run:
            sweeps = matrix.sweep_cells()
            if sweeps:
                console.print(cells_table(sweeps, f"tuning: {len(sweeps)} first runs on seed {matrix.tuning_seed} "
                                                  f"(grids extend at an edge, at most {matrix.budget} runs a group; "
                                                  "the chosen values -> all seeds)"))
            cells = matrix.cells()
            console.print(cells_table(cells, f"{len(cells)} cells of {file} -> {matrix.runs_dir}"
                                             + (" (tuned values not yet known: the arms' own)" if sweeps else "")))
            return
        runner = MatrixRunner(matrix, jobs=jobs, launcher=launcher, retry_failed=retry_failed, threads=threads,
                              executor_options=_options(slurm or []), keep_checkpoints=keep_checkpoints)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("[green]{task.fields[running]} running[/] [red]{task.fields[failed]} failed[/]"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
        task = None

        def on_event(kind: str, cell: Cell | None, payload: dict[str, Any] | None, progress) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("cells", total=progress.total, running=0, failed=0)
            if kind == "phase":
                bar.console.print(f"[bold]{payload['phase']}[/]: {payload['cells']} cells, {payload['todo']} to run")
            elif kind == "cell":
                status = payload.get("status")
                style = {"completed": "green", "diverged": "yellow", "failed": "red"}.get(status, "white")
                loss = payload.get("final_val_loss")
                detail = f"val {number_cell(loss)}" if status in ("completed", "diverged") else payload.get("error", "")
                bar.console.print(f"[{style}]{status}[/] {cell.folder} {detail}"
                                  + (f" (log: {payload['log']})" if status == "failed" else ""))
            elif kind == "message":
                bar.console.print(f"[yellow]{payload['text']}[/]")
            bar.update(task, total=progress.total, completed=progress.done, running=progress.running,
                       failed=progress.failed)

        try:
            with bar:
                manifest = runner.run(on_event)
        except KeyboardInterrupt:
            error_console.print("interrupted: finished cells are kept; run the same command again to resume")
            raise typer.Exit(130) from None
        failed = [c for c in manifest["cells"].values() if c.get("status") == "failed"]
        console.print(f"manifest: {matrix.runs_dir / 'manifest.json'}; next: [cyan]altgrad report {matrix.runs_dir}[/]")
        if failed:
            error_console.print(f"{len(failed)} cell(s) failed; `altgrad matrix status {file}` shows where their logs are")
            raise typer.Exit(1)


def status(
    file: Path = typer.Argument(..., help="Matrix YAML."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where the cells are (default: the file's)."),
    data: Optional[str] = typer.Option(None, "--data", help="The --data the matrix was run with."),
    as_json: bool = typer.Option(False, "--json", help="Print the cells as JSON."),
) -> None:
    """Every cell: status, steps, final validation loss, and a failed cell's log."""
    with user_errors():
        matrix = _load(file, runs_dir, data)
        rows = cell_status(matrix)
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title=f"{file} -> {matrix.runs_dir}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("cell", "status", "steps", "final val", "note"):
            table.add_column(column, justify="right" if column in ("steps", "final val") else "left")
        styles = {"completed": "green", "diverged": "yellow", "failed": "red", "running": "cyan"}
        for row in rows:
            note = row.get("log") if row["status"] == "failed" else (row.get("note") or "")
            table.add_row(row["cell"], f"[{styles.get(row['status'], 'white')}]{row['status']}[/]",
                          "-" if row["steps"] is None else f"{row['steps']}/{row['max_steps']}",
                          number_cell(row["final_val_loss"]), note)
        console.print(table)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        console.print(", ".join(f"{n} {s}" for s, n in counts.items()))


def estimate(
    file: Path = typer.Argument(..., help="Matrix YAML to cost, e.g. configs/matrix/paper.yaml."),
    measure_steps: int = typer.Option(
        40, "--measure-steps", help="Training steps to time of one cell per arm and layer policy (0: count the runs only)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the cells' own)."),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared data for the measured cells (default: the file's)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the estimate as JSON (for `altgrad report --scale`)."),
) -> None:
    """The runs a matrix needs under its protocol and, measured on this machine, its device-hours."""
    from ..experiments.scale import estimate as cost, hours_text
    from ..io import write_json

    with user_errors():
        if measure_steps < 0 or 0 < measure_steps < 20:
            raise UserError(f"--measure-steps must be 0 (count only) or at least 20, got {measure_steps}: the "
                            "first logged window is set-up and is left out")
        matrix = _load(file, None, data)
        found = cost(matrix, measure_steps, device,
                     on_cell=lambda w: console.print(f"measuring {w.cell} ({measure_steps} steps)"))
        table = Table(title=f"{file}: {found.runs} runs at most ({found.cells} evaluation runs; tuning at most the "
                            f"budget of every tuned group)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("arm", "layers", "measured cell", "eval runs", "tuning runs", "steps", "s/step", "s/eval", "hours"):
            table.add_column(column)
        for w in found.work:
            h = w.hours()
            table.add_row(w.arm, w.layers, w.cell, str(w.cells), str(w.tuning), str(w.steps),
                          *((f"{w.step_s:.3f}", f"{w.evaluation_s:.2f}", hours_text(h)) if h is not None else ("-",) * 3))
        console.print(table)
        total = found.hours()
        if total is not None:
            console.print(f"about {hours_text(total)} device-hours on {found.device}, one run at a time per device")
        if out is not None:
            write_json(out, found.to_dict())
            console.print(f"wrote {out}; next: altgrad report RUNS --scale {out}")


def doc(file: Path = typer.Argument(..., help="Matrix YAML whose combinations to document.")) -> None:
    """TEST_MATRIX.md, generated from the code and the matrix: `altgrad matrix doc FILE > TEST_MATRIX.md`."""
    from ..experiments.doc import test_matrix

    with user_errors():
        print(test_matrix(load_matrix(file)), end="")


matrix_app.command("run")(run)
matrix_app.command("status")(status)
matrix_app.command("estimate")(estimate)
matrix_app.command("doc")(doc)
