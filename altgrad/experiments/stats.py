"""Paired differences by seed, their t-intervals and tests, Holm's correction (DESIGN §5).

Two cells are paired by seed: the same seed gives the same initial weights and the same
batches, so ``a[seed] - b[seed]`` removes the seed-to-seed variation that both share. The
interval is the Student-t interval of the mean of those differences,
``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (``sd`` with n-1 in the denominator); with fewer than
two pairs it is undefined (NaN), never zero.

The paired t-test of the same differences: ``t = mean / (sd / sqrt(n))`` with n-1 degrees of
freedom, two-sided ``p = P(|T| >= |t|)``. Undefined (NaN) with fewer than two pairs. When the
differences are all equal (sd = 0), ``t`` is infinite unless they are all zero: p = 0 for a
non-zero constant difference (every seed moved by exactly the same amount), p = 1 when every
difference is 0 (nothing differs).

The interaction of four groups per seed (DESIGN §5.2), ``(gs - c) - (gm - a)``: what storing
the weight on the grid does to a geometry update rule beyond what it does to AdamW.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


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


def t_test_p(values: list[float]) -> float:
    """Two-sided p-value of the one-sample t-test of ``mean(values) == 0`` (the paired t-test of
    the differences); see the module doc for n < 2 and sd = 0."""
    n = len(values)
    if n < 2:
        return math.nan
    m, sd = mean(values), sample_sd(values)
    if sd == 0:
        return 1.0 if m == 0 else 0.0
    t = m / (sd / math.sqrt(n))
    return float(2 * _scipy_stats.t.sf(abs(t), n - 1))


@dataclass(frozen=True)
class Paired:
    """The paired difference ``a - b`` (or the interaction) over the seeds where all are defined."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    per_seed: dict[int, float] = field(default_factory=dict)
    p: float = math.nan  # two-sided paired t-test of mean == 0
    method: str = f"paired by seed, {CONFIDENCE:.0%} Student-t interval over seeds, two-sided paired t-test"

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    @property
    def half_width(self) -> float:
        """Half the interval's width; NaN without an interval."""
        return (self.high - self.low) / 2 if math.isfinite(self.low) and math.isfinite(self.high) else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        data["half_width"] = self.half_width
        return data


def from_differences(diffs: dict[int, float]) -> Paired:
    """The mean, t-interval and t-test of per-seed differences (seed -> difference)."""
    diffs = dict(sorted(diffs.items()))
    values = list(diffs.values())
    m, sd, n = mean(values), sample_sd(values), len(values)
    p = t_test_p(values)
    if n < 2:
        return Paired(m, math.nan, math.nan, n, sd, diffs, p)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Paired(m, m - half, m + half, n, sd, diffs, p)


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    """``a[seed] - b[seed]`` for the seeds in both with finite values, its t-interval and t-test."""
    seeds = [s for s in set(a) & set(b) if _finite(a[s], b[s])]
    return from_differences({s: a[s] - b[s] for s in seeds})


def interaction(gs: dict[int, float], c: dict[int, float], gm: dict[int, float], a: dict[int, float]) -> Paired:
    """``(gs[s] - c[s]) - (gm[s] - a[s])`` over the seeds where all four are finite (DESIGN §5.2):
    geometry stored minus the stochastic-rounding control, minus geometry on masters minus AdamW
    on masters. Negative: storing on the grid helps the geometry rule more than it helps AdamW."""
    seeds = [s for s in set(gs) & set(c) & set(gm) & set(a) if _finite(gs[s], c[s], gm[s], a[s])]
    return from_differences({s: (gs[s] - c[s]) - (gm[s] - a[s]) for s in seeds})


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the order given: with the m finite p-values sorted,
    p_(1) <= ... <= p_(m), the adjusted ``p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    NaN p-values are left out of m and stay NaN. Ties keep their given order (the result is
    the same either way)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if isinstance(p, (int, float)) and math.isfinite(p))
    m = len(finite)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for j, (p, i) in enumerate(finite, start=1):
        running = max(running, min(1.0, (m - j + 1) * p))
        adjusted[i] = running
    return adjusted
