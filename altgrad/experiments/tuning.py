"""Tuning that finds an interior optimum (DESIGN §5.1): bracketing log-grid sweeps, coordinate
descent over several keys, and what a sweep can say about its own precision.

A group's search is a log grid per key (``sweep: {lr: [5e-4, 1e-3, 2e-3]}``). For one key,
with every other key held at its current value:

1. run the grid;
2. if the best value (lowest final validation loss among the runs that completed with a finite
   loss) is the largest tried, try the next value above it (the grid's ratio at that end); if
   it is the smallest, the next below; repeat until the best value has a tried neighbour on both
   sides (each worse: a diverged neighbour is worse), ``max_extensions`` are spent, or the
   group's ``budget`` of runs is. A line where nothing completed extends downwards (a smaller
   step is the one that may not diverge);
3. with ``refine``, then try the geometric midpoints between the best value and its neighbours
   (in the last round only).

Several keys are tuned by coordinate descent: the keys in the order written, each bracketed as
above, for ``rounds`` rounds (round one on the given grids, later rounds on the three points
``v/r, v, v r`` around the current value, r the key's grid ratio), stopping early when a round
changes nothing. Runs already made are reused, never repeated: a trial is its values.

Everything here is pure: `plan` replays the search from the outcomes known so far and says
which trials to run next, so a killed matrix resumes the same search from its run folders, and
the tests drive it with a loss that is a known function of the values.

The result (`Plan`) says per key whether the chosen value is **interior** (a tried, worse
neighbour on both sides along that key, the other keys at their chosen values), the two
neighbours, and the **tuning resolution**: per key the smaller loss rise from the chosen value
to a neighbour with a finite loss (how much better an untried value between them might be; NaN
without one), the largest over keys for the group. An effect smaller than the resolution of the
groups it compares is not established (DESIGN §5.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

COMPLETED, DIVERGED, FAILED, PENDING = "completed", "diverged", "failed", "pending"


class Outcome(NamedTuple):
    """How one trial ended: completed (with a finite loss), diverged, failed (an error) or pending."""

    status: str
    loss: float | None = None


@dataclass(frozen=True)
class Protocol:
    """The matrix's tuning settings, the same for every group (equal budget, DESIGN §5.1)."""

    budget: int  # the most runs a group's tuning may spend, extensions and refinement included
    max_extensions: int = 4  # per line search: values tried beyond the edge of the grid
    refine: bool = False  # then the geometric midpoints around the best value
    rounds: int = 2  # coordinate-descent rounds for a group that tunes several keys


def canonical(value: float) -> float:
    """A value as a trial knows it: 6 significant digits, so 1e-3 * 2 and 2e-3 are one trial."""
    return float(f"{float(value):.6g}")


def trial_key(values: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, canonical(v)) for k, v in values.items()))


def grid_ratio(grid: tuple[float, ...]) -> float:
    """The mean ratio of a log grid: (last / first)^(1 / (n - 1))."""
    return (grid[-1] / grid[0]) ** (1.0 / (len(grid) - 1))


@dataclass
class Neighbour:
    value: float
    status: str
    loss: float | None

    def worse_than(self, loss: float) -> bool:
        return self.status == DIVERGED or (self.status == COMPLETED and self.loss is not None and self.loss > loss)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "status": self.status, "loss": self.loss}


@dataclass
class Plan:
    """Where a group's search stands."""

    next: list[dict[str, float]]  # trials to run now (none: settled)
    trials: list[dict[str, float]]  # every trial the search has used, in order (spent = len)
    settled: bool
    best: dict[str, float] | None = None
    best_loss: float | None = None
    interior: dict[str, bool] = field(default_factory=dict)
    neighbours: dict[str, dict[str, Neighbour | None]] = field(default_factory=dict)
    resolution: float = math.nan
    stopped: str = "running"  # interior | not_interior | budget | max_extensions | failed | no_usable_value
    budget: int = 0

    @property
    def spent(self) -> int:
        return len(self.trials)

    @property
    def all_interior(self) -> bool:
        return bool(self.interior) and all(self.interior.values())

    @property
    def hit_budget(self) -> bool:
        """The cap stopped the search before its optimum was interior."""
        return self.stopped == "budget" and not self.all_interior


class _Wait(Exception):
    """The replay needs outcomes it does not have yet."""


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Search:
    """One replay of the algorithm in the module doc over the known outcomes."""

    def __init__(self, grids: Mapping[str, tuple[float, ...]], protocol: Protocol, results: Mapping[tuple, Outcome]):
        self.grids = {k: tuple(sorted(canonical(v) for v in grid)) for k, grid in grids.items()}
        self.protocol = protocol
        self.results = results
        self.used: dict[tuple, dict[str, float]] = {}
        self.missing: list[dict[str, float]] = []
        self.stops: list[str] = []

    def outcome(self, values: dict[str, float]) -> Outcome:
        return self.results.get(trial_key(values), Outcome(PENDING))

    def use(self, trials: list[dict[str, float]]) -> None:
        """Register trials, as many as the budget allows; wait while a registered one has no
        outcome yet; then stop (``budget``) if one did not fit."""
        dropped = False
        for values in trials:
            key = trial_key(values)
            if key not in self.used:
                if len(self.used) >= self.protocol.budget:
                    dropped = True
                    continue
                self.used[key] = {k: canonical(v) for k, v in values.items()}
        pending = [v for v in trials if trial_key(v) in self.used and self.outcome(v).status == PENDING]
        if pending:
            self.missing = pending
            raise _Wait
        if dropped:
            raise _Stop("budget")

    def line(self, key: str, grid: tuple[float, ...], current: dict[str, float], refine: bool) -> float | None:
        """Bracket ``key`` with the other keys at ``current``; returns its best value (None: none usable)."""
        r_low, r_high = grid[1] / grid[0], grid[-1] / grid[-2]
        tried, extensions = set(grid), 0

        def point(v: float) -> dict[str, float]:
            return {**current, key: v}

        while True:
            try:
                self.use([point(v) for v in sorted(tried)])
            except _Stop:  # the budget stops the line: keep what was found
                self.stops.append("budget")
                return self._line_best(key, current)
            ordered = sorted(tried)
            outcomes = {v: self.outcome(point(v)) for v in ordered}
            best = _best(outcomes)
            if any(o.status == FAILED for o in outcomes.values()):
                self.stops.append("failed")
                return best
            if best is None:
                candidate, reason = canonical(ordered[0] / r_low), "no_usable_value"
            elif best == ordered[-1]:
                candidate, reason = canonical(best * r_high), "max_extensions"
            elif best == ordered[0]:
                candidate, reason = canonical(best / r_low), "max_extensions"
            else:
                break
            if extensions >= self.protocol.max_extensions:
                self.stops.append(reason)
                return best
            tried.add(candidate)
            extensions += 1
        if refine:
            ordered = sorted(tried)
            i = ordered.index(best)
            middles = [canonical(math.sqrt(best * ordered[i - 1])), canonical(math.sqrt(best * ordered[i + 1]))]
            try:
                self.use([point(v) for v in middles])
            except _Stop:
                pass  # no budget left for refinement: the bracket stands
            best = self._line_best(key, current)
        return best

    def _line_best(self, key: str, current: dict[str, float]) -> float | None:
        return _best({v: self.outcome({**current, key: v}) for v in self._known(key, current)})

    def _known(self, key: str, current: dict[str, float]) -> set[float]:
        """The values of ``key`` registered on the line through ``current``."""
        rest = {k: canonical(v) for k, v in current.items() if k != key}
        return {values[key] for values in self.used.values() if {k: v for k, v in values.items() if k != key} == rest}

    def run(self) -> dict[str, float] | None:
        keys = list(self.grids)
        current = {k: _middle(grid) for k, grid in self.grids.items()}
        rounds = self.protocol.rounds if len(keys) > 1 else 1
        for round_index in range(rounds):
            before = dict(current)
            for key in keys:
                grid = self.grids[key]
                if round_index:
                    r = grid_ratio(grid)
                    grid = tuple(canonical(current[key] * f) for f in (1 / r, 1.0, r))
                best = self.line(key, grid, current, self.protocol.refine and round_index == rounds - 1)
                if best is None:
                    return None
                current[key] = best
                if self.stops and self.stops[-1] in ("budget", "failed"):
                    return current
            if round_index and current == before:
                break  # converged: another round would repeat these runs
        return current


def _middle(grid: tuple[float, ...]) -> float:
    return grid[(len(grid) - 1) // 2]


def _best(outcomes: Mapping[float, Outcome]) -> float | None:
    """The value with the lowest finite loss among completed trials (ties: the smaller value)."""
    usable = [(o.loss, v) for v, o in outcomes.items()
              if o.status == COMPLETED and o.loss is not None and math.isfinite(o.loss)]
    return min(usable)[1] if usable else None


def plan(grids: Mapping[str, tuple[float, ...]], protocol: Protocol, results: Mapping[tuple, Outcome]) -> Plan:
    """Replay a group's search over the outcomes known so far (``results``: `trial_key` ->
    `Outcome`): the trials to run next, or, once settled, the chosen values and how well they are
    located."""
    search = _Search(grids, protocol, results)
    try:
        best = search.run()
    except _Wait:
        return Plan(next=search.missing, trials=list(search.used.values()), settled=False, budget=protocol.budget)
    except _Stop as stop:  # the budget ran out before a line's own grid could run
        search.stops.append(stop.reason)
        best = None
    result = Plan(next=[], trials=list(search.used.values()), settled=True, budget=protocol.budget)
    if best is None:
        result.stopped = search.stops[-1] if search.stops else "no_usable_value"
        return result
    result.best = {k: canonical(v) for k, v in best.items()}
    result.best_loss = search.outcome(result.best).loss
    resolutions = []
    for key in search.grids:
        below, above = _neighbours(search, key, result.best)
        result.neighbours[key] = {"below": below, "above": above}
        result.interior[key] = all(n is not None and n.worse_than(result.best_loss) for n in (below, above))
        gaps = [n.loss - result.best_loss for n in (below, above)
                if n is not None and n.status == COMPLETED and n.loss is not None and math.isfinite(n.loss)]
        resolutions.append(min(gaps) if gaps else math.nan)
    result.resolution = math.nan if any(math.isnan(r) for r in resolutions) else max(resolutions)
    abnormal = [s for s in search.stops if s != "interior"]
    result.stopped = "interior" if result.all_interior else (abnormal[-1] if abnormal else "not_interior")
    return result


def _neighbours(search: _Search, key: str, best: dict[str, float]) -> tuple[Neighbour | None, Neighbour | None]:
    """The nearest tried values of ``key`` below and above the best, the other keys at the best."""
    values = sorted(search._known(key, best))
    chosen = best[key]
    lower = [v for v in values if v < chosen]
    upper = [v for v in values if v > chosen]

    def neighbour(v: float) -> Neighbour:
        outcome = search.outcome({**best, key: v})
        return Neighbour(v, outcome.status, outcome.loss)

    return (neighbour(lower[-1]) if lower else None, neighbour(upper[0]) if upper else None)
