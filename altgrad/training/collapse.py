"""Collapse analysis: when a run failed, and where its weights stopped moving.

A run *collapsed* at the first evaluation whose validation loss is non-finite or above its own
step-0 value, or at the step it *diverged* (``nan_patience`` non-finite steps in a row),
whichever comes first. At that point, from the last statistics step at or before it:

- gradient sparsity per layer: the fraction of weights with a zero gradient (1 - update rate);
- the layers with the highest stall ratio and the highest gradient underflow rate (the
  zero-update regions), three of each.

It reads only the run's records (metrics.jsonl), so it works for any finished or stopped run.
"""

from __future__ import annotations

import math
from typing import Any

TOP = 3


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _per_layer(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {key.removeprefix(prefix): float(value) for key, value in record.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and math.isfinite(value)}


def _highest(values: dict[str, float]) -> list[list]:
    return [[name, value] for name, value in sorted(values.items(), key=lambda item: -item[1])[:TOP]]


def collapse_analysis(records: list[dict[str, Any]], status: str, steps: int) -> dict[str, Any] | None:
    """The collapse step, its reason and the layer picture there; None for a run that did not fail."""
    evaluations = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    start = next((_finite(value) for step, value in evaluations if step == 0), None)
    step, reason = None, ""
    for at, value in evaluations:
        loss = value if isinstance(value, (int, float)) else float(value)  # "nan" in JSON
        if at > 0 and (not math.isfinite(loss) or (start is not None and loss > start)):
            step = at
            reason = (f"validation loss {loss:.4g} above its step-0 value {start:.4g}" if math.isfinite(loss)
                      else f"validation loss {loss}")
            break
    if status == "diverged" and (step is None or steps < step):
        step, reason = steps, "diverged: non-finite loss or gradients for nan_patience steps"
    if step is None:
        return None
    stats = [r for r in records if r.get("step", 0) <= step and any(k.startswith("optim/update_rate/") for k in r)]
    if not stats:
        return {"step": step, "reason": reason, "gradient_sparsity": {}, "highest_stall": [],
                "highest_underflow": []}
    last = stats[-1]
    sparsity = {name: 1.0 - rate for name, rate in _per_layer(last, "optim/update_rate/").items()}
    return {"step": step, "reason": reason, "measured_at": last["step"], "gradient_sparsity": sparsity,
            "highest_stall": _highest(_per_layer(last, "optim/stall_ratio/")),
            "highest_underflow": _highest(_per_layer(last, "quant/underflow_rate/gradient/"))}
