"""Run tracking: local JSON Lines metrics and summary beside optional Weights & Biases.

``runs/<name>/metrics.jsonl`` gets one JSON object per logged step; the same names go to W&B
(``--wandb online|offline|disabled``; offline needs no network, ``wandb sync`` uploads later).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import write_json, write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the next resume rewrites the file
    return records


class RunTracker:
    """Writes metrics, the summary and (optionally) mirrors metrics to W&B."""

    def __init__(self, run_dir: Path, config: dict[str, Any], wandb_mode: str, project: str, resume_step: int | None):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            # Drop what a killed run logged after its last checkpoint, so the file matches an
            # uninterrupted run once this one finishes.
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(config, wandb_mode, project, resume_step is not None)

    def _start_wandb(self, config: dict[str, Any], mode: str, project: str, resuming: bool):
        try:
            import wandb
        except ImportError:
            raise UserError("wandb is not installed; `pip install wandb` or use --wandb disabled") from None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        try:
            run = wandb.init(project=project, name=self.run_dir.name, config=config, mode=mode,
                             dir=str(self.run_dir), id=run_id, resume="allow" if run_id else None)
        except Exception as error:
            raise UserError(
                f"W&B could not start in {mode} mode ({error}); use --wandb offline (no network needed) "
                "or --wandb disabled"
            ) from None
        write_text(id_file, run.id)
        return run

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: self._for_wandb(k, v) for k, v in record.items() if k != "step"}, step=record["step"])

    @staticmethod
    def _for_wandb(key: str, value: Any) -> Any:
        """Events (lists of mappings, e.g. format shifts) become a W&B table; the rest as is."""
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            import wandb

            columns = list(dict.fromkeys(k for v in value for k in v))
            return wandb.Table(columns=columns, data=[[json.dumps(v.get(c)) if isinstance(v.get(c), dict)
                                                       else v.get(c) for c in columns] for v in value])
        return value

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.run_dir / SUMMARY_FILE, {k: _clean(v) for k, v in summary.items()})
        if self._wandb is not None:
            self._wandb.summary.update(summary)

    def close(self) -> None:
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
