"""Where every cell of a matrix stands, from its run folder and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..training.checkpoint import list_checkpoints
from .launch import LOG_FILE, read_manifest
from .runs import finished, read_summary
from .tuning_runs import known_trials, swept_values
from .matrix import Cell, Matrix


def _status(cell: Cell, run_dir: Path, entry: dict[str, Any], summary: dict[str, Any]) -> tuple[str, int | None, str]:
    """(status, steps done, note) of one cell, given its summary."""
    checkpoints = list_checkpoints(run_dir)
    step = int(checkpoints[-1].stem.removeprefix("step_")) if checkpoints else None
    if finished(summary, cell.config.max_steps):
        return summary["status"], summary.get("steps"), summary.get("message", "")
    if entry.get("status") == "failed":
        return "failed", step, entry.get("error", "")
    if entry.get("status") in ("queued", "running") and (run_dir / LOG_FILE).exists():
        return "running", step, "or killed: run the matrix again to resume it"
    if step is not None:
        return "interrupted", step, f"resumes at step {step}"
    return ("queued" if entry.get("status") == "queued" else "pending"), None, ""


def cell_status(matrix: Matrix) -> list[dict[str, Any]]:
    """One row per cell (sweep runs first): status, steps, final validation loss, log."""
    manifest = read_manifest(matrix.runs_dir)
    rows = []
    for cell in [*known_trials(matrix, manifest), *matrix.cells(swept_values(manifest))]:
        run_dir = Path(matrix.runs_dir) / cell.folder
        entry = manifest.get("cells", {}).get(cell.folder, {})
        summary = read_summary(run_dir)
        status, steps, note = _status(cell, run_dir, entry, summary)
        if cell.expected_failure and status in ("diverged", "completed"):
            note = f"expected failure: {cell.expected_failure}" + (f"; {note}" if note else "")
        loss = summary.get("final_val_loss")
        rows.append(cell.describe() | {
            "cell": cell.folder, "status": status, "steps": steps, "max_steps": cell.config.max_steps,
            "final_val_loss": float(loss) if isinstance(loss, (int, float, str)) else None,
            "note": note, "log": str(run_dir / LOG_FILE), "host": entry.get("host"), "job_id": entry.get("job_id"),
            "started": entry.get("started"), "ended": entry.get("ended")})
    return rows
