"""Where a run fails: the stage of training (forward, backward, optimizer) whose metric first
crosses its threshold (issue 23 §3), from the records the run already logs (metrics.jsonl).

- The rules (`RULES`), per stage:
  forward: the weights' and activations' overflow and underflow rates and SNR
  (``quant/overflow_rate/weight``, ``.../activation``, ``quant/underflow_rate/...``,
  ``quant/snr_db/...``), and dead input units (``quant/dead_fraction_sampled``);
  backward: the gradient's overflow and underflow rates and SNR (``.../gradient``) and its cosine
  against the FP32 shadow (``grad_cos_sim/mean``, logged with ``use_shadow``);
  optimizer: the stall ratio and the bit-stall rate (``optim/stall_ratio``,
  ``quant/bit_stall_rate``), the realized over the intended relative update
  (``optim/rel_update_realized / optim/rel_update_intended``), and the A-vs-C difference: the
  run's validation loss minus the arm-A run's of the same format, layers and seed, at the same
  evaluation step.
- The thresholds (`Thresholds`), in this one place: the four the config defines (TrainConfig's
  ``overflow_threshold``, ``underflow_threshold``, ``bit_stall_threshold``,
  ``grad_cos_threshold``: the live alerts' bounds, read from each run's own config) and the ones
  only this analysis uses, with their reasons (`NEW_THRESHOLDS`).
- Crossing: strictly beyond the threshold, as the live alerts (``training/monitors/alerts.py``):
  ``value > threshold`` for an upper bound, ``value < threshold`` for a lower one; a value exactly
  at the threshold has not crossed. A record without the metric, or with a non-finite value, is no
  crossing; a rule whose metric no record measured is *not measured*, and said so, never read
  as fine.
- Applicability: the stall, bit-stall and realized/intended rules only where the weights are
  stored on the grid (``weight_storage: format``): under FP32 masters the master accumulates what
  its cast does not show, so a stalled cast loses nothing (DESIGN §4). The weight's cast rules
  (overflow, underflow, SNR) only under FP32 masters: a stored weight is its grid value, so its
  forward cast is exact (no noise, so no SNR is logged, and rates of 0), and what the format does
  to it happens where it is stored, the optimizer's rules. The A-vs-C rule needs the arm-A run of
  the same seed (``reference``). Otherwise a rule is *not applicable*.
- A stage's first step is the earliest of its rules' first crossings (a tie between its rules:
  the first in `RULES`). The **attributed stage** is the stage with the earliest first step; a
  tie in step goes upstream, forward before backward before optimizer: an upstream failure causes
  downstream ones (a cast that loses the signal corrupts the gradient, a wrong gradient the
  update), so of two crossings at one step the upstream one is taken as the cause. A run that
  crosses nothing: ``none``.
- Over a group's seeds (`aggregate`): the stage most seeds name (``none`` is a name too), a tie
  in counts broken in the order forward, backward, optimizer, none (a crossing seen over its
  absence); its step is the earliest step among the seeds that name it; the counts are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ..training.config import TrainConfig

STAGES = ("forward", "backward", "optimizer")
#: The attributed stage's names, in the order ties are broken (upstream first, none last).
NAMES = (*STAGES, "none")
#: Where each of `Thresholds`' fields comes from.
CONFIG_THRESHOLDS = {"overflow": "overflow_threshold", "underflow": "underflow_threshold",
                     "bit_stall": "bit_stall_threshold", "grad_cos": "grad_cos_threshold"}
#: The thresholds only this analysis uses, and why each value.
NEW_THRESHOLDS = {
    "snr_db": "20 dB: quantization noise above 1% of the signal's energy. A round-to-nearest cast with M mantissa "
              "bits gives about 6.02 M + 14 dB (E5M2 measured: 25.5 dB), so only a format with fewer than two "
              "mantissa bits (E7M0: about 14 dB) or one whose range clips or flushes the tensor crosses it",
    "dead_fraction": "0.5: half of a layer's input units zero after quantization in every sampled step (the same "
                     "half as underflow_threshold, for units that stay zero)",
    "update_ratio": "0.5: less than half of the intended relative update lands on the grid (realized / intended "
                    "RMS); stochastic rounding lands more than intended, in RMS, so only lost updates cross it",
    "storage_gap": "0.05 nats of validation loss above arm A's at the same step and seed: about three BF16 "
                   "seed-to-seed standard deviations of the final loss (0.016 measured on the built-in corpus, "
                   "0.0036 on the byte EurLex sample; DESIGN §5)",
}


@dataclass(frozen=True)
class Thresholds:
    overflow: float = TrainConfig.overflow_threshold
    underflow: float = TrainConfig.underflow_threshold
    bit_stall: float = TrainConfig.bit_stall_threshold
    grad_cos: float = TrainConfig.grad_cos_threshold
    snr_db: float = 20.0
    dead_fraction: float = 0.5
    update_ratio: float = 0.5
    storage_gap: float = 0.05

    @classmethod
    def of_run(cls, config: dict[str, Any]) -> Thresholds:
        """The config's four from a run's own config (TrainConfig's defaults where it has none)."""
        values = {}
        for name, key in CONFIG_THRESHOLDS.items():
            value = config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[name] = float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Rule:
    stage: str
    metric: str  # the record's key (a ratio's numerator)
    threshold: str  # a field of `Thresholds`
    above: bool  # crossed when value > threshold; False: when value < threshold
    what: str
    over: str | None = None  # a ratio: the record's key of its denominator
    storage: str | None = None  # "format": only for weights stored on the grid; "master": only under FP32 masters
    paired: bool = False  # the run's value minus the reference run's at the same step

    @property
    def name(self) -> str:
        return f"{self.metric} / {self.over}" if self.over else \
            f"{self.metric} - arm A's" if self.paired else self.metric


RULES: tuple[Rule, ...] = (
    Rule("forward", "quant/overflow_rate/weight", "overflow", True, "weight overflow", storage="master"),
    Rule("forward", "quant/overflow_rate/activation", "overflow", True, "activation overflow"),
    Rule("forward", "quant/underflow_rate/weight", "underflow", True, "weight underflow", storage="master"),
    Rule("forward", "quant/underflow_rate/activation", "underflow", True, "activation underflow"),
    Rule("forward", "quant/snr_db/weight", "snr_db", False, "weight SNR", storage="master"),
    Rule("forward", "quant/snr_db/activation", "snr_db", False, "activation SNR"),
    Rule("forward", "quant/dead_fraction_sampled", "dead_fraction", True, "dead input units"),
    Rule("backward", "quant/overflow_rate/gradient", "overflow", True, "gradient overflow"),
    Rule("backward", "quant/underflow_rate/gradient", "underflow", True, "gradient underflow"),
    Rule("backward", "quant/snr_db/gradient", "snr_db", False, "gradient SNR"),
    Rule("backward", "grad_cos_sim/mean", "grad_cos", False, "gradient cosine vs the FP32 shadow"),
    Rule("optimizer", "optim/stall_ratio", "bit_stall", True, "stall ratio", storage="format"),
    Rule("optimizer", "quant/bit_stall_rate", "bit_stall", True, "bit-stall rate", storage="format"),
    Rule("optimizer", "optim/rel_update_realized", "update_ratio", False, "realized / intended update",
         over="optim/rel_update_intended", storage="format"),
    Rule("optimizer", "val_loss", "storage_gap", True, "validation loss above arm A's (same seed)", paired=True),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _values(records: list[dict[str, Any]], rule: Rule,
            reference: dict[int, float] | None) -> list[tuple[int, float]]:
    """(step, value) of a rule's quantity, in step order, where it is defined and finite."""
    out = []
    for record in records:
        step, value = record.get("step"), _number(record.get(rule.metric))
        if not isinstance(step, int) or value is None:
            continue
        if rule.over is not None:
            below = _number(record.get(rule.over))
            if below is None or below <= 0:
                continue
            value /= below
        elif rule.paired:
            partner = (reference or {}).get(step)
            if partner is None:
                continue
            value -= partner
        out.append((step, value))
    return sorted(out, key=lambda point: point[0])


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    status: str  # crossed | not crossed | not measured | not applicable
    threshold: float
    step: int | None = None  # the first step it crossed
    value: float | None = None  # its value there
    measured: int = 0  # records with a finite value

    @property
    def bound(self) -> str:
        """``> 0.001``, ``< 20``: where the rule crosses."""
        return f"{'>' if self.rule.above else '<'} {self.threshold:g}"

    @property
    def reading(self) -> str:
        """``quant/snr_db/activation = 14.2 < 20``: the crossing value against its bound."""
        return f"{self.rule.name} = {self.value:.4g} {self.bound}" if self.status == "crossed" else self.status

    @property
    def text(self) -> str:
        if self.status == "crossed":
            return f"{self.reading} at step {self.step}"
        return f"{self.rule.name}: {self.status}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.rule.name, "what": self.rule.what, "stage": self.rule.stage, "status": self.status,
                "threshold": self.threshold, "bound": self.bound, "step": self.step,
                "value": self.value, "measured": self.measured}


def judge(rule: Rule, records: list[dict[str, Any]], thresholds: Thresholds, *, stored: bool,
          reference: dict[int, float] | None = None) -> RuleResult:
    """One rule on one run's records (the module doc: strictly beyond, missing is not measured)."""
    threshold = getattr(thresholds, rule.threshold)
    if rule.storage not in (None, "format" if stored else "master") or (rule.paired and reference is None):
        return RuleResult(rule, "not applicable", threshold)
    points = _values(records, rule, reference)
    if not points:
        return RuleResult(rule, "not measured", threshold)
    for step, value in points:
        if (value > threshold) if rule.above else (value < threshold):
            return RuleResult(rule, "crossed", threshold, step, value, len(points))
    return RuleResult(rule, "not crossed", threshold, measured=len(points))


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # crossed | not crossed | not measured | not applicable
    rules: tuple[RuleResult, ...]

    @property
    def first(self) -> RuleResult | None:
        """The rule that crossed first (a tie: the first in `RULES`)."""
        crossed = [r for r in self.rules if r.status == "crossed"]
        return min(crossed, key=lambda r: r.step) if crossed else None

    @property
    def step(self) -> int | None:
        first = self.first
        return first.step if first is not None else None

    @property
    def not_measured(self) -> list[str]:
        return [r.rule.name for r in self.rules if r.status == "not measured"]

    @property
    def text(self) -> str:
        if self.status == "crossed":
            return self.first.text
        if self.status == "not crossed" and self.not_measured:
            return f"not crossed (not measured: {', '.join(self.not_measured)})"
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "status": self.status, "step": self.step,
                "first": self.first.to_dict() if self.first else None, "not_measured": self.not_measured,
                "text": self.text, "rules": [r.to_dict() for r in self.rules]}


def _stage(stage: str, results: list[RuleResult]) -> StageResult:
    statuses = {r.status for r in results}
    if "crossed" in statuses:
        status = "crossed"
    elif "not crossed" in statuses:
        status = "not crossed"
    elif "not measured" in statuses:
        status = "not measured"
    else:
        status = "not applicable"
    return StageResult(stage, status, tuple(results))


@dataclass(frozen=True)
class Attribution:
    stage: str  # forward | backward | optimizer | none
    stages: dict[str, StageResult]

    @property
    def step(self) -> int | None:
        return self.stages[self.stage].step if self.stage in self.stages else None

    @property
    def text(self) -> str:
        if self.stage == "none":
            return "none (no metric crossed its threshold)"
        return f"{self.stage} at step {self.step} ({self.stages[self.stage].first.text})"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "text": self.text,
                "stages": {name: s.to_dict() for name, s in self.stages.items()}}


def attribute(records: list[dict[str, Any]], thresholds: Thresholds | None = None, *, stored: bool = False,
              reference: list[dict[str, Any]] | None = None) -> Attribution:
    """Per stage the first step its metrics cross their thresholds, and the attributed stage (the
    module doc). ``stored``: the run's weights live on the grid; ``reference``: the records of the
    arm-A run of the same format, layers and seed (the A-vs-C rule), None without one."""
    thresholds = thresholds or Thresholds()
    partner = None
    if reference is not None:
        partner = {r["step"]: v for r in reference
                   if isinstance(r.get("step"), int) and (v := _number(r.get("val_loss"))) is not None}
    stages = {stage: _stage(stage, [judge(rule, records, thresholds, stored=stored, reference=partner)
                                    for rule in RULES if rule.stage == stage]) for stage in STAGES}
    crossed = [(s.step, STAGES.index(name), name) for name, s in stages.items() if s.status == "crossed"]
    return Attribution(min(crossed)[2] if crossed else "none", stages)


# ---- over a group's seeds ----------------------------------------------------------------------
@dataclass(frozen=True)
class GroupStage:
    stage: str  # the stage most seeds name (ties: `NAMES` order)
    step: int | None  # the earliest step among the seeds that name it
    counts: dict[str, int]  # name -> seeds naming it, in `NAMES` order, zeros left out
    per_seed: dict[int, Attribution]

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def unmeasured(self) -> dict[str, list[int]]:
        """Stage -> the seeds on which none of its applicable metrics was measured."""
        out: dict[str, list[int]] = {}
        for seed, a in self.per_seed.items():
            for name, s in a.stages.items():
                if s.status == "not measured":
                    out.setdefault(name, []).append(seed)
        return out

    @property
    def text(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        others = [f"{name} {count}" for name, count in self.counts.items() if name != self.stage]
        return (f"{self.stage}{where} ({self.counts[self.stage]} of {self.n} seed{'s' if self.n != 1 else ''}"
                + (f"; {', '.join(others)}" if others else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "counts": self.counts, "n": self.n, "text": self.text,
                "unmeasured": {k: v for k, v in self.unmeasured.items()},
                "per_seed": {str(seed): a.to_dict() for seed, a in self.per_seed.items()}}


def aggregate(per_seed: dict[int, Attribution]) -> GroupStage | None:
    """The group's stage over its seeds (the module doc); None without any seed."""
    if not per_seed:
        return None
    counts = {name: sum(a.stage == name for a in per_seed.values()) for name in NAMES}
    counts = {name: count for name, count in counts.items() if count}
    stage = max(counts, key=lambda name: (counts[name], -NAMES.index(name)))
    steps = [a.step for a in per_seed.values() if a.stage == stage and a.step is not None]
    return GroupStage(stage, min(steps) if steps else None, counts, dict(sorted(per_seed.items())))
