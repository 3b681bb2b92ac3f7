"""The comparisons a report makes and the conditions that gate their claims (DESIGN §5.1-5.2).

Per format, layer policy and geometry optimizer with all four groups (geometry stored ``gs``,
arm C, the same optimizer on FP32 masters ``gm``, arm A), the `EFFECTS`, each paired by seed:
the question, the interaction ``(gs - C) - (gm - A)``, and beside it the update-rule effect
``gm - A``, the storage effects ``C - A`` and ``gs - gm`` and, where the format has them, the
geometry arm against the non-geometric remedies it must beat (DESIGN §5.2): ``gs - ECO``
(error feedback) and ``gs - Ck`` (C-kahan, compensated storage). Every effect is a claim of its own,
gated by the same `CHECKS` over the groups it involves, with Holm's correction over the
distinct comparisons of its family (one effect across the formats and optimizers); the null
control on uniform grids; the formats not compared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..quantization.formats import FormatError, get_format
from .compare import PRECISION_KEYS, pairing_difference
from .matrix import layer_suffix
from .report_runs import OPTIMIZER_NAMES, Group
from .report_sweeps import Protocol, Sweep
from .stats import ALPHA, Paired, holm, interaction, paired_difference

#: The config keys each arm sets for itself: two groups of a comparison may differ in these.
ARM_OWN_KEYS = frozenset({"optimizer", "weight_storage", "update_rounding", "grid_lr", "grid_lr_unit",
                          "grid_direction", "rung_clip", "max_stiffness", "compensation", "compensation_dtype"})
#: The four groups of a comparison, in the order text names them.
PARTS = ("gs", "C", "gm", "A")
#: The remedies a comparison adds when its format has them: part -> role (report_runs.role).
REMEDIES = {"ECO": "ECO", "Ck": "C-kahan"}
PART_NAMES = {"gs": "geometry stored", "C": "arm C", "gm": "geometry on masters", "A": "arm A", "ECO": "arm ECO",
              "Ck": "arm C-kahan"}
#: The pairs whose runs must differ only in what is compared.
PAIRS = (("gs", "C"), ("gm", "A"), ("gs", "gm"), ("C", "A"), ("gs", "ECO"), ("gs", "Ck"))
#: The effects a comparison measures: name -> (the groups it involves, its formula, what it measures).
#: The first is the question; the others are shown beside it, each a claim of its own.
EFFECTS = {
    "interaction": (PARTS, "(gs - C) - (gm - A)", "the format-specific benefit of geometry"),
    "update_rule": (("gm", "A"), "gm - A", "the update rule, on FP32 masters"),
    "storage_adamw": (("C", "A"), "C - A", "storing weights on the grid, under AdamW"),
    "storage_geometry": (("gs", "gm"), "gs - gm", "storing weights on the grid, under the geometry rule"),
    "geometry_vs_eco": (("gs", "ECO"), "gs - ECO", "the stored geometry arm against error feedback (ECO)"),
    "geometry_vs_kahan": (("gs", "Ck"), "gs - Ck", "the stored geometry arm against compensated storage (C-kahan)"),
}
#: The conditions of an established claim, in the order they are checked and named.
CHECKS = ("tuned_interior", "same_horizon", "equal_budget", "tuning_seed_apart", "paired", "enough_seeds",
          "significant", "beyond_noise", "null_control")
# ---- the parts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One condition of an established claim: whether it holds, and why not (or what held)."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class Effect:
    """One effect of a comparison (`EFFECTS`), paired by seed, and the checks that gate its claim."""

    name: str
    parts: tuple[str, ...]  # the groups it involves, of `PARTS`
    paired: Paired
    resolution: float  # the tuning resolution: max over its groups' sweeps; NaN when unknown
    holm_p: float = math.nan
    family: int = 0  # the distinct comparisons Holm's correction ran over
    checks: list[Check] = field(default_factory=list)

    @property
    def formula(self) -> str:
        return EFFECTS[self.name][1]

    @property
    def meaning(self) -> str:
        return EFFECTS[self.name][2]

    def formula_of(self, groups: dict[str, Group]) -> str:
        """Its formula in the groups' arm names: ``(D - C) - (Dm - A)``."""
        return re.sub(r"\b(gs|gm|C|A|ECO|Ck)\b", lambda m: groups[m.group(1)].arm, self.formula)

    @property
    def noise_floor(self) -> float:
        """Its own interval's half-width plus the tuning resolution."""
        return self.paired.half_width + self.resolution

    @property
    def established(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "formula": self.formula, "meaning": self.meaning, "parts": list(self.parts),
                "difference": self.paired.to_dict(), "holm_p": self.holm_p, "family": self.family,
                "resolution": self.resolution, "noise_floor": self.noise_floor, "established": self.established,
                "reasons": self.reasons, "checks": [c.to_dict() for c in self.checks]}


@dataclass
class Comparison:
    """One format, layer policy and geometry optimizer with all four groups (DESIGN §5.2): its
    `effects`; the question's verdict (``established``, ``checks``, ...) is the interaction's."""

    format: str
    layers: str
    optimizer: str  # manifold | grid | grid-momentum
    groups: dict[str, Group]  # gs, C, gm, A, and ECO, Ck where the format has them
    effects: dict[str, Effect]  # of `EFFECTS`, in its order (the remedies' where their group exists)
    stored_vs_control: Paired  # gs - C: shown, never claimed (it mixes the rule with the storage)

    @property
    def where(self) -> str:
        return self.format + layer_suffix(self.layers, " ({})")

    @property
    def optimizer_name(self) -> str:
        return OPTIMIZER_NAMES.get(self.optimizer, self.optimizer)

    @property
    def question(self) -> Effect:
        return self.effects["interaction"]

    interaction = property(lambda self: self.effects["interaction"].paired)
    update_rule = property(lambda self: self.effects["update_rule"].paired)
    storage_adamw = property(lambda self: self.effects["storage_adamw"].paired)
    storage_geometry = property(lambda self: self.effects["storage_geometry"].paired)
    resolution = property(lambda self: self.question.resolution)
    holm_p = property(lambda self: self.question.holm_p)
    checks = property(lambda self: self.question.checks)
    noise_floor = property(lambda self: self.question.noise_floor)
    established = property(lambda self: self.question.established)
    reasons = property(lambda self: self.question.reasons)

    def label(self, effect: Effect) -> str:
        """How text names one of its effects, with its arms: ``E5M2 ManifoldAdamW update rule
        (Dm - A)``, ``E5M2 storage under AdamW (C - A)`` (no geometry group: no optimizer named)."""
        name = {"interaction": f"{self.optimizer_name} interaction", "update_rule": f"{self.optimizer_name} update rule",
                "storage_adamw": "storage under AdamW",
                "storage_geometry": f"storage under {self.optimizer_name}",
                "geometry_vs_eco": f"{self.optimizer_name} stored vs ECO",
                "geometry_vs_kahan": f"{self.optimizer_name} stored vs C-kahan"}[effect.name]
        return f"{self.where} {name} ({effect.formula_of(self.groups)})"


@dataclass(frozen=True)
class NotCompared:
    """A format (and geometry optimizer) that lacks a group of the four: never ranked."""

    format: str
    layers: str
    optimizer: str | None  # None: the format has no geometry arm at all
    missing: tuple[str, ...]

    @property
    def text(self) -> str:
        name = OPTIMIZER_NAMES.get(self.optimizer, self.optimizer) if self.optimizer else "geometry"
        return f"{self.format}{layer_suffix(self.layers, ' ({})')} {name} (no {', no '.join(self.missing)})"


@dataclass
class NullCheck:
    """Tuned ManifoldAdamW stored (D) against tuned arm C on one uniform-grid format."""

    format: str
    layers: str
    geometry: Group
    control: Group
    paired: Paired  # D - C
    resolution: float  # max of the two groups' tuning resolutions; NaN when unknown
    status: str  # passes | fails | not evaluable
    reasons: list[str]

    @property
    def where(self) -> str:
        return self.format + layer_suffix(self.layers, " ({})")


@dataclass
class NullControl:
    status: str  # passes | fails | not evaluable | absent
    checks: list[NullCheck]
    summary: str


# ---- finding groups -----------------------------------------------------------------------------
def find_group(groups: list[Group], fmt: str, layers: str, wanted: str, optimizer: str | None = None) -> Group | None:
    """The group of one role (and geometry optimizer) in a format and layer policy; two are an
    error (which to compare?)."""
    found = [g for g in groups if g.format == fmt and g.layers == layers and g.role == wanted
             and (optimizer is None or g.optimizer == optimizer)]
    if len(found) > 1:
        what = wanted if optimizer is None else f"{wanted} {OPTIMIZER_NAMES.get(optimizer, optimizer)}"
        raise UserError(f"{fmt}{layer_suffix(layers)}: arms "
                        f"{', '.join(g.arm for g in found)} are all arm {what}; the report compares one of each")
    return found[0] if found else None


def uniform_grid(name: str) -> bool:
    """Whether a format's non-negative values (zero included) are equally spaced (E0M7, E1M6):
    there ManifoldAdamW's stiffness is constant and it is AdamW with a rescaled lr."""
    try:
        values = np.asarray(get_format(name).positive_values, dtype=np.float64)
    except (FormatError, UserError, ValueError, KeyError):
        return False
    values = np.unique(values)  # zero among them (the registry lists it): its gap to 1 ulp counts too
    if len(values) < 3:
        return False
    gaps = np.diff(values)
    return bool(np.all(gaps == gaps[0]))


def same_grid(a: str, b: str) -> bool:
    """Whether two formats' grids are the same up to a power of two (which power-of-two scaling
    absorbs: E0M7 and E1M6 are k/128 and k/32)."""
    try:
        x, y = get_format(a).positive_values, get_format(b).positive_values
    except (FormatError, UserError):
        return False
    if len(x) != len(y) or len(x) < 2:
        return False
    ratio = y[1] / x[1]
    return bool(np.all(y == x * ratio)) and math.log2(ratio).is_integer()


# ---- the checks ----------------------------------------------------------------------------------
def part_label(part: str, arm: str) -> str:
    """How reasons name a group of a comparison: ``D (stored)``, ``Dm (on masters)``, ``C``, ``A``
    (an AdamW arm under another matrix name: ``C2 (arm C)``, a remedy's: ``eco-rtn (arm ECO)``)."""
    if part == "gs":
        return f"{arm} (stored)"
    if part == "gm":
        return f"{arm} (on masters)"
    name = REMEDIES.get(part, part)
    return arm if arm == name else f"{arm} (arm {name})"


def number_text(value: float, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def tuning_resolution(sweeps: list[Sweep | None]) -> float:
    """The tuning resolution of a comparison: the largest of its groups' (NaN when a group's own
    tuning did not record a finite one; a group whose values were all inherited adds none)."""
    values = []
    for sweep in sweeps:
        if sweep is None:
            return math.nan
        if sweep.keys:
            values.append(sweep.resolution)
    return max(values) if values and all(math.isfinite(v) for v in values) else math.nan


def tuning_reasons(label: str, sweep: Sweep | None) -> list[str]:
    """Why a group's tuning does not count as tuned (empty: it does)."""
    if sweep is None:
        return [f"{label} has no sweep: its values were not tuned"]
    if not sweep.settled:
        return [f"{label}'s sweep is not settled (stopped: {sweep.stopped or 'no value chosen'})"]
    if not sweep.keys and not sweep.inherited:
        return [f"{label}'s sweep tuned no key"]
    out = []
    for key in sweep.keys:
        if not sweep.interior.get(key, False):
            value = (sweep.best or {}).get(key)
            why = ""
            if sweep.hit_budget or sweep.stopped == "budget":
                why = f"; the budget cap of {sweep.budget} runs stopped it before its optimum was interior"
            elif sweep.stopped == "max_extensions":
                why = "; max_extensions was spent before its optimum was interior"
            out.append(f"{label}'s {key} = {value} is not interior (tried {sweep.tried(key)}){why}")
    for key, source in sweep.inherited.items():
        if not source.get("interior", False):
            where = source.get("group") or source.get("from")
            out.append(f"{label}'s {key} = {source.get('value')}, inherited from {where}, is not interior there")
    return out


def horizon_reasons(label: str, group: Group, sweep: Sweep | None, protocol: Protocol) -> list[str]:
    if sweep is None:
        return [f"{label} has no sweep, so no tuning horizon"]
    cells = group.max_steps or protocol.cell_max_steps
    if sweep.horizon != "final":
        what = "a short horizon" if sweep.horizon == "short" else "an unknown horizon"
        return [f"{label} was tuned on {what} ({sweep.max_steps} steps; its cells run {cells})"]
    if cells is None or sweep.max_steps is None:
        return [f"{label}: the tuning or the cells' horizon is not recorded"]
    if sweep.max_steps != cells:
        return [f"{label} was tuned at {sweep.max_steps} steps, its cells run {cells}"]
    return []


def _config_diff(a: dict[str, Any], b: dict[str, Any], allowed: set[str]) -> str | None:
    """The first difference of two run configs beyond ``allowed``: `compare.pairing_difference`
    on the rest, then the precision policy (the same format and layers for all four groups)."""
    strip = lambda config: {k: v for k, v in config.items() if k not in allowed}  # noqa: E731
    difference = pairing_difference(strip(a), strip(b))
    if difference:
        return difference
    for key in sorted(PRECISION_KEYS - allowed):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)!r} vs {b.get(key)!r}"
    return None


def _paired_check(involved: tuple[str, ...], parts: dict[str, Group], sweeps: dict[str, Sweep | None],
                  labels: dict[str, str], seeds: list[int]) -> list[str]:
    """Why the runs of an effect are not paired: each pair of `PAIRS` among the groups it involves
    may differ only in the keys each arm sets for itself (`ARM_OWN_KEYS`) and the keys both tuned."""
    out = []
    if not seeds:
        seeds = sorted(set.intersection(*(parts[p].seeds for p in involved)))
    if not seeds:
        return [f"no seed has runs of all its groups ({', '.join(labels[p] for p in involved)}) to check the "
                "pairing on"]
    for x, y in [(x, y) for x, y in PAIRS if x in involved and y in involved]:
        tuned_x = sweeps[x].tuned_keys if sweeps[x] is not None else set()
        tuned_y = sweeps[y].tuned_keys if sweeps[y] is not None else set()
        allowed = set(ARM_OWN_KEYS) | (tuned_x & tuned_y)
        runs_x = {c.seed: c.run for c in parts[x].cells if c.run is not None}
        runs_y = {c.seed: c.run for c in parts[y].cells if c.run is not None}
        for seed in seeds:
            if seed not in runs_x or seed not in runs_y:
                missing = labels[x] if seed not in runs_x else labels[y]
                out.append(f"no run config of {missing} seed {seed} to check its pairing with "
                           f"{labels[y] if missing == labels[x] else labels[x]}")
                break
            difference = _config_diff(runs_x[seed].config, runs_y[seed].config, allowed)
            if difference:
                out.append(f"{labels[x]} and {labels[y]} differ in more than their arms and the keys both tuned "
                           f"(seed {seed}: {difference})")
                break
    return out


def _checks(effect: Effect, groups: dict[str, Group], sweeps: dict[str, Sweep | None], protocol: Protocol,
            null: NullControl) -> list[Check]:
    """The `CHECKS` of one effect, over the groups it involves."""
    parts = effect.parts
    labels = {p: part_label(p, groups[p].arm) for p in parts}
    checks = []

    def check(name: str, problems: list[str], fine: str) -> None:
        checks.append(Check(name, not problems, "; ".join(problems) if problems else fine))

    check("tuned_interior", [r for p in parts for r in tuning_reasons(labels[p], sweeps[p])],
          "every group's tuned values are interior optima")
    check("same_horizon", [r for p in parts for r in horizon_reasons(labels[p], groups[p], sweeps[p], protocol)],
          "every group was tuned at its cells' horizon")
    budgets = {p: sweeps[p].budget if sweeps[p] is not None else None for p in parts}
    unknown = [f"{labels[p]}'s tuning budget is not recorded" for p in parts if budgets[p] is None]
    if not unknown and len(set(budgets.values())) > 1:
        unknown = ["unequal tuning budgets: " + ", ".join(f"{labels[p]} {budgets[p]}" for p in parts) + " runs"]
    check("equal_budget", unknown, f"every group had the same tuning budget ({budgets[parts[0]]} runs)")
    seed_problems = []
    for p in parts:
        sweep = sweeps[p]
        seed = sweep.seed if sweep is not None and sweep.seed is not None else protocol.tuning_seed
        evaluation = groups[p].seeds | set(protocol.eval_seeds)
        if seed is None:
            seed_problems.append(f"{labels[p]}'s tuning seed is not recorded")
        elif seed in evaluation:
            seed_problems.append(f"{labels[p]} was tuned on seed {seed}, an evaluation seed")
    check("tuning_seed_apart", seed_problems, "tuned on a seed that is not an evaluation seed")
    check("paired", _paired_check(parts, groups, sweeps, labels, sorted(effect.paired.per_seed)),
          "the pairs differ only in their arms and the keys both tuned")
    n = effect.paired.n
    every = "all four groups" if len(parts) == 4 else "both groups"
    check("enough_seeds", [] if n >= 2 else [f"{n} paired seed{'s' if n != 1 else ''} with {every} finite "
                                             "(at least 2 needed)"], f"n = {n} paired seeds")
    p = effect.holm_p
    if not math.isfinite(p):
        significant = ["no p-value (fewer than 2 paired seeds)"]
    elif p >= ALPHA:
        significant = [f"Holm-adjusted p = {p:.3g}, not below {ALPHA:g} (raw p = {effect.paired.p:.3g}, "
                       f"over {effect.family} comparison{'s' if effect.family != 1 else ''})"]
    else:
        significant = []
    check("significant", significant, f"Holm-adjusted p = {number_text(p, '.3g')} < {ALPHA:g} (over "
                                      f"{effect.family} comparison{'s' if effect.family != 1 else ''})")
    what = "interaction" if effect.name == "interaction" else effect.formula_of(groups)
    size, half, resolution = abs(effect.paired.mean), effect.paired.half_width, effect.resolution
    if not math.isfinite(half):
        noise = ["no interval (fewer than 2 paired seeds)"]
    elif not math.isfinite(resolution):
        noise = ["the tuning resolution is unknown (a group's sweep recorded no finite neighbour loss)"]
    elif not size > half + resolution:
        noise = [f"|{what}| {size:.4f} is within its noise floor: interval half-width {half:.4f} + tuning "
                 f"resolution {resolution:.4f}"]
    else:
        noise = []
    check("beyond_noise", noise, f"|{what}| {size:.4f} > interval half-width {number_text(half)} + tuning "
                                 f"resolution {number_text(resolution)}")
    check("null_control", [] if null.status == "passes" else [f"the null control {null.status}: {null.summary}"],
          "the null control passes")
    return checks


# ---- the null control -------------------------------------------------------------------------
def null_control(groups: list[Group], sweeps: dict[str, Sweep]) -> NullControl:
    """Tuned ManifoldAdamW stored (D) against tuned arm C on every uniform-grid format and layer
    policy with both: passes when ``|mean(D - C)|`` <= its 95% half-width + the tuning resolution
    of the two groups (an unknown resolution counts as 0) and both optima are interior; not
    evaluable with fewer than 2 paired seeds. Overall: fails when any fails, passes when at least
    one passes and none fails, else not evaluable; absent without any."""
    found = []
    places = list(dict.fromkeys((g.format, g.layers) for g in groups if not g.baseline))
    for fmt, layers in places:
        if not uniform_grid(fmt):
            continue
        d = find_group(groups, fmt, layers, "geometry-stored", "manifold")
        c = find_group(groups, fmt, layers, "C")
        if d is None or c is None:
            continue
        paired = paired_difference(d.losses(), c.losses())
        resolution = tuning_resolution([sweeps.get(d.name), sweeps.get(c.name)])
        reasons = [r for g in (d, c) for r in tuning_reasons(f"{g.arm}", sweeps.get(g.name))]
        floor = paired.half_width + (resolution if math.isfinite(resolution) else 0.0)
        if paired.n < 2:
            status = "not evaluable"
            reasons = [f"{paired.n} paired seed{'s' if paired.n != 1 else ''} (at least 2 needed)"]
        else:
            if not abs(paired.mean) <= floor:
                reasons.insert(0, f"D - C = {paired.mean:+.4f} exceeds its interval half-width "
                                  f"{paired.half_width:.4f} + tuning resolution {number_text(resolution)}")
            status = "fails" if reasons else "passes"
        found.append(NullCheck(fmt, layers, d, c, paired, resolution, status, reasons))
    if not found:
        return NullControl("absent", [], "the matrix has no uniform-grid format (E0M7, E1M6) with both a "
                                         "ManifoldAdamW stored arm and arm C")
    statuses = {n.status for n in found}
    status = "fails" if "fails" in statuses else "passes" if "passes" in statuses else "not evaluable"
    summary = "; ".join(f"{n.where} D - C = {number_text(n.paired.mean, '+.4f')} [{number_text(n.paired.low, '+.4f')}, "
                        f"{number_text(n.paired.high, '+.4f')}] n={n.paired.n}, tuning resolution {number_text(n.resolution)}: "
                        f"{n.status}" + (f" ({'; '.join(n.reasons)})" if n.reasons and n.status != "passes" else "")
                        for n in found)
    return NullControl(status, found, summary)


# ---- the comparisons -------------------------------------------------------------------------
def compare_formats(groups: list[Group], sweeps: dict[str, Sweep], protocol: Protocol,
                 null: NullControl) -> tuple[list[Comparison], list[NotCompared]]:
    comparisons, missing = [], []
    places = list(dict.fromkeys((g.format, g.layers) for g in groups if not g.baseline))
    for fmt, layers in places:
        optimizers = list(dict.fromkeys(g.optimizer for g in groups if (g.format, g.layers) == (fmt, layers)
                                        and g.optimizer is not None
                                        and g.role in ("geometry-stored", "geometry-master")))
        c, a = find_group(groups, fmt, layers, "C"), find_group(groups, fmt, layers, "A")
        if not optimizers:
            lacking = ("geometry stored", "geometry on masters") + (("arm C",) if c is None else ()) + \
                      (("arm A",) if a is None else ())
            missing.append(NotCompared(fmt, layers, None, lacking))
            continue
        for optimizer in optimizers:
            name = OPTIMIZER_NAMES.get(optimizer, optimizer)
            parts = {"gs": find_group(groups, fmt, layers, "geometry-stored", optimizer), "C": c,
                     "gm": find_group(groups, fmt, layers, "geometry-master", optimizer), "A": a}
            lacking = tuple(f"{name} stored" if p == "gs" else f"{name} on FP32 masters" if p == "gm" else PART_NAMES[p]
                            for p in PARTS if parts[p] is None)
            if lacking:
                missing.append(NotCompared(fmt, layers, optimizer, lacking))
                continue
            parts |= {p: g for p, r in REMEDIES.items() if (g := find_group(groups, fmt, layers, r)) is not None}
            loss = {p: g.losses() for p, g in parts.items()}
            effects = {e: Effect(e, involved, _difference(e, loss),
                                 tuning_resolution([sweeps.get(parts[p].name) for p in involved]))
                       for e, (involved, _, _) in EFFECTS.items() if all(p in parts for p in involved)}
            comparisons.append(Comparison(fmt, layers, optimizer, parts, effects,
                                          paired_difference(loss["gs"], loss["C"])))
    for name in EFFECTS:
        _holm_family(comparisons, name)
    for comparison in comparisons:
        for effect in comparison.effects.values():
            effect.checks = _checks(effect, comparison.groups,
                                    {p: sweeps.get(g.name) for p, g in comparison.groups.items()}, protocol, null)
    comparisons.sort(key=lambda c: (not c.established,
                                    c.interaction.mean if math.isfinite(c.interaction.mean) else math.inf))
    return comparisons, missing


def _difference(effect: str, loss: dict[str, dict[int, float]]) -> Paired:
    """One effect of `EFFECTS`, paired by seed: the interaction of its four groups, else the
    difference of its two."""
    if effect == "interaction":
        return interaction(loss["gs"], loss["C"], loss["gm"], loss["A"])
    first, second = EFFECTS[effect][0]
    return paired_difference(loss[first], loss[second])


def _holm_family(comparisons: list[Comparison], name: str) -> None:
    """Holm's correction over one effect's family: its distinct comparisons (those over the same
    groups count once: C - A is the same comparison for every geometry optimizer of a format)."""
    distinct: dict[tuple[str, ...], list[Effect]] = {}
    for c in comparisons:
        if name not in c.effects:  # a remedy's effect where the format has no such arm
            continue
        effect = c.effects[name]
        distinct.setdefault(tuple(c.groups[p].name for p in effect.parts), []).append(effect)
    members = list(distinct.values())
    for same, p in zip(members, holm([same[0].paired.p for same in members])):
        for effect in same:
            effect.holm_p, effect.family = p, len(members)


def side_effects(comparisons: list[Comparison]) -> list[tuple[Comparison, Effect]]:
    """The effects beside the question (`EFFECTS` after the interaction), each distinct one once
    (C - A of a format once, whatever geometry optimizers share it), in the comparisons' order."""
    out, seen = [], set()
    for c in comparisons:
        for name, effect in c.effects.items():
            key = (name, tuple(c.groups[p].name for p in effect.parts))
            if name != "interaction" and key not in seen:
                seen.add(key)
                out.append((c, effect))
    return out
