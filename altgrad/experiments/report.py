"""The report: what a matrix found, with paired intervals and a plain answer (DESIGN §5).

The runs come grouped from `report_runs` (a matrix's manifest, or a directory's run folders).

- Per (format, arm, layers) group: the final validation loss per seed, its mean over the seeds
  that completed with a finite loss, and the divergence rate (a diverged run is counted, never
  averaged into a loss);
- paired differences by seed against the BF16 baseline of the same seed and against arm A (FP32
  masters, same format and layers), each with its 95% Student-t interval and n (`stats`);
- the answer: per format, the benefit of geometry = the paired difference of each geometry arm
  (ManifoldAdamW, GridOptim) against the stochastic-rounding control (arm C) and against
  round-to-nearest (arm B); negative is better. A benefit counts only when its interval
  excludes zero and its size exceeds the noise floor, the BF16 seed-to-seed standard deviation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..quantization.formats import FormatError, get_format
from .matrix import layer_suffix
from .report_runs import Cell, Group, collect, role
from .stats import CONFIDENCE, Paired, paired_difference, sample_sd

__all__ = ["Analysis", "Benefit", "Cell", "Group", "analyse", "collect", "role", "same_grid", "to_json"]

# ---- analysing -------------------------------------------------------------------------------
@dataclass
class Benefit:
    """A geometry arm against a control arm, in one format and layer policy."""

    format: str
    layers: str
    arm: str
    control: str  # C (stochastic rounding) or B (round to nearest)
    paired: Paired

    def real(self, noise_floor: float) -> bool:
        """Beyond noise: the interval excludes zero and the size exceeds the noise floor."""
        return self.paired.excludes_zero and math.isfinite(noise_floor) and abs(self.paired.mean) > noise_floor


@dataclass
class Analysis:
    groups: list[Group]
    baseline: Group | None
    noise_floor: float  # BF16 seed-to-seed sample standard deviation of the final validation loss
    vs_baseline: dict[str, Paired]
    vs_arm_a: dict[str, Paired]
    benefits: list[Benefit]  # ranked: most negative (largest benefit) first
    answer: str
    limits: str
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the tables right


def _find(groups: list[Group], fmt: str, layers: str, wanted: str) -> Group | None:
    """The group of one role in a format and layer policy; two are an error (which to compare?)."""
    found = [g for g in groups if g.format == fmt and g.layers == layers and g.role == wanted]
    if len(found) > 1:
        raise UserError(f"{fmt}{layer_suffix(layers)}: arms "
                        f"{', '.join(g.arm for g in found)} are all arm {wanted}; the report compares one of each")
    return found[0] if found else None


#: The controls of a geometry arm, by where its weights live: an FP32-master geometry arm against
#: arm A (same storage); a format-stored one against stochastic (C) and nearest (B) rounding.
CONTROLS = {"master": ("A",), "sr": ("C", "B"), "rtn": ("B",), "mixed": ()}


def _limits(groups: list[Group]) -> str:
    run = next((c.run for g in groups for c in g.cells if c.run is not None), None)
    if run is None:
        return ""
    config = run.config
    params = run.summary.get("params")
    size = f"{params / 1e6:.2f}M parameters, " if params else ""
    data = config.get("data") or "data/eurlex"
    meta = Path(data) / "meta.json"
    tokenizer = json.loads(meta.read_text()).get("tokenizer", "?") if meta.exists() else "?"
    seeds = sorted({c.seed for g in groups for c in g.cells})
    return (f"It holds for a {config.get('n_layer')}-layer, {config.get('n_embd')}-wide GPT ({size}block "
            f"{config.get('block_size')}), trained {config.get('max_steps')} steps on {data} ({tokenizer} tokens), "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}, per-tensor power-of-two amax scaling; a larger model, more data or longer "
            "training may rank the formats differently.")


def _where(b: Benefit) -> str:
    return b.format + layer_suffix(b.layers, " ({})")


def _answer(benefits: list[Benefit], noise_floor: float) -> str:
    against_c = [b for b in benefits if b.control == "C" and math.isfinite(b.paired.mean)]
    if not against_c:
        return ("No answer yet: the matrix has no format with both a format-stored geometry arm (ManifoldAdamW or "
                "GridOptim) and the stochastic-rounding control (arm C) completed on a common seed.")
    if not math.isfinite(noise_floor) or all(b.paired.n < 2 for b in against_c):
        return ("Cannot tell yet: a difference beyond noise needs at least two paired seeds per comparison and two "
                "BF16 seeds for the noise floor; run more seeds.")
    real = [b for b in against_c if b.real(noise_floor) and b.paired.mean < 0]
    floor = f"{noise_floor:.4f}"
    worse = [b for b in against_c if b.real(noise_floor) and b.paired.mean > 0]
    hurt = (" Geometry is worse than arm C beyond noise in: " + "; ".join(
        f"{_where(b)} {b.arm} {b.paired.mean:+.4f} [{b.paired.low:+.4f}, {b.paired.high:+.4f}]" for b in worse) + ".") \
        if worse else ""
    if not real:
        best = against_c[0]
        return (f"No format benefits from geometry-aware updates beyond noise: no geometry arm's paired difference "
                f"against stochastic-rounding AdamW (arm C) is below zero with an interval that excludes zero and a "
                f"size beyond the BF16 seed-to-seed spread of {floor}. The lowest difference is {_where(best)} "
                f"{best.arm} vs C: {best.paired.mean:+.4f} [{best.paired.low:+.4f}, {best.paired.high:+.4f}] "
                f"(n={best.paired.n}).{hurt}")
    top = real[0]
    others = [b for b in real[1:] if (b.format, b.layers) != (top.format, top.layers)]
    tail = (" Also beyond noise: " + "; ".join(f"{_where(b)} {b.arm} {b.paired.mean:+.4f} [{b.paired.low:+.4f}, "
                                                f"{b.paired.high:+.4f}]" for b in others)
            + " (whether the largest benefit exceeds the next is a question for their intervals).") if others else ""
    return (f"{_where(top)} benefits most from geometry-aware updates (the largest benefit beyond noise): {top.arm} "
            f"lowers the final validation loss by {-top.paired.mean:.4f} against stochastic-rounding AdamW (arm C), "
            f"{CONFIDENCE:.0%} interval [{top.paired.low:+.4f}, {top.paired.high:+.4f}] over n={top.paired.n} "
            f"seeds, beyond the BF16 seed-to-seed spread of {floor}.{tail}{hurt}")


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


def _unpaired(a: Group, b: Group | None) -> str | None:
    """The first setting (beyond precision policy and arm) in which two groups' runs differ."""
    from .compare import pairing_difference

    first = next((c.run for c in a.cells if c.run is not None), None)
    second = next((c.run for c in b.cells if c.run is not None), None) if b is not None else None
    if first is None or second is None:
        return None
    return pairing_difference(first.config, second.config)


def _grouped(found: dict[str, list[str]], sentence: str) -> list[str]:
    """One note per difference: ``sentence`` with {difference} and {who} filled in."""
    return [sentence.format(difference=difference, who=", ".join(who)) for difference, who in found.items()]


def _notes(groups: list[Group], sweeps: dict[str, Any], benefits: list[Benefit]) -> list[str]:
    notes = []
    baseline = next((g for g in groups if g.baseline and g.role == "A"), None)
    unpaired: dict[str, list[str]] = {}
    for g in groups:
        if g is not baseline and (difference := _unpaired(g, baseline)):
            unpaired.setdefault(difference, []).append(f"{g.format} {g.arm}")
    notes += _grouped(unpaired, "Against the BF16 baseline, {who} differ in more than the precision policy and the "
                                "arm ({difference}): their 'vs BF16' mixes the format with that setting.")
    controls: dict[str, list[str]] = {}
    for b in benefits:
        geometry = next(g for g in groups if (g.format, g.layers, g.arm) == (b.format, b.layers, b.arm))
        control = _find(groups, b.format, b.layers, b.control)
        if difference := _unpaired(geometry, control):
            controls.setdefault(difference, []).append(f"{_where(b)} {b.arm} vs {control.arm}")
    notes += _grouped(controls, "Geometry arm and control differ in more than the update rule ({difference}) in: "
                                "{who}. Typically the learning rate of the parameters without a format (norms, "
                                "biases, position embedding), which the control's lr sweep set for all of its "
                                "parameters.")
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
    edges = []
    for group, sweep in sweeps.items():
        try:
            values = [float(v) for v in sweep.get("losses", {})]
        except ValueError:  # a sweep of a setting that is not a number: no edges
            continue
        if sweep.get("best") is not None and values and sweep["best"] in (min(values), max(values)):
            edges.append(f"{group} {sweep['key']} = {sweep['best']}")
    if edges:
        notes.append("These sweeps chose the edge of the values they tried, so a wider sweep may find better values: "
                     + "; ".join(edges) + ".")
    return notes


def analyse(groups: list[Group], sweeps: dict[str, Any] | None = None) -> Analysis:
    baseline = next((g for g in groups if g.baseline and g.role == "A"), None)
    base_losses = baseline.losses() if baseline else {}
    noise_floor = sample_sd(list(base_losses.values()))
    vs_baseline = {g.key: paired_difference(g.losses(), base_losses) for g in groups if baseline and g is not baseline}
    vs_arm_a = {}
    benefits = []
    for g in groups:
        if g.baseline:
            continue
        a = _find(groups, g.format, g.layers, "A")
        if a is not None and a is not g:
            vs_arm_a[g.key] = paired_difference(g.losses(), a.losses())
        if g.role == "geometry":
            for control in CONTROLS.get(g.arm_tag.rsplit("-", 1)[-1], ()):
                other = _find(groups, g.format, g.layers, control)
                if other is not None:
                    benefits.append(Benefit(g.format, g.layers, g.arm, control,
                                            paired_difference(g.losses(), other.losses())))
    order = {"C": 0, "B": 1, "A": 2}  # the answer's control first
    benefits.sort(key=lambda b: (order[b.control], b.paired.mean if math.isfinite(b.paired.mean) else math.inf))
    return Analysis(groups, baseline, noise_floor, vs_baseline, vs_arm_a, benefits,
                    _answer(benefits, noise_floor), _limits(groups), _notes(groups, sweeps or {}, benefits))


# ---- report.json -------------------------------------------------------------------------------
def to_json(analysis: Analysis, runs_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report's tables with the per-seed values behind it."""
    def group_dict(g: Group) -> dict[str, Any]:
        return {"format": g.format, "arm": g.arm, "arm_tag": g.arm_tag, "layers": g.layers,
                "expected_failure": g.expected_failure,
                "runs": [{"folder": c.folder, "seed": c.seed, "status": c.status,
                          "final_val_loss": c.final_val_loss} for c in g.cells],
                "mean_final_val_loss": g.mean_loss(), "n_usable": len(g.losses()),
                "diverged": g.diverged, "failed": g.failed, "divergence_rate": g.divergence_rate,
                "vs_bf16": analysis.vs_baseline[g.key].to_dict() if g.key in analysis.vs_baseline else None,
                "vs_arm_a": analysis.vs_arm_a[g.key].to_dict() if g.key in analysis.vs_arm_a else None}

    return {"runs_dir": str(runs_dir), "matrix": manifest.get("matrix"),
            "method": f"paired by seed; mean of the per-seed differences with a {CONFIDENCE:.0%} Student-t "
                      "interval (t quantile with n-1 degrees of freedom, sample standard deviation); runs that "
                      "diverged or ended with a non-finite loss are excluded from loss means and counted apart",
            "noise_floor": {"bf16_seed_sd": analysis.noise_floor,
                            "bf16_losses": {str(k): v for k, v in (analysis.baseline.losses() if analysis.baseline
                                                                    else {}).items()}},
            "groups": [group_dict(g) for g in analysis.groups],
            "geometry_benefit": [{"format": b.format, "layers": b.layers, "arm": b.arm, "control": b.control,
                                  "beyond_noise": b.real(analysis.noise_floor), **b.paired.to_dict()}
                                 for b in analysis.benefits],
            "sweeps": manifest.get("sweeps", {}), "answer": analysis.answer, "limits": analysis.limits,
            "notes": analysis.notes}
