"""`altgrad compare`: runs side by side, each judged against the first (the reference).

A run PASSes when its final validation loss is within ``tolerance`` (relative, 10% by
default) of the reference's and it completed; anything else is INVESTIGATE, with the reason.
Runs are only comparable when paired: everything but the precision policy, the optimizer arm
and names or monitoring equal (`UNPAIRED_KEYS`); otherwise a note names the first difference.
Each row carries the run's memory per parameter as its summary recorded it (``memory``: bits per
weight with a format, optim/memory.py); a run from before the record has none, never a guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..training.collapse import collapse_analysis
from ..training.config import FIELD_NAMES, keys_where
from ..training.monitors import layer_mean
from .runs import RunRecord

#: Config keys that may differ between paired runs: the precision policy, the optimizer arm,
#: and names, places and monitoring, none of which changes batches, weights at step 0 or the
#: validation set. Every other key (model shape, data, seed, steps, batch, learning rate and
#: schedule, weight decay, dropout, the clipping bound, evaluation batches) must be equal.
#: Each field's class is declared with it (`TrainConfig`'s `option`: ``axis``, ``result``).
PRECISION_KEYS = keys_where(axis="precision")  # the precision policy and its failure handling
ARM_KEYS = keys_where(axis="arm")
PLACE_AND_MONITORING_KEYS = keys_where(result=False)
UNPAIRED_KEYS = PRECISION_KEYS | ARM_KEYS | PLACE_AND_MONITORING_KEYS


def pairing_difference(reference: dict[str, Any], other: dict[str, Any]) -> str | None:
    """The first config difference that unpairs two runs (in config order), or None when paired."""
    keys = [k for k in FIELD_NAMES if k not in UNPAIRED_KEYS]
    keys += sorted((set(reference) | set(other)) - set(FIELD_NAMES) - UNPAIRED_KEYS)
    differences = [k for k in keys if reference.get(k) != other.get(k)]
    if not differences:
        return None
    first = differences[0]
    more = f" (and {len(differences) - 1} more: {', '.join(differences[1:])})" if len(differences) > 1 else ""
    return f"{first} {reference.get(first)!r} vs {other.get(first)!r}{more}"


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
    rank_vs_reference: float | None  # last effective rank / the reference's, per layer, mean over layers
    rank_warnings: int  # layer measurements with the effective rank beyond its drop threshold
    collapse: dict[str, Any] | None  # training.collapse: step, reason, sparsity and zero-update layers
    memory: dict[str, float] | None  # the summary's bits per weight with a format (parts, total); None: see below
    memory_recorded: bool  # False: a run from before the record, or without a summary (not recorded)
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
    return math.exp(loss) if loss is not None and math.isfinite(loss) and loss < 700 else None


def _number(value: Any) -> float | None:
    """A loss from a summary or metrics line: JSON keeps NaN and inf as strings."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _val_losses(run: RunRecord) -> tuple[float | None, float | None]:
    """(final, best) validation loss: final is the last evaluation, whatever its value."""
    evaluations = [r["val_loss"] for r in run.metrics if "val_loss" in r]
    final = run.summary["final_val_loss"] if "final_val_loss" in run.summary else \
        (evaluations[-1] if evaluations else None)
    finite = [v for v in map(_number, evaluations) if v is not None and math.isfinite(v)]
    best = run.summary.get("best_val_loss", min(finite) if finite else None)
    return _number(final), _number(best)


def _final_ranks(run: RunRecord) -> dict[str, float]:
    """Each layer's effective rank at the run's last rank measurement."""
    prefix = "rank/effective/"
    last = next((r for r in reversed(run.metrics) if any(k.startswith(prefix) for k in r)), {})
    return {k.removeprefix(prefix): v for k, v in last.items()
            if k.startswith(prefix) and isinstance(v, (int, float)) and math.isfinite(v)}


def rank_ratio(run: RunRecord, reference: RunRecord) -> float | None:
    """Effective rank relative to the reference run (a BF16 twin of the same seed), mean over the
    layers both measured: a higher rank under FP8 can be quantization noise, a lower one damage."""
    ours, theirs = _final_ranks(run), _final_ranks(reference)
    ratios = [ours[name] / theirs[name] for name in ours.keys() & theirs.keys() if theirs[name] > 0]
    value = layer_mean(ratios)
    return value if math.isfinite(value) else None


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
    if not math.isfinite(final):
        return "INVESTIGATE", f"final validation loss is {final} (non-finite: never a PASS)"
    if not math.isfinite(reference):
        return "INVESTIGATE", f"the reference's final validation loss is {reference}"
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
        ratio = ratio if ratio is None or math.isfinite(ratio) else None
        ppl, ref_ppl = _ppl(final), _ppl(reference_final)
        if index == 0:
            verdict, reason = "reference", ""
        else:
            verdict, reason = _judge(run, final, reference_final, tolerance)
            unpaired = pairing_difference(runs[0].config, run.config)
            if unpaired:
                notes.append(f"{run.name} is not paired with {runs[0].name}: {unpaired}")
        rows.append(RunComparison(
            name=run.name, label=run.label, status=status, steps=run.summary.get("steps", run.metrics[-1]["step"]),
            final_val_loss=final, best_val_loss=best, final_ppl=ppl, best_ppl=_ppl(best), loss_ratio=ratio,
            ppl_ratio=ppl / ref_ppl if ppl is not None and ref_ppl else None,
            mean_grad_cos=_mean(run.series("grad_cos_sim/mean")[1]),
            mean_bit_stall=_mean(run.series("quant/bit_stall_rate")[1]),
            mean_stall_ratio=_mean(run.series("optim/stall_ratio")[1]),
            max_overflow=max(run.series("quant/overflow_rate")[1], default=None),
            rank_vs_reference=rank_ratio(run, runs[0]),
            collapse=run.summary["collapse"] if "collapse" in run.summary else
            collapse_analysis(run.metrics, status, run.summary.get("steps", run.metrics[-1]["step"])),
            rank_warnings=sum(seen.get("count", 0) for name, seen in run.summary.get("alerts", {}).items()
                              if name.startswith("rank_drop/")),
            memory=run.summary.get("memory"), memory_recorded="memory" in run.summary,
            diverged=status == "diverged", verdict=verdict, reason=reason))
    return Comparison(rows=rows, tolerance=tolerance, notes=notes)
