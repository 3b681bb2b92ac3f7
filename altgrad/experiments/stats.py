"""Paired differences by seed and their t-intervals (DESIGN §5).

Two cells are paired by seed: the same seed gives the same initial weights and the same
batches, so ``a[seed] - b[seed]`` removes the seed-to-seed variation that both share. The
interval is the Student-t interval of the mean of those differences,
``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (``sd`` with n-1 in the denominator); with fewer than
two pairs it is undefined (NaN), never zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile: P(|T| <= q) = confidence with ``df`` degrees of freedom."""
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, df))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def sample_sd(values: list[float]) -> float:
    """The sample standard deviation (n - 1); NaN with fewer than two values."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Paired:
    """The paired difference ``a - b`` over the seeds where both are defined."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    per_seed: dict[int, float] = field(default_factory=dict)
    method: str = f"paired by seed, {CONFIDENCE:.0%} Student-t interval over seeds"

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        return data


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    """``a[seed] - b[seed]`` for the seeds in both with finite values, and its t-interval."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = {s: a[s] - b[s] for s in seeds}
    values = list(diffs.values())
    m, sd, n = mean(values), sample_sd(values), len(values)
    if n < 2:
        return Paired(m, math.nan, math.nan, n, sd, diffs)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Paired(m, m - half, m + half, n, sd, diffs)
