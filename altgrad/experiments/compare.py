"""`altgrad compare`: runs side by side, each judged against the first (the reference).

A run PASSes when its final validation loss is within ``tolerance`` (relative, 10% by
default) of the reference's and it completed; anything else is INVESTIGATE, with the reason.
Runs are only comparable when paired (same seed, data, steps and validation set): differences
in those are reported as notes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .runs import RunRecord

PAIRING_KEYS = ("seed", "data", "max_steps", "block_size", "batch_size", "grad_accum", "eval_iters", "n_layer",
                "n_embd")
DEFAULT_TOLERANCE = 0.10


@dataclass(frozen=True)
class RunComparison:
    name: str
    label: str
    status: str
    steps: int | None
    final_val_loss: float | None
    best_val_loss: float | None
    final_ppl: float | None
    best_ppl: float | None
    loss_ratio: float | None  # final val loss / the reference's
    ppl_ratio: float | None
    mean_grad_cos: float | None  # mean over the run of grad_cos_sim/mean (FP32 shadow)
    mean_bit_stall: float | None  # mean over the run of quant/bit_stall_rate (itself a mean over layers)
    mean_stall_ratio: float | None  # mean over the run of optim/stall_ratio (a mean over layers)
    max_overflow: float | None  # max over the run of quant/overflow_rate (a mean over layers)
    diverged: bool
    verdict: str  # reference | PASS | INVESTIGATE
    reason: str


@dataclass(frozen=True)
class Comparison:
    rows: list[RunComparison]
    tolerance: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "runs": [asdict(r) for r in self.rows], "notes": self.notes}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ppl(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None


def _val_losses(run: RunRecord) -> tuple[float | None, float | None]:
    _, values = run.series("val_loss")
    final = run.summary.get("final_val_loss", values[-1] if values else None)
    best = run.summary.get("best_val_loss", min(values) if values else None)
    return (final if isinstance(final, (int, float)) else None), (best if isinstance(best, (int, float)) else None)


def _status(run: RunRecord) -> str:
    return run.summary.get("status", "incomplete")


def _judge(run: RunRecord, final: float | None, reference: float | None, tolerance: float) -> tuple[str, str]:
    status = _status(run)
    if status == "diverged":
        return "INVESTIGATE", f"diverged: {run.summary.get('message', '')}".rstrip(": ")
    if status != "completed":
        return "INVESTIGATE", f"run {status} at step {run.metrics[-1]['step']}"
    if final is None or reference is None:
        return "INVESTIGATE", "no validation loss to compare"
    change = final / reference - 1.0
    if change <= tolerance:
        return "PASS", f"val loss {change:+.1%} vs reference (within {tolerance:.0%})"
    return "INVESTIGATE", f"val loss {change:+.1%} vs reference (beyond {tolerance:.0%})"


def compare_runs(runs: list[RunRecord], tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Judge every run against ``runs[0]``."""
    reference_final, _ = _val_losses(runs[0])
    rows, notes = [], []
    for index, run in enumerate(runs):
        final, best = _val_losses(run)
        status = _status(run)
        ratio = final / reference_final if final is not None and reference_final else None
        ppl, ref_ppl = _ppl(final), _ppl(reference_final)
        if index == 0:
            verdict, reason = "reference", ""
        else:
            verdict, reason = _judge(run, final, reference_final, tolerance)
            unpaired = [f"{key} {runs[0].config.get(key)} vs {run.config.get(key)}" for key in PAIRING_KEYS
                        if runs[0].config.get(key) != run.config.get(key)]
            if unpaired:
                notes.append(f"{run.name} is not paired with {runs[0].name}: {', '.join(unpaired)}")
        rows.append(RunComparison(
            name=run.name, label=run.label, status=status, steps=run.summary.get("steps", run.metrics[-1]["step"]),
            final_val_loss=final, best_val_loss=best, final_ppl=ppl, best_ppl=_ppl(best), loss_ratio=ratio,
            ppl_ratio=ppl / ref_ppl if ppl is not None and ref_ppl else None,
            mean_grad_cos=_mean(run.series("grad_cos_sim/mean")[1]),
            mean_bit_stall=_mean(run.series("quant/bit_stall_rate")[1]),
            mean_stall_ratio=_mean(run.series("optim/stall_ratio")[1]),
            max_overflow=max(run.series("quant/overflow_rate")[1], default=None),
            diverged=status == "diverged", verdict=verdict, reason=reason))
    return Comparison(rows=rows, tolerance=tolerance, notes=notes)
