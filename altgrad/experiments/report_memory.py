"""Memory per parameter in the report (DESIGN §5.2: the remedies' memory beside each): each
group's bits per weight with a format, from its runs' summaries (``memory``, written by the
trainer from `altgrad.optim.memory.state_bits`), and per format the memory/loss frontier.

- A group's record (`GroupMemory`) is its runs' when they agree; runs from before the record
  (no ``memory`` in their summary) are named, never guessed; runs that disagree are said.
- The frontier of a format (`Frontier`): the arms with a record and a finite mean final
  validation loss; an arm is on it when no other arm has fewer or equal bits (`SAME_BITS`) and
  a lower mean loss (non-dominated). Each arm's place rests on one comparison, against the
  arm with the lowest mean loss among the others with fewer or equal bits (its reference: for
  an arm on the frontier, the cheaper arm it must beat; for one off it, the arm that beats it
  the most): their paired difference by seed with its 95% interval and the tuning resolution
  of the two groups. Descriptive: no Holm correction, and an unknown resolution is said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..optim.memory import PARTS
from .matrix import layer_suffix
from .report_checks import tuning_resolution, number_text
from .report_runs import Group
from .report_sweeps import Sweep
from .stats import Paired, from_differences, paired_difference

#: Totals closer than this (bits per parameter) count as equal: what separates them is the
#: amortised scalars (scales, step counters), never a whole bit of a weight's state.
SAME_BITS = 0.5


def _same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(math.isclose(float(a.get(k, math.nan)), float(b.get(k, math.nan)), rel_tol=1e-9, abs_tol=1e-12)
               for k in (*PARTS, "total"))


def bits_text(bits: dict[str, Any]) -> str:
    """``72.02 = stored 8 + moments 64 + other 0.01756``: the total and its non-zero parts."""
    parts = " + ".join(f"{part} {float(bits[part]):.4g}" for part in PARTS if bits.get(part))
    return f"{float(bits['total']):.4g}" + (f" = {parts}" if parts else "")


def _seeds(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, sorted(seeds)))}"


@dataclass(frozen=True)
class GroupMemory:
    """A group's bits per weight with a format, from its runs' summaries."""

    status: str  # recorded | no weight format | not recorded | runs disagree
    bits: dict[str, float] | None  # the runs' record when they agree (parts and total)
    per_seed: dict[int, dict[str, float] | None] = field(default_factory=dict)  # the runs that recorded it
    not_recorded: tuple[int, ...] = ()  # seeds whose run has no record (from before it, or no summary yet)

    @property
    def total(self) -> float:
        return float(self.bits["total"]) if self.status == "recorded" else math.nan

    @property
    def short(self) -> str:
        """The total alone (``72.02``), or the status; the seeds without a record named."""
        if self.status != "recorded":
            return {"no weight format": "-", "runs disagree": "runs disagree"}.get(self.status, self.status)
        missing = f" (not recorded: {_seeds(list(self.not_recorded))})" if self.not_recorded else ""
        return f"{self.total:.4g}{missing}"

    @property
    def text(self) -> str:
        if self.status == "not recorded":
            return "not recorded"
        if self.status == "no weight format":
            text = "- (no weight format)"
        elif self.status == "runs disagree":
            distinct: list[tuple[dict | None, list[int]]] = []
            for seed, bits in self.per_seed.items():
                match = next((entry for entry in distinct if _same(entry[0], bits)), None)
                if match is None:
                    distinct.append((bits, [seed]))
                else:
                    match[1].append(seed)
            text = "runs disagree: " + "; ".join(
                f"{bits_text(bits) if bits is not None else 'no weight format'} ({_seeds(seeds)})"
                for bits, seeds in distinct)
        else:
            text = bits_text(self.bits)
        if self.not_recorded:
            text += f" (not recorded: {_seeds(list(self.not_recorded))})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "bits": self.bits, "total": self.total if self.bits else None,
                "per_seed": {str(s): b for s, b in self.per_seed.items()},
                "not_recorded": list(self.not_recorded), "text": self.text}


def group_memory(group: Group) -> GroupMemory:
    """The group's record from its runs' summaries: ``recorded`` when every run that recorded it
    agrees (those without a record named), ``no weight format`` when they recorded none (BF16),
    ``runs disagree`` otherwise, ``not recorded`` when no run has a record."""
    per_seed: dict[int, dict[str, float] | None] = {}
    missing = []
    for cell in group.cells:
        if cell.run is None:  # a missing run: nothing to read, nothing to say
            continue
        summary = cell.run.summary
        if "memory" in summary:
            per_seed[cell.seed] = summary["memory"]
        else:
            missing.append(cell.seed)
    if not per_seed:
        return GroupMemory("not recorded", None, {}, tuple(missing))
    first = next(iter(per_seed.values()))
    if not all(_same(first, bits) for bits in per_seed.values()):
        return GroupMemory("runs disagree", None, per_seed, tuple(missing))
    status = "no weight format" if first is None else "recorded"
    return GroupMemory(status, dict(first) if first is not None else None, per_seed, tuple(missing))


# ---- the frontier ------------------------------------------------------------------------------
@dataclass
class FrontierPoint:
    """One arm of a format on the memory/loss plane, and the comparison its place rests on."""

    group: Group
    bits: float  # total bits per weight with a format
    loss: Paired  # the group's final losses: their mean and its 95% t-interval over seeds
    on_frontier: bool = False
    reference: Group | None = None  # the lowest-loss other arm with fewer or equal bits
    difference: Paired | None = None  # this arm - the reference, paired by seed
    resolution: float = math.nan  # the tuning resolution of the two groups (NaN: unknown)
    verdict: str = ""  # separated | within noise | within resolution | resolution unknown | too few seeds |
    #                    other sign | "" (no arm with fewer or equal bits: nothing to rest on)

    @property
    def name(self) -> str:
        return self.group.arm_name

    @property
    def settled(self) -> bool:
        """Whether its place is separated from its reference's (the cheapest arm: nothing to separate)."""
        return self.reference is None or self.verdict == "separated"

    def claim(self) -> str:
        """What its place rests on, in words (empty for the cheapest arm)."""
        if self.reference is None:
            return ""
        ref, d = self.reference.arm_name, self.difference
        paired = (f"{self.name} - {ref} = {number_text(d.mean, '+.4f')}"
                  + (f" [{d.low:+.4f}, {d.high:+.4f}] n={d.n}" if d.n >= 2 else f" (n={d.n})"))
        if self.loss.mean == self.reference.mean_loss():
            return f"{self.name} and {ref} tie on mean loss ({paired})"
        lead = f"{self.name}'s lead over {ref}" if self.on_frontier else f"{ref}'s lead over {self.name}"
        why = {"separated": f"beyond its interval and the tuning resolution {number_text(self.resolution)}",
               "within noise": "within noise (the interval holds 0): not established",
               "within resolution": f"beyond its interval but within the tuning resolution "
                                    f"{number_text(self.resolution)}: not established",
               "resolution unknown": "beyond its interval; the tuning resolution is unknown: not established",
               "too few seeds": f"{d.n} paired seed{'s' if d.n != 1 else ''} (at least 2 needed): not established",
               "other sign": "the paired difference over their shared seeds has the other sign: not established",
               }[self.verdict]
        return f"{lead} is {why} ({paired})" if self.verdict != "too few seeds" else f"{lead}: {why} ({paired})"

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group.name, "arm": self.group.arm, "arm_tag": self.group.arm_tag, "name": self.name,
                "bits": self.bits, "loss": self.loss.to_dict(), "on_frontier": self.on_frontier,
                "reference": self.reference.name if self.reference is not None else None,
                "difference": self.difference.to_dict() if self.difference is not None else None,
                "resolution": self.resolution, "verdict": self.verdict, "settled": self.settled,
                "claim": self.claim()}


@dataclass
class Frontier:
    format: str
    layers: str
    points: list[FrontierPoint]  # by bits, then mean loss
    left_out: list[tuple[Group, str]]  # the groups not on the plane, and why

    @property
    def where(self) -> str:
        return self.format + layer_suffix(self.layers, " ({})")

    @property
    def on(self) -> list[FrontierPoint]:
        return [p for p in self.points if p.on_frontier]

    @property
    def off(self) -> list[FrontierPoint]:
        return [p for p in self.points if not p.on_frontier]

    @property
    def summary(self) -> str:
        """Which arms are on the frontier, which are off it, which are not on the plane."""
        left = "; ".join(f"{g.arm_name} ({why})" for g, why in self.left_out)
        if not self.points:
            return f"{self.where}: no arm has both a memory record and a finite loss" + \
                (f"; not on it: {left}." if left else ".")
        def names(points):
            return ", ".join(f"{p.name} ({p.bits:.4g} bits, {p.loss.mean:.4f})" for p in points)
        out = [f"{self.where}: on the frontier (fewest bits first): {names(self.on)}."]
        if self.off:
            out.append(f"Off it: {names(self.off)}.")
        if left:
            out.append(f"Not on it: {left}.")
        return " ".join(out)

    @property
    def claims(self) -> list[str]:
        """What each arm's place rests on (a pair that is each other's reference, once)."""
        out, seen = [], set()
        for p in self.points:
            pair = frozenset((p.group.key, p.reference.key)) if p.reference is not None else None
            if pair is None or pair in seen:
                continue
            seen.add(pair)
            out.append(p.claim() + ".")
        return out

    @property
    def text(self) -> str:
        return " ".join([self.summary, *self.claims])

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "layers": self.layers, "points": [p.to_dict() for p in self.points],
                "on_frontier": [p.name for p in self.on],
                "left_out": [{"group": g.name, "name": g.arm_name, "why": why} for g, why in self.left_out],
                "summary": self.summary, "claims": self.claims, "text": self.text}


def non_dominated(points: list[tuple[float, float]]) -> list[bool]:
    """Per (bits, mean loss): whether no other point has fewer or equal bits (within `SAME_BITS`)
    and a lower mean loss."""
    return [not any(j != i and b <= bits + SAME_BITS and loss < mine for j, (b, loss) in enumerate(points))
            for i, (bits, mine) in enumerate(points)]


def _verdict(point: FrontierPoint) -> str:
    d = point.difference
    if d.n < 2:
        return "too few seeds"
    # The sign the means put it at: an arm on the frontier below its reference, one off it above.
    expected = -1.0 if point.loss.mean < point.reference.mean_loss() else 1.0
    if not math.isfinite(d.mean) or d.mean * expected < 0:
        return "other sign"
    if not d.excludes_zero:
        return "within noise"
    if not math.isfinite(point.resolution):
        return "resolution unknown"
    return "separated" if abs(d.mean) > d.half_width + point.resolution else "within resolution"


def frontier(groups: list[Group], memory: dict[str, GroupMemory], sweeps: dict[str, Sweep],
             fmt: str, layers: str) -> Frontier:
    """The memory/loss frontier of one format and layer policy (module doc)."""
    points, left_out = [], []
    for g in groups:
        if (g.format, g.layers) != (fmt, layers) or g.baseline:
            continue
        record = memory[g.key]
        if record.status != "recorded":
            left_out.append((g, f"memory {record.status}" if record.status != "no weight format"
                             else "no weight format"))
        elif not g.losses():
            left_out.append((g, "no finite final loss"))
        else:
            points.append(FrontierPoint(g, record.total, from_differences(g.losses())))
    points.sort(key=lambda p: (p.bits, p.loss.mean, p.name))
    for point, on in zip(points, non_dominated([(p.bits, p.loss.mean) for p in points])):
        point.on_frontier = on
    for point in points:
        cheaper = [q for q in points if q is not point and q.bits <= point.bits + SAME_BITS]
        if not cheaper:
            continue
        reference = min(cheaper, key=lambda q: (q.loss.mean, q.bits, q.name))
        point.reference = reference.group
        point.difference = paired_difference(point.group.losses(), reference.group.losses())
        point.resolution = tuning_resolution([sweeps.get(point.group.name), sweeps.get(reference.group.name)])
        point.verdict = _verdict(point)
    return Frontier(fmt, layers, points, left_out)


def frontiers(groups: list[Group], memory: dict[str, GroupMemory], sweeps: dict[str, Sweep]) -> list[Frontier]:
    """One per format and layer policy (the baseline's aside), in the matrix's order; none where
    no group of the format recorded its memory."""
    places = list(dict.fromkeys((g.format, g.layers) for g in groups if not g.baseline))
    found = [frontier(groups, memory, sweeps, fmt, layers) for fmt, layers in places]
    return [f for f in found if f.points or any(memory[g.key].status != "not recorded"
                                                for g, _ in f.left_out)]
