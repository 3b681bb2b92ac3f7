"""Where each format fails (issue 23 §3): per (format, layer type, arm) group of the layer-type
sections, each run's stage (`failure_stage.attribute`: the stage whose metric first crosses its
threshold) and the group's over its seeds (`failure_stage.aggregate`), with the collapse analysis
(training/collapse.py) beside it, for E7M0, the plan's negative result, and any group that
collapsed.

A crossing is a symptom, a failure is a cost: a group *fails* when its loss against BF16 does
(the sweet-spot verdict: diverged, collapsed, or worse beyond the noise floor). Each group's
reading says both: a failing group's first crossing is where its failure is attributed; a group
whose metric crossed without a loss cost is said to do so (a warning the loss did not show at this
scale), never called a failure.

A run's thresholds are its own config's (`Thresholds.of_run`); its weights count as stored when
its config stores them on the grid; the A-vs-C rule reads the arm-A run of the same format, layer
type and seed (none for arm A itself, or without one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..training.collapse import collapse_analysis
from .failure_stage import NEW_THRESHOLDS, RULES, STAGES, GroupStage, Thresholds, aggregate, attribute
from .report_checks import find_group
from .report_runs import Group
from .report_sweet_spot import FAILS, SpotCell, SweetSpot, interval_text, scope

#: Where a rule applies, as the section says it.
APPLIES = {"format": " (stored weights)", "master": " (FP32 masters)", None: ""}
#: The arm of the negative result, whose collapse analysis the section shows beside its stage.
NEGATIVE = "E7M0"


def stored(config: dict[str, Any]) -> bool:
    """Whether a run's weights live on the grid (its config's weight_storage; before the setting
    was resolved into the config, the optimizer's default: format for manifold, grid and eco)."""
    storage = config.get("weight_storage")
    if storage is None:
        return config.get("optimizer") in ("manifold", "grid", "eco")
    return storage == "format"


def collapse_of(run: Any, status: str) -> dict[str, Any] | None:
    """The run's collapse analysis: its summary's record, or computed from its records (a run
    from before the record)."""
    if "collapse" in run.summary:
        return run.summary["collapse"] or None
    steps = run.summary.get("steps", run.metrics[-1].get("step", 0) if run.metrics else 0)
    return collapse_analysis(run.metrics, status, steps)


@dataclass
class GroupFailure:
    group: Group
    stage: GroupStage | None  # None: no run had records
    thresholds: Thresholds
    stored: bool
    reference: str | None  # the arm-A group the A-vs-C rule read, by name
    collapses: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> collapse analysis
    no_records: list[int] = field(default_factory=list)  # seeds without a run to read
    cost: SpotCell | None = None  # its loss against BF16 (the sweet spot's cell; None: not compared)

    @property
    def fails(self) -> bool:
        return self.cost is not None and self.cost.fails

    @property
    def cost_text(self) -> str:
        """``worse: +0.0520 [+0.0300, +0.0740] n=3``: its loss against BF16 and the verdict."""
        if self.cost is None:
            return "not compared with BF16"
        if self.cost.verdict in ("diverged", "collapsed"):
            return self.cost.detail
        return f"{self.cost.verdict}: {interval_text(self.cost.paired)}"

    @property
    def reading(self) -> str:
        """What the group's stage means beside its loss: where it fails, or a crossing without cost."""
        crossed = self.stage is not None and self.stage.stage != "none"
        if self.fails:
            if crossed:
                return f"fails in the {self.stage.stage} pass" if self.stage.stage != "optimizer" \
                    else "fails in the optimizer"
            return "fails; no measured metric crossed its threshold (the cause is outside the measured stages)"
        if self.cost is None:
            return f"{self.stage.stage} crossed first; its loss was not compared" if crossed else \
                "nothing crossed; its loss was not compared"
        if crossed:
            return f"does not fail: {self.stage.stage} crossed first without a loss cost ({self.cost.verdict})"
        return f"does not fail, nothing crossed ({self.cost.verdict})"

    @property
    def where(self) -> str:
        return f"{self.group.format} ({self.group.layers}) arm {self.group.arm_name}"

    def stage_cell(self, stage: str) -> str:
        """A stage's first crossing over the seeds: the earliest step, its metric, the seeds."""
        if self.stage is None:
            return "no records"
        results = {seed: a.stages[stage] for seed, a in self.stage.per_seed.items()}
        crossed = {seed: r for seed, r in results.items() if r.status == "crossed"}
        if crossed:
            seed, first = min(crossed.items(), key=lambda item: (item[1].step, item[0]))
            return f"step {first.step}: {first.first.reading} ({len(crossed)}/{len(results)})"
        statuses = sorted({r.status for r in results.values()})
        return "/".join(statuses)

    def collapse_text(self) -> str:
        if not self.collapses:
            return "none"
        return "; ".join(f"seed {s} at step {c.get('step')} ({c.get('reason')})" for s, c in self.collapses.items())

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.group.format, "layers": self.group.layers, "arm": self.group.arm,
                "group": self.group.name, "stored": self.stored, "reference": self.reference,
                "vs_bf16": self.cost_text, "fails": self.fails, "reading": self.reading,
                "thresholds": self.thresholds.to_dict(),
                "stage": self.stage.to_dict() if self.stage else None,
                "stages": {s: self.stage_cell(s) for s in STAGES},
                "collapse": {str(s): c for s, c in self.collapses.items()}, "no_records": self.no_records}


@dataclass
class FailureMap:
    arms: list[str]
    columns: list[str]
    formats: list[str]
    groups: list[GroupFailure]

    def find(self, fmt: str, layers: str, arm: str) -> GroupFailure | None:
        return next((f for f in self.groups if (f.group.format, f.group.layers, f.group.arm) == (fmt, layers, arm)),
                    None)

    def unmeasured(self) -> dict[str, list[str]]:
        """Rule -> the groups where some run did not measure it (applicable, no finite value)."""
        out: dict[str, list[str]] = {}
        for f in self.groups:
            if f.stage is None:
                continue
            for a in f.stage.per_seed.values():
                for s in a.stages.values():
                    for name in s.not_measured:
                        names = out.setdefault(name, [])
                        if f.group.name not in names:
                            names.append(f.group.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"arms": self.arms, "layers": self.columns, "formats": self.formats,
                "rules": [{"stage": r.stage, "metric": r.name, "what": r.what, "threshold": r.threshold,
                           "crossed_when": "above" if r.above else "below", "applies_to": r.storage or "all"}
                          for r in RULES],
                "thresholds": {"default": Thresholds().to_dict(), "new": NEW_THRESHOLDS},
                "unmeasured": self.unmeasured(), "groups": [f.to_dict() for f in self.groups]}


def failure_map(groups: list[Group], spot: SweetSpot | None = None) -> FailureMap | None:
    """Every group of the layer-type sections, attributed, with its loss against BF16 from the
    sweet spot (``spot``); None when there are none."""
    arms, columns, formats = scope(groups)
    if not arms:
        return None
    found = []
    for fmt in formats:
        for layers in columns:
            for arm in arms:
                group = next((g for g in groups if (g.format, g.layers, g.arm) == (fmt, layers, arm)), None)
                if group is not None:
                    found.append(_group_failure(group, groups,
                                                spot.cell(arm, layers, fmt) if spot is not None else None))
    return FailureMap(arms, columns, formats, found)


def _group_failure(group: Group, groups: list[Group], cost: SpotCell | None) -> GroupFailure:
    partner = find_group(groups, group.format, group.layers, "A") if group.role != "A" else None
    partner_runs = {c.seed: c.run for c in partner.cells if c.run is not None} if partner is not None else {}
    per_seed, collapses, missing = {}, {}, []
    thresholds, storage = Thresholds(), False
    for cell in group.cells:
        run = cell.run
        if run is None or not run.metrics:
            missing.append(cell.seed)
            continue
        thresholds, storage = Thresholds.of_run(run.config), stored(run.config)
        reference = partner_runs.get(cell.seed)
        per_seed[cell.seed] = attribute(run.metrics, thresholds, stored=storage,
                                        reference=reference.metrics if reference is not None else None)
        collapse = collapse_of(run, cell.status)
        if collapse:
            collapses[cell.seed] = collapse
    return GroupFailure(group, aggregate(per_seed), thresholds, storage,
                        partner.name if partner is not None else None, collapses, missing, cost)


def _collapse_lines(failures: FailureMap) -> list[str]:
    """Beside the stages: every E7M0 group and every group that collapsed, with where and how."""
    out = []
    for f in failures.groups:
        if f.group.format != NEGATIVE and not f.collapses:
            continue
        stage = f.stage.text if f.stage else "no records"
        if not f.collapses:
            out.append(f"- {f.where}: stage {stage}; no run collapsed (validation loss never above its step-0 "
                       "value, none diverged).")
            continue
        parts = []
        for seed, c in f.collapses.items():
            at = f.stage.per_seed.get(seed) if f.stage else None
            before = ""
            if at is not None and at.step is not None and c.get("step") is not None:
                order = "before" if at.step < c["step"] else "at" if at.step == c["step"] else "after"
                before = f"; its first crossing ({at.stage}, step {at.step}) came {order} it"
            underflow = ", ".join(f"{name} {value:.3g}" for name, value in c.get("highest_underflow") or [])
            stall = ", ".join(f"{name} {value:.3g}" for name, value in c.get("highest_stall") or [])
            where = f" (measured at step {c['measured_at']})" if "measured_at" in c else ""
            parts.append(f"seed {seed} collapsed at step {c.get('step')} ({c.get('reason')}){before}; at the "
                         f"collapse{where} the highest gradient underflow: {underflow or 'not measured'}; the "
                         f"highest stall ratio: {stall or 'not measured'}")
        out.append(f"- {f.where}: stage {stage}. " + "; ".join(parts) + ".")
    return out


def format_sentences(failures: FailureMap) -> list[str]:
    """Per format, in words: where it fails (layer type, arm, stage and step), where a metric
    crossed without a loss cost, and where it neither failed nor crossed."""
    out = []
    for fmt in failures.formats:
        mine = [f for f in failures.groups if f.group.format == fmt]
        where = lambda f: f"{f.group.layers} arm {f.group.arm_name}"  # noqa: E731
        fails = [f"{where(f)} ({f.cost_text}; {f.stage.text if f.stage else 'no records'})"
                 for f in mine if f.fails]
        symptoms = [f"{where(f)} ({f.stage.text})" for f in mine
                    if not f.fails and f.stage is not None and f.stage.stage != "none"]
        quiet = [where(f) for f in mine if not f.fails and (f.stage is None or f.stage.stage == "none")]
        parts = ["fails in " + "; ".join(fails) if fails else "fails nowhere it ran"]
        if symptoms:
            parts.append("crossed a threshold without a loss cost in " + "; ".join(symptoms))
        if quiet:
            parts.append("neither failed nor crossed in " + ", ".join(quiet))
        out.append(f"{fmt}: " + "; ".join(parts) + ".")
    return out


def lines_md(failures: FailureMap, figure: str | None) -> list[str]:
    """The report.md section."""
    rules = "; ".join(f"{stage}: " + ", ".join(f"`{r.name}` {'>' if r.above else '<'} {r.threshold}"
                                              + APPLIES[r.storage]
                                              for r in RULES if r.stage == stage) for stage in STAGES)
    defaults = Thresholds().to_dict()
    out = ["## Where each format fails", "",
           "Each run's loss is attributed to the stage whose metric first crosses its threshold "
           "(`altgrad/experiments/failure_stage.py`): " + rules + ". A crossing is strictly beyond the threshold "
           "(exactly at it is not); a missing or non-finite value is no crossing, and a metric a run never "
           "measured is said below. The stage is the earliest first crossing; at the same step the upstream stage "
           "is taken (forward, backward, optimizer: an upstream failure causes downstream ones); no crossing: "
           "none. Over seeds: the stage most seeds name (ties in the same order, none last), its step the "
           "earliest among them. Under FP32 masters the stall and update rules do not apply (the master "
           "accumulates what the cast does not show); a stored weight's cast is exact, so the weight's cast "
           "rules apply under FP32 masters only; the A-vs-C rule compares a stored run's validation loss "
           "with arm A's of the same seed at each evaluation. A crossing is a symptom: a group *fails* only "
           "where its loss does (against BF16, the sweet spot's verdict), and only there is its first crossing "
           "where it fails; elsewhere a crossing is said as one without a loss cost.", "",
           "Thresholds (each run's own config for the first four): "
           + ", ".join(f"{k} {v:g}" for k, v in defaults.items()) + ". The ones the config does not define: "
           + "; ".join(f"{k}: {why}" for k, why in NEW_THRESHOLDS.items()) + ".", "",
           *[f"- {line}" for line in format_sentences(failures)], "",
           "| format | layer type | arm | loss vs BF16 | reading | stage (seeds) | forward | backward | optimizer "
           "| collapse |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in failures.groups:
        stage = f.stage.text if f.stage else "no records"
        out.append(f"| {f.group.format} | {f.group.layers} | {f.group.arm_name} | {f.cost_text} | {f.reading} | "
                   f"{stage} | " + " | ".join(f.stage_cell(s) for s in STAGES) + f" | {f.collapse_text()} |")
    unmeasured = failures.unmeasured()
    if unmeasured:
        out += ["", "Not measured (no finite value in some of a group's runs; not crossed there):", ""]
        out += [f"- `{name}`: {', '.join(names)}" for name, names in unmeasured.items()]
    beside = _collapse_lines(failures)
    if beside:
        out += ["", f"### {NEGATIVE} and the collapses", "",
                "Where each fails and how: its stage beside the collapse analysis (the first evaluation with the "
                "validation loss above its step-0 value, or the divergence; the layers with the most gradient "
                "underflow and the highest stall ratio there).", "", *beside]
    if figure:
        out += ["", f"![Where each format fails]({figure})"]
    return out + [""]
