"""The report: what a matrix found, and the answer its protocol supports (DESIGN §5).

The runs come grouped from `report_runs` (a matrix's manifest, or a directory's run folders),
with each group's tuning record (`Sweep`) and the matrix's tuning protocol (`Protocol`) from
`report_sweeps`; the comparisons and the checks that gate their claims are `report_checks`.

- Per (format, arm, layers) group: the final validation loss per seed, its mean over the seeds
  that completed with a finite loss, and the divergence rate (a diverged run is counted, never
  averaged into a loss); paired differences by seed against the BF16 baseline and against arm A.
- Per format, layer policy and geometry optimizer (ManifoldAdamW, GridOptim) with all four
  groups the question needs (geometry stored ``gs``, arm C, the same optimizer on FP32 masters
  ``gm``, arm A), DESIGN §5.2: the update-rule effect ``gm - A``, the storage effects ``C - A``
  and ``gs - gm``, and the question itself, the interaction ``(gs - C) - (gm - A)``, each paired
  by seed with its 95% interval. Each is a claim of its own under the same checks, with Holm's
  correction within each effect over its distinct comparisons. A format without one of the four
  is "not compared" (named with what it lacks), never ranked.
- The null control (`null_control`): on a uniform grid ManifoldAdamW is AdamW with a rescaled
  lr, so tuned D and tuned C must agree within noise.
- An effect is **established** only when every check of `CHECKS` holds over its groups; otherwise the answer
  says "not established" with the reasons. The noise floor of a comparison is its own interval
  plus the tuning resolution (how far the tuned groups' losses move between their chosen value
  and its neighbours); the BF16 seed-to-seed spread is context only.
- Memory per parameter (`report_memory`): each group's bits per weight with a format from its
  runs' summaries, and per format the memory/loss frontier, with what each arm's place on it
  rests on (DESIGN §5.2: the remedies' memory beside each).
- Where a matrix quantizes layer types alone (issue 23): the sweet spot per layer type
  (`report_sweet_spot`) and where each format fails (`report_failures`, `failure_stage`); absent
  otherwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..provenance import version_label
from .compare import pairing_difference
from .matrix import layer_suffix
from .report_checks import (ARM_OWN_KEYS, CHECKS, EFFECTS, Check, Comparison, Effect, NotCompared, NullCheck,
                            NullControl, compare_formats, find_group, null_control, number_text, same_grid,
                            side_effects, uniform_grid)
from .report_failures import FailureMap, failure_map
from .report_memory import Frontier, GroupMemory, frontiers, group_memory
from .report_runs import Cell, Group, collect, role
from .report_sweeps import Protocol, Sweep, read_protocol, read_sweeps
from .report_sweet_spot import SweetSpot, has_layer_types, sweet_spot
from .stats import CONFIDENCE, Paired, mean, paired_difference, sample_sd

__all__ = ["ARM_OWN_KEYS", "CHECKS", "EFFECTS", "Analysis", "Cell", "Check", "Comparison", "Effect", "Group",
           "NotCompared",
           "NullCheck", "NullControl", "analyse", "collect", "role", "same_grid", "to_json", "uniform_grid"]

#: The per-layer step-size metrics (layer means) the report shows per group.
STEP_METRICS = ("optim/rel_update_intended", "optim/rel_update_realized", "optim/decay_applied")


@dataclass
class Analysis:
    groups: list[Group]
    baseline: Group | None
    noise_floor: float  # context only: the BF16 seed-to-seed sample standard deviation
    vs_baseline: dict[str, Paired]
    vs_arm_a: dict[str, Paired]
    comparisons: list[Comparison]  # established first, then by interaction (most negative first)
    not_compared: list[NotCompared]
    null_control: NullControl
    sweeps: dict[str, Sweep]  # group name -> its tuning
    protocol: Protocol
    step_sizes: dict[str, dict[str, Any]]  # group key -> metric -> {"mean", "n", "per_seed"}
    answer: str
    limits: str
    notes: list[str] = field(default_factory=list)
    memory: dict[str, GroupMemory] = field(default_factory=dict)  # group key -> its bits per parameter
    frontiers: list[Frontier] = field(default_factory=list)  # per format: the memory/loss frontier
    sweet_spot: SweetSpot | None = None  # per arm and layer type (only where layer types run alone)
    failures: FailureMap | None = None  # per (format, layer type, arm): the stage each loss is attributed to

    def sweep(self, group: Group) -> Sweep | None:
        return self.sweeps.get(group.name)


# ---- the answer ---------------------------------------------------------------------------------
def _data(run: Any) -> tuple[str, str]:
    """Which prepared data a run trained on and its tokenizer: the run's own record (its summary),
    else its configured folder's meta.json; a run from before the record with no configured
    folder trained on data/eurlex or the built-in corpus, which cannot be told apart now."""
    recorded = run.summary.get("data")
    if isinstance(recorded, dict) and recorded.get("dir"):
        return str(recorded["dir"]), str(recorded.get("tokenizer") or "unknown")
    data = run.config.get("data")
    if not data:
        return "data/eurlex or the built-in corpus (not recorded)", "unknown"
    meta = Path(data) / "meta.json"
    try:
        return str(data), str(json.loads(meta.read_text()).get("tokenizer") or "unknown")
    except (OSError, ValueError):
        return str(data), "unknown"


def _limits(groups: list[Group]) -> str:
    run = next((c.run for g in groups for c in g.cells if c.run is not None), None)
    if run is None:
        return ""
    config = run.config
    params = run.summary.get("params")
    size = f"{params / 1e6:.2f}M parameters, " if params else ""
    data, tokenizer = _data(run)
    seeds = sorted({c.seed for g in groups for c in g.cells})
    return (f"It holds for a {config.get('n_layer')}-layer, {config.get('n_embd')}-wide GPT ({size}block "
            f"{config.get('block_size')}), trained {config.get('max_steps')} steps on {data} ({tokenizer} tokens), "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}, per-tensor power-of-two amax scaling; a larger "
            "model, more data or longer training may rank the formats differently.")


def _interval(p: Paired) -> str:
    if p.n < 2:
        return f"{number_text(p.mean, '+.4f')} (n={p.n}, no interval)"
    return f"{p.mean:+.4f} [{p.low:+.4f}, {p.high:+.4f}] over n={p.n} seeds"


def _tuning_sentence(protocol: Protocol, sweeps: dict[str, Sweep]) -> str:
    unit = {"ulp": "grid_lr counts ULPs (ManifoldAdamW) or rungs (GridOptim) per step (unit: ulp)",
            "binade": "grid_lr is in binade units (grid_lr x 2^M ULPs or rungs per step, the same step relative "
                      "to |w| for every mantissa width)",
            "mixed": "the geometry arms use different grid_lr units (ulp and binade)"}.get(
        protocol.grid_lr_unit or "", "no geometry run says which grid_lr unit it used")
    if not sweeps:
        return f"Tuning: no group was tuned (no sweep in the manifest); {unit}."
    steps, cells = protocol.sweep_max_steps, protocol.cell_max_steps
    if protocol.horizon == "final" and (steps is None or cells is None or steps == cells):
        horizon = f"the sweeps ran at the cells' own horizon ({cells or steps} steps)"
    elif protocol.horizon in ("short", "mixed") or (steps is not None and cells is not None and steps != cells):
        shorter = {s.max_steps for s in sweeps.values() if s.max_steps is not None and s.horizon == "short"}
        n = steps if steps is not None else (min(shorter) if shorter else "?")
        horizon = f"the answer rests on a tuning horizon of {n} steps, shorter than the cells' {cells}"
    else:
        horizon = "the tuning horizon is not recorded"
    seed = f"tuning seed {protocol.tuning_seed}" if protocol.tuning_seed is not None else "tuning seed not recorded"
    budget = f"a budget of {protocol.budget} runs per tuned group" if protocol.budget is not None else \
        "no recorded tuning budget"
    legacy = "" if protocol.recorded else " (a manifest from before the tuning protocol: what it did not record " \
                                          "counts as a failed condition)"
    return f"Tuning: {unit}; {horizon}; {seed}, {budget}{legacy}."


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _by_format(items: list[tuple[Comparison, Paired]]) -> str:
    """``E5M2 (GridOptim +0.0930, ManifoldAdamW +0.1006) and E3M4 (...)``, formats in first-seen order."""
    formats: dict[str, list[str]] = {}
    for c, p in items:
        formats.setdefault(c.where, []).append(f"{c.optimizer_name} {p.mean:+.4f}")
    named = [f"{where} ({', '.join(values)})" for where, values in formats.items()]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _in_short(comparisons: list[Comparison], null: NullControl) -> str:
    """One plain sentence over the comparisons: which formats benefit, which are hurt, which are
    within noise, and where the update rule alone (on FP32 masters) is established."""
    if null.status != "passes":
        state = {"absent": "is absent", "not evaluable": "is not evaluable"}.get(null.status, null.status)
        return f"In short: nothing is established, because the null control {state}."
    won = [(c, c.interaction) for c in comparisons if c.established and c.interaction.mean < 0]
    lost = [(c, c.interaction) for c in comparisons if c.established and c.interaction.mean > 0]
    open_ = [(c, c.interaction) for c in comparisons if not c.established]
    parts = [f"{_by_format(won)} benefit{'s' if len({c.where for c, _ in won}) == 1 else ''} from geometry-aware "
             "updates (interaction)" if won else "no format benefits from geometry-aware updates beyond noise"]
    if lost:
        parts.append(f"{_by_format(lost)} {'is' if len({c.where for c, _ in lost}) == 1 else 'are'} hurt by "
                     "them: storing weights on the grid costs more under the geometry rule than under AdamW")
    if open_:
        parts.append(f"not established for {_by_format(open_)}")
    rule = [(c, c.effects["update_rule"].paired) for c in comparisons if c.effects["update_rule"].established]
    sentence = "In short: " + "; ".join(parts) + "."
    if rule:
        sentence += (f" The geometry update rule itself, on FP32 masters against arm A, is established at "
                     f"{_by_format(rule)}: that effect is the rule's, not the format's.")
    return sentence


def _answer(comparisons: list[Comparison], not_compared: list[NotCompared], null: NullControl,
            tuning: str, limits: str) -> str:
    """The answer as Markdown paragraphs: one plain sentence, the established claims (or that there
    are none), each comparison the question rests on and each effect beside it as one bullet, then
    the null control, the tuning and the limits."""
    parts = [_in_short(comparisons, null)] if comparisons else []
    established = [c for c in comparisons if c.established]
    if not comparisons:
        parts.append("No answer: no format has the four groups the question compares (the geometry optimizer "
                     "with weights stored on the grid, arm C, the same optimizer on FP32 masters, arm A).")
    for c in established:
        what = ("benefits from geometry-aware updates" if c.interaction.mean < 0
                else "is hurt by storing weights on its grid under geometry-aware updates, more than under AdamW")
        parts.append(f"{c.where} {what} ({c.optimizer_name}): the interaction (stored - C) - (masters - A) is "
                     f"{_interval(c.interaction)}, Holm-adjusted p = {c.holm_p:.3g}, beyond its interval and "
                     f"the tuning resolution {c.resolution:.4f}: established.")
    rest = [c for c in comparisons if not c.established]
    if rest:
        prefix = "Not established" if established else "Not established for any format"
        parts.append(f"{prefix}:\n\n" + _bullets([f"{c.where} {c.optimizer_name}, interaction {_interval(c.interaction)}: "
                                                   + "; ".join(c.reasons) + "." for c in rest]))
    beside = side_effects(comparisons)
    if beside:
        held = [f"{c.label(e)} {_interval(e.paired)}, Holm-adjusted p = {e.holm_p:.3g}: established"
                for c, e in beside if e.established]
        blocked = [f"{c.label(e)} {_interval(e.paired)}: not established ("
                   + ", ".join(check.name for check in e.checks if not check.ok) + ")"
                   for c, e in beside if not e.established]
        parts.append("Beside the question, under the same checks (Holm over each effect's comparisons):\n\n"
                     + _bullets([f"{text}." for text in held + blocked]))
    if not_compared:
        parts.append("Not compared (a group of the four is missing):\n\n"
                     + _bullets([f"{n.text}." for n in not_compared]))
    if null.status == "passes":
        parts.append(f"Null control (uniform grid, ManifoldAdamW stored vs C): passes ({null.summary}).")
    else:
        parts.append(f"Null control: {null.status} ({null.summary}); the protocol is suspect and no claim is "
                     "established.")
    parts.append(tuning + (f" {limits}" if limits else ""))
    return "\n\n".join(parts)


# ---- notes and step sizes -------------------------------------------------------------------------
def _unpaired(a: Group, b: Group | None, sweeps: dict[str, Sweep]) -> str | None:
    """The first setting (beyond precision policy, arm and the keys both groups tuned) in which
    two groups' runs differ."""
    first = next((c.run for c in a.cells if c.run is not None), None)
    second = next((c.run for c in b.cells if c.run is not None), None) if b is not None else None
    if first is None or second is None:
        return None
    tuned = [sweeps[g.name].tuned_keys if g.name in sweeps else set() for g in (a, b)]
    both = tuned[0] & tuned[1]
    return pairing_difference({k: v for k, v in first.config.items() if k not in both},
                              {k: v for k, v in second.config.items() if k not in both})


def code_versions(groups: list[Group]) -> list[dict[str, Any]]:
    """The code versions that produced the cells (their summaries' ``code``), most cells first."""
    found: dict[str, dict[str, Any]] = {}
    for g in groups:
        for c in g.cells:
            if c.run is None:
                continue
            code = c.run.summary.get("code")
            entry = found.setdefault(version_label(code), {"label": version_label(code), "code": code, "cells": 0})
            entry["cells"] += 1
    return sorted(found.values(), key=lambda e: -e["cells"])


def cell_count(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def _code_notes(versions: list[dict[str, Any]]) -> list[str]:
    notes = []
    if len(versions) > 1:
        notes.append(f"The cells come from {len(versions)} code versions ("
                     + "; ".join(f"{v['label']}: {cell_count(v['cells'])}" for v in versions)
                     + "): compare them only if the versions train alike.")
    dirty = sum(v["cells"] for v in versions if (v["code"] or {}).get("dirty"))
    if dirty:
        notes.append(f"{cell_count(dirty)} ran from a checkout with uncommitted changes: their commit does not say "
                     "exactly what produced them.")
    return notes


def _notes(groups: list[Group], sweeps: dict[str, Sweep]) -> list[str]:
    notes = _code_notes(code_versions(groups))
    baseline = next((g for g in groups if g.baseline and g.role == "A"), None)
    unpaired: dict[str, list[str]] = {}
    for g in groups:
        if g is not baseline and (difference := _unpaired(g, baseline, sweeps)):
            unpaired.setdefault(difference, []).append(f"{g.format} {g.arm}")
    notes += [f"Against the BF16 baseline, {', '.join(who)} differ in more than the precision policy, the arm "
              "and the keys both tuned "
              f"({difference}): their 'vs BF16' mixes the format with that setting."
              for difference, who in unpaired.items()]
    seen = set()
    for g in groups:
        for h in groups:
            if g is h or g.arm != h.arm or g.layers != h.layers or (h.key, g.key) in seen:
                continue
            seen.add((g.key, h.key))
            if g.losses() and g.losses() == h.losses():
                why = ("their grids are the same up to a power of two, which power-of-two scaling absorbs"
                       if same_grid(g.format, h.format) else "an unexpected coincidence: look into it")
                notes.append(f"{g.format} and {h.format} ({g.arm}{layer_suffix(g.layers, ', {}')})"
                             f" give bit-identical final losses on every seed: {why}.")
    edges = [f"{name} {key} = {(s.best or {}).get(key)}" for name, s in sweeps.items() if s.settled
             for key in s.keys if not s.interior.get(key, False)]
    if edges:
        notes.append("These sweeps' chosen values are not interior optima (no tried, worse neighbour on both "
                     "sides), so a wider sweep may find better values: " + "; ".join(edges) + ".")
    return notes


def _memory_notes(groups: list[Group], memory: dict[str, GroupMemory]) -> list[str]:
    disagree = [f"{g.format}{layer_suffix(g.layers, ' ({})')} {g.arm_name}: {memory[g.key].text}" for g in groups
                if memory[g.key].status == "runs disagree"]
    notes = ["The runs of a group disagree on their bits per parameter (the group is left off the memory frontier): "
             + "; ".join(disagree) + "."] if disagree else []
    unrecorded = [g for g in groups if memory[g.key].not_recorded]
    if unrecorded:
        notes.append(f"{cell_count(sum(len(memory[g.key].not_recorded) for g in unrecorded))} recorded no memory "
                     "per parameter (a summary from before the record, or none): "
                     + ", ".join(f"{g.format}{layer_suffix(g.layers, ' ({})')} {g.arm_name}" for g in unrecorded)
                     + ". Their bits are not guessed.")
    return notes


def _run_mean(run: Any, key: str) -> float:
    return mean(run.series(key)[1]) if run is not None else math.nan


def step_sizes(group: Group) -> dict[str, dict[str, Any]]:
    """Per metric of `STEP_METRICS`: the mean over the group's usable runs of each run's mean
    over its stats steps (itself a mean over layers); NaN (n/a) for runs without the metric."""
    out = {}
    for key in STEP_METRICS:
        per_seed = {c.seed: _run_mean(c.run, key) for c in group.cells if c.usable and c.run is not None}
        finite = {s: v for s, v in per_seed.items() if math.isfinite(v)}
        out[key] = {"mean": mean(list(finite.values())), "n": len(finite), "per_seed": finite}
    return out


# ---- analysing ----------------------------------------------------------------------------------
def analyse(groups: list[Group], manifest: dict[str, Any] | None = None) -> Analysis:
    """Everything the report shows, from the groups and the matrix's manifest (its sweeps and
    protocol; none: nothing was tuned)."""
    manifest = manifest or {}
    sweeps = read_sweeps(manifest, groups)
    protocol = read_protocol(manifest, groups, sweeps)
    baseline = next((g for g in groups if g.baseline and g.role == "A"), None)
    base_losses = baseline.losses() if baseline else {}
    vs_baseline = {g.key: paired_difference(g.losses(), base_losses) for g in groups if baseline and g is not baseline}
    vs_arm_a = {}
    for g in groups:
        if g.baseline:
            continue
        a = find_group(groups, g.format, g.layers, "A")
        if a is not None and a is not g:
            vs_arm_a[g.key] = paired_difference(g.losses(), a.losses())
    null = null_control(groups, sweeps)
    comparisons, not_compared = compare_formats(groups, sweeps, protocol, null)
    limits = _limits(groups)
    answer = _answer(comparisons, not_compared, null, _tuning_sentence(protocol, sweeps), limits)
    memory = {g.key: group_memory(g) for g in groups}
    spot = sweet_spot(groups, baseline, sweeps, protocol) if has_layer_types(groups) else None
    return Analysis(groups, baseline, sample_sd(list(base_losses.values())), vs_baseline, vs_arm_a, comparisons,
                    not_compared, null, sweeps, protocol, {g.key: step_sizes(g) for g in groups}, answer, limits,
                    _notes(groups, sweeps) + _memory_notes(groups, memory), memory,
                    frontiers(groups, memory, sweeps), spot, failure_map(groups, spot) if has_layer_types(groups) else None)


# ---- report.json -------------------------------------------------------------------------------
def _comparison_dict(c: Comparison) -> dict[str, Any]:
    return {"format": c.format, "layers": c.layers, "optimizer": c.optimizer, "optimizer_name": c.optimizer_name,
            "groups": {p: {"arm": g.arm, "arm_tag": g.arm_tag, "group": g.name} for p, g in c.groups.items()},
            "interaction": c.interaction.to_dict(), "holm_p": c.holm_p, "resolution": c.resolution,
            "noise_floor": c.noise_floor, "update_rule": c.update_rule.to_dict(),
            "storage_adamw": c.storage_adamw.to_dict(), "storage_geometry": c.storage_geometry.to_dict(),
            "stored_vs_control": c.stored_vs_control.to_dict(), "established": c.established,
            "reasons": c.reasons, "checks": [check.to_dict() for check in c.checks],
            "effects": {name: {**e.to_dict(), "label": c.label(e)} for name, e in c.effects.items()}}


def to_json(analysis: Analysis, runs_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report's tables with the per-seed values behind it."""
    def group_dict(g: Group) -> dict[str, Any]:
        return {"format": g.format, "arm": g.arm, "arm_tag": g.arm_tag, "role": g.role, "layers": g.layers,
                "group": g.name, "expected_failure": g.expected_failure,
                "runs": [{"folder": c.folder, "seed": c.seed, "status": c.status,
                          "final_val_loss": c.final_val_loss} for c in g.cells],
                "mean_final_val_loss": g.mean_loss(), "n_usable": len(g.losses()),
                "diverged": g.diverged, "failed": g.failed, "divergence_rate": g.divergence_rate,
                "vs_bf16": analysis.vs_baseline[g.key].to_dict() if g.key in analysis.vs_baseline else None,
                "vs_arm_a": analysis.vs_arm_a[g.key].to_dict() if g.key in analysis.vs_arm_a else None,
                "step_sizes": analysis.step_sizes.get(g.key, {}),
                "memory": analysis.memory[g.key].to_dict() if g.key in analysis.memory else None}

    null = analysis.null_control
    layer_types = {}  # only where layer types run alone: every other report.json is unchanged
    if analysis.sweet_spot is not None:
        layer_types["sweet_spot"] = analysis.sweet_spot.to_dict()
    if analysis.failures is not None:
        layer_types["failure_stages"] = analysis.failures.to_dict()
    return {"runs_dir": str(runs_dir), "matrix": manifest.get("matrix"),
            "method": f"paired by seed; mean of the per-seed differences with a {CONFIDENCE:.0%} Student-t "
                      "interval (t quantile with n-1 degrees of freedom, sample standard deviation) and a "
                      "two-sided paired t-test, Holm's step-down correction within each effect over its distinct "
                      "comparisons; "
                      "runs that diverged or ended with a non-finite loss are excluded from loss means and "
                      "counted apart",
            "checks": list(CHECKS),
            "comparisons": [_comparison_dict(c) for c in analysis.comparisons],
            "not_compared": [{"format": n.format, "layers": n.layers, "optimizer": n.optimizer,
                              "missing": list(n.missing)} for n in analysis.not_compared],
            "null_control": {"status": null.status, "summary": null.summary,
                             "checks": [{"format": n.format, "layers": n.layers, "geometry": n.geometry.name,
                                         "control": n.control.name, "difference": n.paired.to_dict(),
                                         "resolution": n.resolution, "status": n.status, "reasons": n.reasons}
                                        for n in null.checks]},
            "protocol": analysis.protocol.to_dict(),
            "tuning": [s.to_dict() for s in analysis.sweeps.values()],
            "noise_floor": {"note": "context only: a comparison's noise floor is its own interval plus the tuning "
                                    "resolution",
                            "bf16_seed_sd": analysis.noise_floor,
                            "bf16_losses": {str(k): v for k, v in (analysis.baseline.losses() if analysis.baseline
                                                                    else {}).items()}},
            "groups": [group_dict(g) for g in analysis.groups],
            "memory_frontier": [f.to_dict() for f in analysis.frontiers],
            "code_versions": code_versions(analysis.groups),
            **layer_types,
            "sweeps": manifest.get("sweeps", {}), "answer": analysis.answer, "limits": analysis.limits,
            "notes": analysis.notes}
