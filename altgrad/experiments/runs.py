"""Reading finished (or stopped) runs back from their folders."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..training.config import CONFIG_FILE_NAME
from ..training.tracking import METRICS_FILE, SUMMARY_FILE, read_metrics


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json, {} when there is none (yet) or it is unreadable."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def finished(summary: dict[str, Any], max_steps: int) -> bool:
    """Diverged, or completed all its steps (a completed shorter run can be continued)."""
    return summary.get("status") == "diverged" or (summary.get("status") == "completed"
                                                   and summary.get("steps") == max_steps)


@dataclass(frozen=True)
class RunRecord:
    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]  # empty for a run that is still going or was killed
    metrics: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, finite values only."""
        points = [(r["step"], r[key]) for r in self.metrics
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [s for s, _ in points], [v for _, v in points]

    @property
    def label(self) -> str:
        """What the run computes in, and how its weights are updated when that is not the
        standard AdamW on FP32 masters: ``bf16``, ``e5m2``, ``e5m2 manifold-sr``."""
        label = self.summary.get("label") or self.config.get("format") or self.config.get("precision", "?")
        arm = self.summary.get("arm", "adamw")
        return label if arm == "adamw" else f"{label} {arm}"


def available_runs(runs_dir: Path) -> list[str]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if (p / CONFIG_FILE_NAME).exists())


def load_run(runs_dir: Path, name: str) -> RunRecord:
    """A run by its folder name under ``runs_dir``; a clear error when it is missing or empty."""
    path = Path(runs_dir) / name
    if not (path / CONFIG_FILE_NAME).exists():
        known = available_runs(runs_dir)
        hint = f"runs in {runs_dir}: {', '.join(known)}" if known else f"no runs in {runs_dir} (train one first)"
        raise UserError(f"run {name!r} not found; {hint}")
    metrics = read_metrics(path)
    if not metrics:
        raise UserError(f"run {name!r} has no metrics ({path / METRICS_FILE} is missing or empty)")
    try:
        config = yaml.safe_load((path / CONFIG_FILE_NAME).read_text()) or {}
        summary_path = path / SUMMARY_FILE
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise UserError(f"run {name!r} has an unreadable config or summary: {error}") from None
    return RunRecord(name=name, path=path, config=config, summary=summary, metrics=metrics)
