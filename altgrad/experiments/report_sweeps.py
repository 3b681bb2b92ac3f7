"""The manifest's record of each group's tuning (its sweep) and of the matrix's tuning protocol,
read into `Sweep` and `Protocol`: one adapter for the bracketing sweeps' schema (`launch`,
`tuning`) and for the legacy one of earlier matrices (one key, its losses by value, a scalar
best), so the report never reads raw manifest entries itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .report_runs import Group, as_number

# ---- the tuning record: one adapter for both manifest schemas -------------------------------
@dataclass(frozen=True)
class Trial:
    """One tuning run: the values it tried, how it ended, its final validation loss (NaN: none)."""

    values: dict[str, Any]
    status: str
    loss: float
    folder: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A group's tuning, as the manifest recorded it. Anything a manifest did not record is
    None (unknown), which every check of the report reads as a failed condition."""

    group: str
    keys: tuple[str, ...]  # the tuned keys, in coordinate-descent order (inherited ones apart)
    trials: tuple[Trial, ...]
    best: dict[str, Any] | None  # the chosen values; None while unsettled or nothing usable
    best_loss: float
    interior: dict[str, bool]  # per tuned key: tried, worse neighbours on both sides
    neighbours: dict[str, dict[str, Any]]  # key -> {"below": {...} | None, "above": {...} | None}
    resolution: float  # max over keys of the smaller finite loss gap to a neighbour; NaN: none
    seed: int | None
    max_steps: int | None
    horizon: str | None  # final | short; None: unknown
    budget: int | None
    spent: int | None
    hit_budget: bool | None
    stopped: str | None
    inherited: dict[str, dict[str, Any]]  # key -> {"from", "group", "value", "interior"}
    settled: bool
    legacy: bool = False  # read from the one-key schema of earlier matrices

    @property
    def tuned_keys(self) -> set[str]:
        """The keys this group's values came from tuning: its own and the inherited ones."""
        return set(self.keys) | set(self.inherited)

    def tried(self, key: str) -> list[Any]:
        """The values of ``key`` in the order they were first tried."""
        return list(dict.fromkeys(t.values[key] for t in self.trials if key in t.values))

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "keys": list(self.keys), "tried": {k: self.tried(k) for k in self.keys},
                "trials": [{"values": t.values, "status": t.status, "final_val_loss": t.loss, "folder": t.folder}
                           for t in self.trials],
                "best": self.best, "best_loss": self.best_loss, "interior": self.interior,
                "neighbours": self.neighbours, "resolution": self.resolution, "seed": self.seed,
                "max_steps": self.max_steps, "horizon": self.horizon, "budget": self.budget, "spent": self.spent,
                "hit_budget": self.hit_budget, "stopped": self.stopped, "inherited": self.inherited,
                "settled": self.settled, "legacy": self.legacy}


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _horizon(max_steps: int | None, cell_max_steps: int | None) -> str | None:
    if max_steps is None or cell_max_steps is None:
        return None
    return "final" if max_steps == cell_max_steps else "short"


def _worse(neighbour: dict[str, Any] | None, best_loss: float) -> bool:
    """A tried neighbour that lost to the best value: a higher finite loss, or diverged (a run
    that failed for another reason measured nothing, so it is not worse)."""
    if neighbour is None:
        return False
    if neighbour.get("status") == "diverged":  # whatever its last loss: a run that diverged lost
        return True
    loss = as_number(neighbour.get("loss"))
    if math.isfinite(loss):
        return loss > best_loss
    return neighbour.get("status") in ("diverged", "completed")  # completed with a non-finite loss: diverged


def _usable(trial: Trial) -> bool:
    """A trial that can be chosen: completed with a finite loss (a diverged one never is, even
    with a low last loss)."""
    return trial.status == "completed" and math.isfinite(trial.loss)


def _chose_unusable(best: dict[str, Any] | None, trials: tuple[Trial, ...]) -> bool:
    """Whether the recorded best is a trial that could not be chosen (diverged, failed, no loss)."""
    if not best:
        return False
    wanted = {k: as_number(v) for k, v in best.items()}
    return any({k: as_number(v) for k, v in t.values.items()} == wanted and not _usable(t) for t in trials)


def _gap(neighbours: dict[str, Any], best_loss: float) -> float:
    """The smaller finite loss gap (neighbour - best) of a key's completed neighbours (a diverged
    one's last loss measures nothing); NaN: none."""
    gaps = [as_number(n.get("loss")) - best_loss for n in neighbours.values()
            if n is not None and n.get("status", "completed") == "completed"]
    gaps = [g for g in gaps if math.isfinite(g)]
    return min(gaps) if gaps else math.nan


def _legacy_sweep(group: str, raw: dict[str, Any], cell_max_steps: int | None) -> Sweep:
    """The one-key schema (``key``, ``losses`` by value, ``statuses``, a scalar ``best``): the
    interior and the resolution derived from the losses; budget, stop reason and inheritance
    were never recorded (unknown)."""
    key = str(raw.get("key"))
    losses, statuses = raw.get("losses") or {}, raw.get("statuses") or {}
    trials, numeric = [], {}
    for text, loss in losses.items():
        value = as_number(text)
        shown: Any = value if math.isfinite(value) else text
        if math.isfinite(value) and float(value).is_integer() and "." not in str(text):
            shown = int(value)
        trials.append(Trial({key: shown}, str(statuses.get(text, "completed" if loss is not None else "missing")),
                            as_number(loss)))
        if math.isfinite(value):
            numeric[value] = trials[-1]
    best_raw = raw.get("best")
    best = None if best_raw is None else {key: best_raw}
    best_value = as_number(best_raw)
    chosen = numeric.get(best_value)
    unusable = chosen is not None and not _usable(chosen)
    if unusable:  # an earlier matrix chose a run that diverged: nothing usable was chosen
        best, chosen = None, None
    best_loss = chosen.loss if chosen is not None else math.nan
    neighbours: dict[str, Any] = {"below": None, "above": None}
    interior = False
    if chosen is not None and len(numeric) == len(trials):
        below = [v for v in numeric if v < best_value]
        above = [v for v in numeric if v > best_value]
        for side, values, pick in (("below", below, max), ("above", above, min)):
            if values:
                t = numeric[pick(values)]
                neighbours[side] = {"value": t.values[key], "loss": t.loss if math.isfinite(t.loss) else None,
                                    "status": t.status}
        interior = _worse(neighbours["below"], best_loss) and _worse(neighbours["above"], best_loss)
    steps = _int(raw.get("max_steps"))
    return Sweep(group=group, keys=(key,), trials=tuple(trials), best=best, best_loss=best_loss,
                 interior={key: interior}, neighbours={key: neighbours},
                 resolution=_gap(neighbours, best_loss) if chosen is not None else math.nan,
                 seed=_int(raw.get("seed")), max_steps=steps, horizon=_horizon(steps, cell_max_steps),
                 budget=None, spent=len(trials), hit_budget=None, stopped="no_usable_value" if unusable else None,
                 inherited={}, settled=best is not None, legacy=True)


def read_sweep(group: str, raw: Any, cell_max_steps: int | None = None) -> Sweep:
    """A manifest's sweep entry of ``group`` in either schema; ``cell_max_steps``: the cells'
    horizon, for a horizon the entry does not state."""
    raw = raw if isinstance(raw, dict) else {}
    if "key" in raw and "keys" not in raw:
        return _legacy_sweep(group, raw, cell_max_steps)
    keys = tuple(str(k) for k in raw.get("keys") or ())
    trials = tuple(Trial(dict(t.get("values") or {}), str(t.get("status", "missing")),
                         as_number(t.get("final_val_loss")), t.get("folder"))
                   for t in raw.get("trials") or () if isinstance(t, dict))
    interior = {k: bool((raw.get("interior") or {}).get(k, False)) for k in keys}
    inherited = {str(k): dict(v) for k, v in (raw.get("inherited") or {}).items() if isinstance(v, dict)}
    steps = _int(raw.get("max_steps"))
    horizon = raw.get("horizon") if raw.get("horizon") in ("final", "short") else _horizon(steps, cell_max_steps)
    best = raw.get("best") if isinstance(raw.get("best"), dict) else None
    hit = raw.get("hit_budget")
    stopped = str(raw["stopped"]) if raw.get("stopped") is not None else None
    best_loss, resolution = as_number(raw.get("best_loss")), as_number(raw.get("resolution"))
    if _chose_unusable(best, trials):  # a record naming a diverged (or failed) trial as best: none usable
        best, best_loss, resolution, stopped = None, math.nan, math.nan, "no_usable_value"
        interior = {k: False for k in keys}
    return Sweep(group=group, keys=keys, trials=trials, best=best, best_loss=best_loss,
                 interior=interior, neighbours=dict(raw.get("neighbours") or {}),
                 resolution=resolution, seed=_int(raw.get("seed")), max_steps=steps,
                 horizon=horizon, budget=_int(raw.get("budget")), spent=_int(raw.get("spent")),
                 hit_budget=hit if isinstance(hit, bool) else None,
                 stopped=stopped, inherited=inherited,
                 settled=bool(raw.get("settled", False)) and (best is not None or not keys))  # inherited only


def read_sweeps(manifest: dict[str, Any], groups: list[Group]) -> dict[str, Sweep]:
    """Group name -> its sweep, every sweep of the manifest (in its order)."""
    steps = {g.name: g.max_steps for g in groups}
    return {name: read_sweep(name, raw, steps.get(name)) for name, raw in (manifest.get("sweeps") or {}).items()}


@dataclass(frozen=True)
class Protocol:
    """The matrix's tuning protocol. ``recorded`` False: the manifest predates it, and what it
    holds was derived from the sweeps and runs (a budget cannot be, and stays None)."""

    tuning_seed: int | None
    eval_seeds: tuple[int, ...]
    budget: int | None
    horizon: str | None  # final | short | mixed; None: unknown
    sweep_max_steps: int | None
    cell_max_steps: int | None
    max_extensions: int | None
    refine: bool | None
    rounds: int | None
    grid_lr_unit: str | None  # ulp | binade | mixed; None: no geometry run to read it from
    recorded: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _one(values: set[Any]) -> Any:
    values.discard(None)
    return values.pop() if len(values) == 1 else None


def _unit(groups: list[Group]) -> str | None:
    """The grid_lr unit of the geometry runs (``ulp`` for runs from before the setting existed)."""
    units = {c.run.config.get("grid_lr_unit") or "ulp" for g in groups if g.optimizer is not None
             for c in g.cells if c.run is not None}
    return units.pop() if len(units) == 1 else ("mixed" if units else None)


def read_protocol(manifest: dict[str, Any], groups: list[Group], sweeps: dict[str, Sweep]) -> Protocol:
    """The manifest's ``protocol``, or, for an older manifest, what its sweeps and runs say."""
    raw = manifest.get("protocol")
    cell_steps = _one({g.max_steps for g in groups})
    if isinstance(raw, dict):
        seeds = tuple(int(s) for s in raw.get("eval_seeds") or () if _int(s) is not None)
        refine = raw.get("refine")
        unit = raw.get("grid_lr_unit")
        return Protocol(tuning_seed=_int(raw.get("tuning_seed")), eval_seeds=seeds, budget=_int(raw.get("budget")),
                        horizon=raw.get("horizon") if isinstance(raw.get("horizon"), str) else None,
                        sweep_max_steps=_int(raw.get("sweep_max_steps")),
                        cell_max_steps=_int(raw.get("cell_max_steps")) or cell_steps,
                        max_extensions=_int(raw.get("max_extensions")),
                        refine=refine if isinstance(refine, bool) else None, rounds=_int(raw.get("rounds")),
                        grid_lr_unit=unit if isinstance(unit, str) else _unit(groups), recorded=True)
    horizons = {s.horizon for s in sweeps.values()}
    return Protocol(tuning_seed=_one({s.seed for s in sweeps.values()}),
                    eval_seeds=tuple(sorted({c.seed for g in groups for c in g.cells})), budget=None,
                    horizon=(horizons.pop() if len(horizons) == 1 else "mixed") if horizons else None,
                    sweep_max_steps=_one({s.max_steps for s in sweeps.values()}), cell_max_steps=cell_steps,
                    max_extensions=None, refine=None, rounds=None, grid_lr_unit=_unit(groups), recorded=False)
