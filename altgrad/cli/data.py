"""`altgrad prepare-data`: tokenize a corpus into train.bin / val.bin / meta.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..data.prepare import SPLITS, prepare_dataset
from .common import console, user_errors


def _summary(directory: Path, meta: dict[str, Any]) -> Table:
    table = Table(title=f"{meta['name']} → {directory}  ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
                        f"eot {meta['eot_token']})", title_justify="left", header_style="bold")
    for column in ("split", "documents", "tokens", "skipped", "file", "sha256"):
        table.add_column(column, justify="right" if column in ("documents", "tokens", "skipped") else "left")
    for split in SPLITS:
        counts = meta["splits"][split]
        table.add_row(split, f"{counts['documents']:,}", f"{counts['tokens']:,}", f"{counts['skipped']:,}",
                      counts["file"], counts["sha256"][:12])
    return table


def _problems(meta: dict[str, Any]) -> list[str]:
    """One line per split that had records skipped or repaired."""
    lines = []
    for split in SPLITS:
        counts = meta["splits"][split]
        if counts["skipped"]:
            lines.append(f"{split}: skipped {counts['empty']} empty or text-less and {counts['invalid']} invalid "
                         "record(s)")
        if counts["undecodable"]:
            lines.append(f"{split}: {counts['undecodable']} document(s) had bytes that are not UTF-8, "
                         "kept with U+FFFD in their place")
    return lines


def prepare_data(
    name: str = typer.Argument(..., help="Dataset: eurlex (Hugging Face Hub, or --source) or builtin (offline)."),
    source: Optional[Path] = typer.Option(
        None, "--source", help="Local JSON Lines / JSON / Parquet / .txt file, or a folder with train/validation files."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="gpt2 (tiktoken; default for eurlex) or byte (no download; default for builtin)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: data/NAME)."),
) -> None:
    """Tokenize a corpus into nanoGPT-style train.bin / val.bin (uint16) and meta.json."""
    with user_errors():
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("records"), TimeElapsedColumn())
        bar = Progress(*columns, console=console)  # started at the first report: errors print alone
        tasks: dict[str, Any] = {}
        seen: dict[str, int] = {}

        def progress(split: str, done: int, total: Optional[int]) -> None:
            if not tasks:
                bar.start()
            if split not in tasks:
                tasks[split] = bar.add_task(f"tokenizing {split}", total=total)
            seen[split] = done
            bar.update(tasks[split], completed=done, total=total)

        try:
            directory, meta = prepare_dataset(name, source=source, tokenizer=tokenizer, out=out, progress=progress)
            for split, task in tasks.items():  # streams of unknown length are complete now
                bar.update(task, total=seen[split])
        finally:
            if tasks:
                bar.stop()
        console.print(_summary(directory, meta))
        console.print(f"[dim]split: {meta['split_rule']}[/]", highlight=False)
        for note in meta["notes"]:
            console.print(f"[dim]note: {note}[/]", highlight=False)
        for line in _problems(meta):
            console.print(f"[yellow]{line}[/]", highlight=False)
