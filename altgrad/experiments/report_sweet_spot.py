"""The sweet spot per layer type (issue 23 §2): for each arm and layer type (attention, MLP,
classifier, each quantized alone with the rest in BF16, beside uniform), which formats train
within noise of the BF16 baseline, the best one, and the ones that fail.

Per cell (format, arm, layer type) the paired difference of the final validation loss against
BF16 by seed, with its 95% t-interval (`stats.paired_difference`, as every difference of the
report), and its verdict, in this order:

- ``diverged`` / ``collapsed``: a run of the group diverged (or ended with a non-finite loss),
  or its validation loss rose above its step-0 value (the summary's collapse record): it fails;
- ``too few seeds``: fewer than 2 paired seeds, no interval: not established;
- ``within noise``: the interval holds 0, or |mean| is within the noise floor the report uses
  elsewhere, the interval's half-width plus the tuning resolution (here the baseline's: the
  cells inherit its lr and tune nothing of their own);
- ``resolution unknown``: beyond its interval, but no tuning resolution was recorded: not
  established;
- ``worse`` (it fails) or ``better``: beyond the interval's half-width plus the resolution.

The best format of a layer type and arm is the one with the lowest mean difference among those
that do not fail and have 2 paired seeds or more; its lead over the runner-up is paired by seed
too, and a lead within that noise floor is a tie, said. A line is "not established" when the
protocol's conditions on the groups it rests on fail (the baseline's and the cells' tuning
interior, at the cells' horizon, on a seed apart: `report_checks`' rules); what was measured is
still shown, named as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .report_checks import horizon_reasons, tuning_resolution, tuning_reasons, number_text
from .report_runs import Group
from .report_sweeps import Protocol, Sweep
from .stats import Paired, paired_difference

#: The layer policies that are one layer type alone (configs/matrix/layers.yaml); uniform beside them.
LAYER_TYPES = ("attention", "mlp", "classifier")
COLUMNS = (*LAYER_TYPES, "uniform")
LAYER_NAMES = {"attention": "Attention", "mlp": "MLP", "classifier": "Classifier (tied to the token embedding)",
               "uniform": "Uniform (every Linear)"}
FAILS = ("diverged", "collapsed", "worse")
NOT_ESTABLISHED = ("too few seeds", "resolution unknown")


def has_layer_types(groups: list[Group]) -> bool:
    """Whether any group quantizes one layer type alone: the sections of issue 23 appear then only."""
    return any(g.layers in LAYER_TYPES for g in groups)


def scope(groups: list[Group]) -> tuple[list[str], list[str], list[str]]:
    """(arms, layer columns, formats) of the layer-type sections, in the matrix's order: the arms
    that run some layer type alone, the layer types present (uniform last), their formats."""
    typed = [g for g in groups if g.layers in LAYER_TYPES and not g.baseline]
    arms = list(dict.fromkeys(g.arm for g in typed))
    present = {g.layers for g in groups if g.arm in arms and not g.baseline}
    columns = [c for c in COLUMNS if c in present]
    formats = list(dict.fromkeys(g.format for g in groups if g.arm in arms and g.layers in columns
                                 and not g.baseline))
    return arms, columns, formats


def arm_text(group: Group) -> str:
    """``arm A (FP32 masters)``: an arm with what it isolates (DESIGN §4)."""
    what = {"A": "FP32 masters", "B": "stored on the grid, round to nearest",
            "C": "stored on the grid, stochastic rounding"}.get(group.role, group.arm_tag)
    return f"arm {group.arm_name} ({what})"


def collapsed_seeds(group: Group) -> dict[int, dict[str, Any]]:
    """Seed -> the collapse record of each run whose summary has one (validation loss above step 0,
    or diverged: training/collapse.py)."""
    return {c.seed: c.run.summary["collapse"] for c in group.cells
            if c.run is not None and isinstance(c.run.summary.get("collapse"), dict)}


@dataclass
class SpotCell:
    group: Group
    paired: Paired  # the group - BF16, by seed
    resolution: float  # the tuning resolution of the group and the baseline (NaN: unknown)
    verdict: str
    detail: str  # the verdict's numbers in words
    reasons: list[str] = field(default_factory=list)  # the protocol conditions that fail

    @property
    def fails(self) -> bool:
        return self.verdict in FAILS

    @property
    def usable(self) -> bool:
        """A candidate for the best: it does not fail and has an interval."""
        return not self.fails and self.paired.n >= 2 and math.isfinite(self.paired.mean)

    @property
    def text(self) -> str:
        return f"{self.group.format} ({self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.group.format, "arm": self.group.arm, "layers": self.group.layers,
                "group": self.group.name, "vs_bf16": self.paired.to_dict(), "resolution": self.resolution,
                "noise_floor": self.paired.half_width + self.resolution, "verdict": self.verdict,
                "detail": self.detail, "reasons": self.reasons}


def interval_text(p: Paired) -> str:
    if p.n < 2:
        return f"{number_text(p.mean, '+.4f')}, n={p.n}"
    return f"{p.mean:+.4f} [{p.low:+.4f}, {p.high:+.4f}] n={p.n}"


def classify(group: Group, paired: Paired, resolution: float) -> tuple[str, str]:
    """(verdict, detail) of one cell against BF16 (the module doc's order)."""
    ended = len(group.cells) - group.failed
    if group.diverged:
        return "diverged", f"diverged: {group.diverged} of {ended} runs"
    collapses = collapsed_seeds(group)
    if collapses:
        return "collapsed", "collapsed: " + ", ".join(f"seed {s} at step {c.get('step')}"
                                                    for s, c in collapses.items())
    numbers = interval_text(paired)
    if paired.n < 2:
        return "too few seeds", f"{numbers}: {paired.n} paired seed{'s' if paired.n != 1 else ''}, at least 2 needed"
    if not paired.excludes_zero:
        return "within noise", f"{numbers}: the interval holds 0"
    if not math.isfinite(resolution):
        return "resolution unknown", f"{numbers}: beyond its interval; no tuning resolution recorded"
    floor = paired.half_width + resolution
    if abs(paired.mean) <= floor:
        return "within noise", (f"{numbers}: beyond its interval, within its half-width + the tuning resolution "
                                f"{resolution:.4f}")
    return ("worse" if paired.mean > 0 else "better"), \
        f"{numbers}: beyond its half-width + the tuning resolution {resolution:.4f}"


def _protocol(group: Group, baseline: Group, sweeps: dict[str, Sweep], protocol: Protocol) -> list[str]:
    """The protocol conditions that fail on a cell's group and the baseline it is compared with."""
    out = []
    for g, label in ((baseline, f"the baseline {baseline.name}"), (group, group.name)):
        sweep = sweeps.get(g.name)
        out += tuning_reasons(label, sweep) + horizon_reasons(label, g, sweep, protocol)
        seed = sweep.seed if sweep is not None and sweep.seed is not None else protocol.tuning_seed
        if sweep is not None and seed is not None and seed in g.seeds | set(protocol.eval_seeds):
            out.append(f"{label} was tuned on seed {seed}, an evaluation seed")
    return out


@dataclass
class SpotLine:
    """One arm and layer type: its cells (one per format) and what they say."""

    arm: str
    layers: str
    cells: list[SpotCell]
    best: SpotCell | None = None
    runner_up: SpotCell | None = None
    lead: Paired | None = None  # best - runner-up, by seed
    lead_verdict: str = ""  # tied | ahead | resolution unknown | too few seeds ("" without a runner-up)
    reasons: list[str] = field(default_factory=list)  # the protocol conditions that fail, deduplicated

    def named(self, *verdicts: str) -> list[SpotCell]:
        return [c for c in self.cells if c.verdict in verdicts]

    @property
    def established(self) -> bool:
        return not self.reasons

    @property
    def sentence(self) -> str:
        group = self.cells[0].group
        head = f"{LAYER_NAMES.get(self.layers, self.layers)}, {arm_text(group)}: "
        parts = []
        within = self.named("within noise")
        parts.append("within noise of BF16: " + (", ".join(c.text for c in within) if within else "no format"))
        if self.best is not None:
            best = f"best: {self.best.group.format} ({interval_text(self.best.paired)})"
            if self.runner_up is not None and self.lead is not None:
                lead = f"{self.best.group.format} - {self.runner_up.group.format} = {interval_text(self.lead)}"
                other = self.runner_up.group.format
                best += {"tied": f", tied within noise with {other} ({lead})",
                         "ahead": f", ahead of {other} beyond noise ({lead})",
                         "resolution unknown": f", ahead of {other} beyond its interval, the tuning resolution "
                                               f"unknown: not established ({lead})",
                         "too few seeds": f", its lead over {other} not established ({lead})"}[self.lead_verdict]
            parts.append(best)
        else:
            parts.append("best: none (every format fails or has fewer than 2 paired seeds)")
        better = self.named("better")
        if better:
            parts.append("better than BF16 beyond noise: " + ", ".join(c.text for c in better))
        fails = self.named(*FAILS)
        parts.append("fails: " + (", ".join(c.text for c in fails) if fails else "none"))
        unclear = self.named(*NOT_ESTABLISHED)
        if unclear:
            parts.append("not established: " + ", ".join(c.text for c in unclear))
        body = "; ".join(parts) + "."
        if self.reasons:
            return head + "not established (" + "; ".join(self.reasons) + "). Measured at that lr: " + body
        return head + body

    def to_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "layers": self.layers, "established": self.established, "reasons": self.reasons,
                "cells": [c.to_dict() for c in self.cells],
                "within_noise": [c.group.format for c in self.named("within noise")],
                "better": [c.group.format for c in self.named("better")],
                "fails": [c.group.format for c in self.named(*FAILS)],
                "not_established": [c.group.format for c in self.named(*NOT_ESTABLISHED)],
                "best": self.best.group.format if self.best else None,
                "runner_up": self.runner_up.group.format if self.runner_up else None,
                "lead": self.lead.to_dict() if self.lead else None, "lead_verdict": self.lead_verdict,
                "sentence": self.sentence}


def _best(line: SpotLine, resolution: float) -> None:
    usable = sorted((c for c in line.cells if c.usable), key=lambda c: c.paired.mean)
    if not usable:
        return
    line.best = usable[0]
    if len(usable) > 1:
        line.runner_up = usable[1]
        line.lead = paired_difference(line.best.group.losses(), line.runner_up.group.losses())
        lead = line.lead
        if lead.n < 2:
            line.lead_verdict = "too few seeds"
        elif not lead.excludes_zero:
            line.lead_verdict = "tied"
        elif not math.isfinite(resolution):
            line.lead_verdict = "resolution unknown"
        else:
            line.lead_verdict = "ahead" if abs(lead.mean) > lead.half_width + resolution else "tied"


@dataclass
class SweetSpot:
    arms: list[str]
    columns: list[str]  # the layer types (uniform last)
    formats: list[str]
    lines: list[SpotLine]
    inheritance: str  # what the cells' tuning record says and what it means

    def cell(self, arm: str, layers: str, fmt: str) -> SpotCell | None:
        line = next((x for x in self.lines if (x.arm, x.layers) == (arm, layers)), None)
        return next((c for c in line.cells if c.group.format == fmt), None) if line else None

    def to_dict(self) -> dict[str, Any]:
        return {"arms": self.arms, "layers": self.columns, "formats": self.formats, "inheritance": self.inheritance,
                "method": "paired by seed against BF16, 95% Student-t interval; within noise: the interval holds 0 "
                          "or |mean| <= half-width + tuning resolution; fails: diverged, collapsed or worse beyond "
                          "that floor",
                "lines": [x.to_dict() for x in self.lines]}


def inheritance(groups: list[Group], sweeps: dict[str, Sweep]) -> str:
    """What the manifest's sweeps say the cells' lr is, and what it means for every difference."""
    sources: dict[tuple, list[str]] = {}
    own, untuned = [], []
    for g in groups:
        sweep = sweeps.get(g.name)
        if sweep is None:
            untuned.append(g.name)
            continue
        if sweep.keys:
            own.append(f"{g.name} ({', '.join(sweep.keys)})")
        for key, source in sweep.inherited.items():
            where = source.get("group") or source.get("from")
            sources.setdefault((key, where, source.get("value"), bool(source.get("interior"))), []).append(g.name)
    parts = []
    for (key, where, value, interior), names in sources.items():
        parts.append(f"{len(names)} of the {len(groups)} groups inherit {key} = {value} from {where}"
                     f"{'' if interior else ' (not interior there)'}")
    if own:
        parts.append("tuned their own values: " + ", ".join(own))
    if untuned:
        parts.append(f"no tuning record: {', '.join(untuned)}")
    record = "; ".join(parts) + "." if parts else "no tuning record."
    return ("The FP8 cells inherit the BF16 baseline's tuned lr, as FP8 recipes do (Micikevicius et al. 2022); "
            f"the manifest's sweeps record it: {record} So each difference against BF16 is the format's cost at "
            "the recipe's lr, the baseline's optimum, not at the format's own: a format whose optimum lies "
            "elsewhere could do better tuned alone, so a gap or a failure here holds at that lr (an upper bound "
            "on what the format costs when tuned), and 'within noise' says the format needs no retuning there. "
            "The cells tune nothing of their own, so their tuning resolution is the baseline's.")


def sweet_spot(groups: list[Group], baseline: Group | None, sweeps: dict[str, Sweep],
               protocol: Protocol) -> SweetSpot | None:
    """The section's content; None when no group runs a layer type alone, or without a baseline."""
    if baseline is None or not has_layer_types(groups):
        return None
    arms, columns, formats = scope(groups)
    base_sweep = sweeps.get(baseline.name)
    lines, shown = [], []
    for arm in arms:
        for layers in columns:
            members = [g for fmt in formats for g in groups
                       if (g.format, g.arm, g.layers) == (fmt, arm, layers)]
            if not members:
                continue
            cells = []
            for g in members:
                paired = paired_difference(g.losses(), baseline.losses())
                resolution = tuning_resolution([sweeps.get(g.name), base_sweep])
                verdict, detail = classify(g, paired, resolution)
                cells.append(SpotCell(g, paired, resolution, verdict, detail, _protocol(g, baseline, sweeps,
                                                                                        protocol)))
            line = SpotLine(arm, layers, cells, reasons=list(dict.fromkeys(r for c in cells for r in c.reasons)))
            _best(line, tuning_resolution([base_sweep]))
            lines.append(line)
            shown += members
    return SweetSpot(arms, columns, formats, lines, inheritance(shown, sweeps))


def lines_md(section: SweetSpot, figure: str | None) -> list[str]:
    """The report.md section."""
    out = ["## The sweet spot per layer type", "",
           "Each layer type quantized alone, the rest of the model in BF16 (uniform: every Linear). Per cell the "
           "final validation loss minus BF16's of the same seed, paired by seed, mean and 95% t-interval. Within "
           "noise: the interval holds 0, or |mean| is within its half-width plus the tuning resolution; fails: a "
           "run diverged or collapsed (validation loss above its step-0 value), or worse beyond that floor; not "
           "established: fewer than 2 paired seeds, an unknown resolution, or the protocol's conditions failing "
           "on the baseline's or the cell's tuning.", "", section.inheritance, ""]
    out += [f"- {line.sentence}" for line in section.lines]
    for arm in section.arms:
        out += ["", f"Arm {arm}: final val loss - BF16 (same seed), mean [95% interval], verdict", "",
                "| format | " + " | ".join(section.columns) + " |", "|---|" + "---|" * len(section.columns)]
        for fmt in section.formats:
            row = []
            for layers in section.columns:
                cell = section.cell(arm, layers, fmt)
                row.append("-" if cell is None else f"{interval_text(cell.paired)} {cell.verdict}")
            out.append(f"| {fmt} | " + " | ".join(row) + " |")
    if figure:
        out += ["", f"![The sweet spot per layer type]({figure})"]
    return out + [""]
