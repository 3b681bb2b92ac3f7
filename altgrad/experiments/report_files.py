"""Writing the report: report.md, report.json and the figures in one folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import write_json, write_text
from .matrix import layer_suffix
from .report import CHECKS, STEP_METRICS, Analysis, analyse, cell_count, collect, to_json
from .report_checks import side_effects
from .report_memory import SAME_BITS
from ..optim.memory import PARTS as MEMORY_PARTS
from . import report_failures, report_sweet_spot
from .report_layer_plots import LAYER_FIGURES, write_layer_figures
from .report_plots import run_stall_ratio, write_figures
from .scale import Estimate, Spent, read_estimate, spent
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


def _value(value) -> str:
    return "n/a" if value is None else str(value)


def tuning_rows(analysis: Analysis) -> list[dict[str, str]]:
    """One row per tuned group, as the report's and the CLI's tuning tables show it."""
    rows = []
    for name, sweep in analysis.sweeps.items():
        keys = list(sweep.keys)
        inherited = "; ".join(f"{k} = {v.get('value')} from {v.get('group') or v.get('from')}"
                              + ("" if v.get("interior") else " (not interior there)")
                              for k, v in sweep.inherited.items())
        budget = f"{_value(sweep.spent)} / {_value(sweep.budget)}"
        if sweep.hit_budget:
            budget += " (hit the cap before interior)"
        rows.append({
            "group": name, "keys": ", ".join(keys) or "-",
            "tried": "; ".join(f"{k}: " + ", ".join(str(v) for v in sweep.tried(k)) for k in keys) or "-",
            "chosen": ", ".join(f"{k} = {v}" for k, v in (sweep.best or {}).items()) or "none",
            "interior": ", ".join(f"{k} {'yes' if sweep.interior.get(k) else 'no'}" for k in keys) or "-",
            "budget": budget,
            "stopped": (sweep.stopped or ("not recorded" if sweep.legacy else "-")) if keys else "nothing to tune",
            "horizon": f"{sweep.horizon or 'unknown'} ({_value(sweep.max_steps)} steps)",
            "seed": _value(sweep.seed), "resolution": _f(sweep.resolution), "inherited": inherited or "-"})
    return rows


def step_rows(analysis: Analysis) -> list[tuple[str, str, str, list[str]]]:
    """(where, arm, tag, [intended, realized, decay applied]) per non-baseline group."""
    rows = []
    for g in analysis.groups:
        values = analysis.step_sizes.get(g.key, {})
        cells = []
        for key in STEP_METRICS:
            v = values.get(key, {})
            cells.append(f"{_f(v.get('mean', math.nan), '.3g')} (n={v.get('n', 0)})" if v.get("n") else "n/a")
        rows.append((g.format + layer_suffix(g.layers, " ({})"), g.arm, g.arm_tag, cells))
    return rows


def render(analysis: Analysis, figures: dict[str, str], data: dict[str, Any]) -> str:
    lines = ["# Which FP8 format benefits most from geometry-aware weight updates?", ""]
    if data.get("matrix"):
        run = next((c.run for g in analysis.groups for c in g.cells if c.run is not None), None)
        on = f" --data {run.config['data']}" if run is not None and run.config.get("data") else ""
        lines += [f"Matrix `{data['matrix']}`, runs in `{data['runs_dir']}`. Reproduce with "
                  f"`altgrad matrix run {data['matrix']}{on} --jobs 2`, then "
                  f"`altgrad report {data['runs_dir']} --out DIR`.", ""]
    lines += ["## Answer", "", analysis.answer, ""]
    if analysis.notes:
        lines += ["Notes:", "", *[f"- {note}" for note in analysis.notes], ""]
    base = data["noise_floor"]
    lines += ["## Method", "", data["method"] + ". Negative differences are lower (better) losses. The question "
              "is answered on the interaction (geometry stored - C) - (geometry on masters - A), per format and "
              "geometry optimizer, paired by seed (DESIGN 5.2). A comparison is established only when every "
              "check holds: " + ", ".join(f"`{c}`" for c in CHECKS) + ". Its noise floor is its own interval "
              "plus the tuning resolution (the largest, over its four groups, of the smaller loss gap between a "
              "group's chosen value and its tried neighbours). For context only, the BF16 seed-to-seed standard "
              f"deviation of the final validation loss is {_f(analysis.noise_floor)} (per seed: "
              + (", ".join(f"{k}: {_f(v)}" for k, v in base["bf16_losses"].items()) or "none") + ").", "",
              "Code: " + ("; ".join(f"{v['label']} ({cell_count(v['cells'])})" for v in data["code_versions"])
                          or "no cell recorded") + ".", ""]
    if analysis.sweet_spot is not None:
        lines += report_sweet_spot.lines_md(analysis.sweet_spot,
                                            "sweet_spot.png" if "sweet_spot.png" in figures else None)
    if analysis.failures is not None:
        lines += report_failures.lines_md(analysis.failures,
                                          "failure_stages.png" if "failure_stages.png" in figures else None)
    lines += ["## The question: the format-specific benefit of geometry", "",
              f"Interaction (gs - C) - (gm - A) with its {CONFIDENCE:.0%} interval, Holm-adjusted p, the tuning "
              "resolution; beside it the update-rule effect on masters (gm - A) and the storage effects (C - A, "
              "gs - gm). gs: the geometry optimizer with weights stored on the grid; gm: the same on FP32 masters.",
              "", "| format | geometry optimizer | interaction [interval] | Holm p | resolution | update rule gm - A | "
              "storage C - A | storage gs - gm | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in analysis.comparisons:
        lines.append(f"| {c.where} | {c.optimizer_name} ({c.groups['gs'].arm}, {c.groups['gm'].arm}) | "
                     f"{interval(c.interaction)} | {_f(c.holm_p, '.3g')} | {_f(c.resolution)} | "
                     f"{interval(c.update_rule)} | {interval(c.storage_adamw)} | {interval(c.storage_geometry)} | "
                     f"{'established' if c.established else 'not established'} |")
    if not analysis.comparisons:
        lines.append("| - | - | no format has all four groups | - | - | - | - | - | - |")
    blocked = [c for c in analysis.comparisons if not c.established]
    if blocked:
        lines += ["", "Why not established:", ""]
        for c in blocked:
            lines.append(f"- {c.where} {c.optimizer_name}: " + "; ".join(
                f"`{check.name}`: {check.detail}" for check in c.checks if not check.ok))
    beside = side_effects(analysis.comparisons)
    if beside:
        lines += ["", "### Beside it: the update rule, the storage effects and the remedies", "",
                  "Each a claim of its own, under the same checks over the groups it involves; Holm-adjusted "
                  "within each effect over its distinct comparisons (C - A once per format). Where a format has "
                  "them, the stored geometry arm against the non-geometric remedies it must beat (DESIGN 5.2): "
                  "error feedback (gs - ECO) and compensated storage (gs - C-kahan).", "",
                  "| effect | what it measures | difference [interval] | Holm p | resolution | verdict |",
                  "|---|---|---|---|---|---|"]
        for c, e in beside:
            lines.append(f"| {c.label(e)} | {e.meaning} | {interval(e.paired)} | {_f(e.holm_p, '.3g')} | "
                         f"{_f(e.resolution)} | {'established' if e.established else 'not established'} |")
        blocked = [(c, e) for c, e in beside if not e.established]
        if blocked:
            lines += ["", "Why not established:", ""]
            lines += [f"- {c.label(e)}: " + "; ".join(f"`{check.name}`: {check.detail}"
                                                      for check in e.checks if not check.ok) for c, e in blocked]
    if analysis.not_compared:
        lines += ["", "Not compared (a group of the four is missing; never ranked): "
                  + "; ".join(n.text for n in analysis.not_compared) + "."]
    null = analysis.null_control
    lines += ["", "## Null control", "",
              "On a uniform grid (E0M7, E1M6) ManifoldAdamW is AdamW with a rescaled lr: tuned D (ManifoldAdamW "
              "stored) and tuned C must agree within the interval of D - C plus the tuning resolution, with "
              f"interior optima. Result: **{null.status}** ({null.summary}).", ""]
    if null.checks:
        lines += ["| format | D - C [interval] | resolution | result | why |", "|---|---|---|---|---|"]
        for n in null.checks:
            lines.append(f"| {n.where} | {interval(n.paired)} | {_f(n.resolution)} | {n.status} | "
                         f"{'; '.join(n.reasons) or '-'} |")
    lines += _memory_lines(analysis)
    lines += ["", "## Tuning", "", _protocol_line(analysis), ""]
    rows = tuning_rows(analysis)
    if rows:
        lines += ["| group | tuned keys | values tried (in order) | chosen | interior | runs / budget | stopped | "
                  "horizon | seed | resolution | inherited |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join(r[k] for k in ("group", "keys", "tried", "chosen", "interior", "budget",
                                                          "stopped", "horizon", "seed", "resolution", "inherited"))
                         + " |")
    else:
        lines.append("No group was tuned.")
    lines += ["", "## Step sizes", "",
              "Per group, the mean over seeds of each run's mean over its stats steps (a mean over layers): the "
              "intended relative update RMS(step)/RMS(w) before the step lands on the grid, the realized one "
              "(the change of the on-grid weight), and the fraction of the intended weight decay that landed. "
              "n/a: runs from before these were measured.", "",
              "| format | arm | tag | intended | realized | decay applied |", "|---|---|---|---|---|---|"]
    for where, arm, tag, cells in step_rows(analysis):
        lines.append(f"| {where} | {arm} | {tag} | " + " | ".join(cells) + " |")
    lines += ["", "## Every cell", "",
              "Final validation loss: mean over the seeds that completed with a finite loss; differences paired "
              "by seed.", "",
              "| format | arm | tag | final val loss | vs BF16 | vs arm A | stall ratio | bits / param | diverged | "
              "note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in analysis.groups:
        note = f"expected failure: {g.expected_failure}" if g.expected_failure else ""
        if g.failed:
            note = (note + "; " if note else "") + f"{g.failed} run(s) failed or incomplete"
        memory = analysis.memory[g.key].short if g.key in analysis.memory else "not recorded"
        lines.append(f"| {g.format}{layer_suffix(g.layers, ' ({})')} | {g.arm_name} | {g.arm_tag} | "
                     f"{_f(g.mean_loss())} (n={len(g.losses())}) | {interval(analysis.vs_baseline.get(g.key))} | "
                     f"{interval(analysis.vs_arm_a.get(g.key))} | {_f(run_stall_ratio(g), '.3f')} | {memory} | "
                     f"{g.diverged}/{len(g.cells)} | {note} |")
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
    lines += ["", "## Compute", "", Spent(**{k: v for k, v in data["compute"].items() if k != "runs"}).text]
    lines += ["", "## What a larger scale would need", ""]
    if data.get("scale"):
        lines += Estimate.from_dict(data["scale"]).lines_md()
    else:
        lines.append("No estimate given (`altgrad matrix estimate configs/matrix/paper.yaml --out FILE` on the "
                     "target device, then `altgrad report ... --scale FILE`).")
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        if name not in LAYER_FIGURES:  # those are in their own sections
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    lines += ["Every number above, with the per-seed values behind it, is in `report.json`."]
    return "\n".join(lines) + "\n"


def _memory_lines(analysis: Analysis) -> list[str]:
    """The memory section: each group's bits per parameter (from its runs' summaries) and, per
    format, the arms on the memory/loss frontier with what each place rests on."""
    lines = ["", "## Memory per parameter", "",
             "Bits per weight with a format of the persistent training state (the weight as stored, FP32 "
             "masters, optimizer moments, compensation buffers, the scalars amortised: `altgrad/optim/memory.py`), "
             "from each run's summary; runs from before the record say \"not recorded\". An arm is on the "
             "memory/loss frontier of its format when no other arm has fewer or equal bits (within "
             f"{SAME_BITS:g} bit) and a lower mean final loss. Each arm's place rests on its paired difference "
             "by seed against the arm with the lowest mean loss among the others with fewer or equal bits, "
             f"with its {CONFIDENCE:.0%} interval and the two groups' tuning resolution (descriptive: no Holm "
             "correction).", "",
             "| format | arm | tag | bits / param | stored | master | moments | compensation | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in analysis.groups:
        record = analysis.memory.get(g.key)
        if record is None:
            continue
        bits = record.bits or {}
        parts = [_f(bits[part], ".4g") if bits else "-" for part in MEMORY_PARTS]
        total = record.short if record.status == "recorded" else record.text
        lines.append(f"| {g.format}{layer_suffix(g.layers, ' ({})')} | {g.arm_name} | {g.arm_tag} | {total} | "
                     + " | ".join(parts) + " |")
    lines.append("")
    if analysis.frontiers:
        for found in analysis.frontiers:
            lines += [f"- {found.summary}", *(f"  - {claim}" for claim in found.claims)]
    else:
        lines.append("No group recorded its memory per parameter: no frontier.")
    return lines


def _protocol_line(analysis: Analysis) -> str:
    p = analysis.protocol
    if not p.recorded:
        return ("The manifest predates the tuning protocol: horizon, interior optima and resolution are derived "
                "from its sweeps; budget, stop reasons and inheritance were not recorded and count as failed "
                "conditions.")
    return (f"Protocol: tuning seed {_value(p.tuning_seed)}, evaluation seeds {', '.join(map(str, p.eval_seeds))}; "
            f"budget {_value(p.budget)} runs per tuned group; horizon {_value(p.horizon)} (sweeps "
            f"{_value(p.sweep_max_steps)} steps, cells {_value(p.cell_max_steps)}); max_extensions "
            f"{_value(p.max_extensions)}, refine {_value(p.refine)}, rounds {_value(p.rounds)}; grid_lr unit "
            f"{_value(p.grid_lr_unit)}.")


def write_report(source: Path, out: Path, scale: Path | None = None) -> tuple[Analysis, dict[str, Path]]:
    """Collect, analyse, draw and write; returns the analysis and the written files. ``scale``: an
    `altgrad matrix estimate` JSON for the section on what a larger matrix would need."""
    runs_dir, groups, manifest = collect(source)
    estimate = read_estimate(scale) if scale is not None else None
    analysis = analyse(groups, manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {**write_figures(analysis, out), **write_layer_figures(analysis, out)}
    data = {**to_json(analysis, runs_dir, manifest), "compute": spent(manifest).to_dict(),
            "scale": estimate.to_dict() if estimate is not None else None}
    write_json(out / "report.json", data)
    write_text(out / "report.md", render(analysis, figures, data))
    return analysis, {"report.md": out / "report.md", "report.json": out / "report.json",
                      **{name: out / name for name in figures}}
