"""Writing the report: report.md, report.json and the figures in one folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import write_json, write_text
from .matrix import layer_suffix
from .report import Analysis, analyse, collect, to_json
from .report_plots import run_stall_ratio, write_figures
from .stats import CONFIDENCE, Paired


def _f(value: float, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def interval(p: Paired | None) -> str:
    """``+0.0123 [-0.0040, +0.0286] n=3``; a single pair has no interval."""
    if p is None or p.n == 0:
        return "-"
    if p.n < 2:
        return f"{_f(p.mean, '+.4f')} (n=1, no interval)"
    return f"{_f(p.mean, '+.4f')} [{_f(p.low, '+.4f')}, {_f(p.high, '+.4f')}] n={p.n}"


def render(analysis: Analysis, figures: dict[str, str], data: dict[str, Any]) -> str:
    lines = ["# Which FP8 format benefits most from geometry-aware weight updates?", ""]
    if data.get("matrix"):
        run = next((c.run for g in analysis.groups for c in g.cells if c.run is not None), None)
        on = f" --data {run.config['data']}" if run is not None and run.config.get("data") else ""
        lines += [f"Matrix `{data['matrix']}`, runs in `{data['runs_dir']}`. Reproduce with "
                  f"`altgrad matrix run {data['matrix']}{on} --jobs 2`, then "
                  f"`altgrad report {data['runs_dir']} --out DIR`.", ""]
    lines += ["## Answer", "", analysis.answer, "", analysis.limits, ""]
    if analysis.notes:
        lines += ["Notes:", "", *[f"- {note}" for note in analysis.notes], ""]
    lines += ["## Method", "", data["method"] + ". Negative differences are lower (better) losses. A geometry "
              "benefit counts as real only when its interval excludes zero and its size exceeds the noise floor, "
              "the BF16 seed-to-seed standard deviation of the final validation loss "
              f"({_f(analysis.noise_floor)}; per seed: "
              + ", ".join(f"{k}: {_f(v)}" for k, v in data["noise_floor"]["bf16_losses"].items()) + ").", ""]
    lines += ["## Geometry benefit", "",
              "Paired difference of each geometry arm against the stochastic-rounding control (C) and against "
              f"round-to-nearest (B), same format and seed; {CONFIDENCE:.0%} interval.", "",
              "| format | geometry arm | vs | difference [interval] | beyond noise |", "|---|---|---|---|---|"]
    for b in analysis.benefits:
        lines.append(f"| {b.format}{layer_suffix(b.layers, ' ({})')} | {b.arm} | {b.control} | {interval(b.paired)} | "
                     f"{'yes' if b.real(analysis.noise_floor) else 'no'} |")
    if not analysis.benefits:
        lines.append("| - | - | - | no format has a geometry arm and a control | - |")
    lines += ["", "## Every cell", "",
              "Final validation loss: mean over the seeds that completed with a finite loss; differences paired "
              "by seed.", "",
              "| format | arm | tag | final val loss | vs BF16 | vs arm A | stall ratio | diverged | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for g in analysis.groups:
        note = f"expected failure: {g.expected_failure}" if g.expected_failure else ""
        if g.failed:
            note = (note + "; " if note else "") + f"{g.failed} run(s) failed or incomplete"
        lines.append(f"| {g.format}{layer_suffix(g.layers, ' ({})')} | {g.arm} | {g.arm_tag} | {_f(g.mean_loss())} "
                     f"(n={len(g.losses())}) | {interval(analysis.vs_baseline.get(g.key))} | "
                     f"{interval(analysis.vs_arm_a.get(g.key))} | {_f(run_stall_ratio(g), '.3f')} | "
                     f"{g.diverged}/{len(g.cells)} | {note} |")
    sweeps = data.get("sweeps") or {}
    if sweeps:
        lines += ["", "## Learning-rate sweeps", "",
                  "One seed, shorter runs; the value with the lowest final validation loss is used for all seeds.", "",
                  "| group | key | seed | steps | final val loss per value | chosen |", "|---|---|---|---|---|---|"]
        for group, sweep in sweeps.items():
            losses = ", ".join(f"{v}: {_f(loss) if loss is not None else 'n/a'}" for v, loss in sweep["losses"].items())
            lines.append(f"| {group} | {sweep['key']} | {sweep.get('seed')} | {sweep.get('max_steps')} | {losses} | "
                         f"{sweep.get('best')} |")
    collapsed = [(g, c) for g in analysis.groups for c in g.cells
                 if c.run is not None and c.run.summary.get("collapse")]
    lines += ["", "## Failures", ""]
    if collapsed:
        for g, c in collapsed:
            collapse = c.run.summary["collapse"]
            lines.append(f"- {g.format} {g.arm} seed {c.seed}: collapse at step {collapse['step']} "
                         f"({collapse['reason']})")
    else:
        lines.append("No run collapsed (validation loss above its step-0 value) or diverged.")
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    lines += ["Every number above, with the per-seed values behind it, is in `report.json`."]
    return "\n".join(lines) + "\n"


def write_report(source: Path, out: Path) -> tuple[Analysis, dict[str, Path]]:
    """Collect, analyse, draw and write; returns the analysis and the written files."""
    runs_dir, groups, manifest = collect(source)
    analysis = analyse(groups, manifest.get("sweeps"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(analysis, out)
    data = to_json(analysis, runs_dir, manifest)
    write_json(out / "report.json", data)
    write_text(out / "report.md", render(analysis, figures, data))
    return analysis, {"report.md": out / "report.md", "report.json": out / "report.json",
                      **{name: out / name for name in figures}}
