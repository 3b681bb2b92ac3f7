"""The layer-type sections' figures (issue 23): the sweet-spot heatmap (format x layer type, per
arm, the paired final-loss difference against BF16 with its interval and verdict) and the failure
stages (format x layer type, per arm, the stage each group's loss is attributed to)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .failure_stage import NAMES, STAGES  # noqa: E402
from .report import Analysis  # noqa: E402
from .report_plots import _save  # noqa: E402

#: Short verdict marks in the heatmap's cells.
MARKS = {"within noise": "~", "better": "better", "worse": "worse", "diverged": "diverged", "collapsed": "collapsed",
         "too few seeds": "n<2", "resolution unknown": "res.?"}
STAGE_COLOURS = {"forward": "#d62728", "backward": "#ff7f0e", "optimizer": "#1f77b4", "none": "#d9d9d9"}
#: The same stages where the group's loss does not fail: a crossing without a loss cost.
PALE_COLOURS = {"forward": "#f4b6b6", "backward": "#ffd8ad", "optimizer": "#b3cde8", "none": "#f0f0f0"}


def _panels(section):
    """(formats, columns, figure, axes): one panel per arm of a layer-type section (format x layer type)."""
    formats, columns, panels = section.formats, section.columns, len(section.arms)
    figure, axes = plt.subplots(1, panels, figsize=(1.2 + 2.3 * len(columns) * panels, 1.6 + 0.75 * len(formats)),
                                squeeze=False)
    return formats, columns, figure, axes[0]


def sweet_spot(analysis: Analysis, path: Path) -> Path | None:
    section = analysis.sweet_spot
    if section is None or not section.lines:
        return None
    formats, columns, figure, axes = _panels(section)
    values = {arm: np.full((len(formats), len(columns)), np.nan) for arm in section.arms}
    for arm in section.arms:
        for i, fmt in enumerate(formats):
            for j, layers in enumerate(columns):
                cell = section.cell(arm, layers, fmt)
                if cell is not None and not cell.fails:
                    values[arm][i, j] = cell.paired.mean
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
    bound = float(np.max(np.abs(finite))) if finite.size and np.max(np.abs(finite)) > 0 else 1.0
    for axis, arm in zip(axes, section.arms):
        image = axis.imshow(values[arm], cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        axis.set_xticks(range(len(columns)), columns)
        axis.set_yticks(range(len(formats)), formats)
        line_best = {line.layers: line.best for line in section.lines if line.arm == arm}
        for i, fmt in enumerate(formats):
            for j, layers in enumerate(columns):
                cell = section.cell(arm, layers, fmt)
                if cell is None:
                    axis.text(j, i, "-", ha="center", va="center", color="grey")
                    continue
                p = cell.paired
                text = f"{p.mean:+.4f}" if math.isfinite(p.mean) else "n/a"
                if p.n >= 2:
                    text += f"\n[{p.low:+.4f}, {p.high:+.4f}]"
                text += f"\n{MARKS.get(cell.verdict, cell.verdict)}"
                if cell.fails:
                    axis.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color="#444444"))
                    colour = "white"
                else:
                    red, green, blue, _ = image.cmap(image.norm(p.mean)) if math.isfinite(p.mean) else (1, 1, 1, 1)
                    colour = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
                axis.text(j, i, text, ha="center", va="center", fontsize="x-small", color=colour)
                if line_best.get(layers) is cell:
                    axis.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="black",
                                             linewidth=2))
        axis.set_title(f"arm {arm}: final val loss - BF16 (same seed)", fontsize="small")
        plt.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle("mean [95% interval] over paired seeds; ~ within noise; grey: fails (diverged, collapsed "
                    "or worse beyond noise); framed: the best per layer type", fontsize="small")
    return _save(figure, path)


def failure_stages(analysis: Analysis, path: Path) -> Path | None:
    failures = analysis.failures
    if failures is None or not failures.groups:
        return None
    formats, columns, figure, axes = _panels(failures)
    colours = ListedColormap([STAGE_COLOURS[name] for name in NAMES] + [PALE_COLOURS[name] for name in NAMES])
    for axis, arm in zip(axes, failures.arms):
        codes = np.full((len(formats), len(columns)), np.nan)
        for i, fmt in enumerate(formats):
            for j, layers in enumerate(columns):
                found = failures.find(fmt, layers, arm)
                if found is None or found.stage is None:
                    axis.text(j, i, "-" if found is None else "no records", ha="center", va="center",
                              fontsize="x-small", color="grey")
                    continue
                stage = found.stage
                codes[i, j] = NAMES.index(stage.stage) + (0 if found.fails else len(NAMES))
                text = stage.stage + (f"\nstep {stage.step}" if stage.step is not None else "") + \
                    f"\n{stage.counts[stage.stage]}/{stage.n} seeds"
                if found.collapses:
                    text += f"\ncollapsed {len(found.collapses)}/{stage.n}"
                text += "\nfails" if found.fails else "" if found.cost is None or stage.stage == "none" \
                    else "\nno loss cost"
                axis.text(j, i, text, ha="center", va="center", fontsize="x-small",
                          color="white" if found.fails and stage.stage != "none" else "black")
        axis.imshow(codes, cmap=colours, vmin=-0.5, vmax=2 * len(NAMES) - 0.5, aspect="auto")
        axis.set_xticks(range(len(columns)), columns)
        axis.set_yticks(range(len(formats)), formats)
        axis.set_title(f"arm {arm}: the stage whose metric crosses first", fontsize="small")
    axes[-1].legend(handles=[Patch(color=STAGE_COLOURS[n], label=f"{n}, fails") for n in STAGES]
                    + [Patch(color=PALE_COLOURS[n], label=f"{n}, no loss cost" if n != "none" else "none")
                       for n in NAMES], fontsize="x-small",
                    loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("the stage whose metric crosses first (most seeds, earliest step); dark: the group's loss "
                    "fails against BF16 there, pale: a crossing the loss did not show",
                    fontsize="small")
    return _save(figure, path)


LAYER_FIGURES = {
    "sweet_spot.png": (sweet_spot, "The sweet spot per layer type: final-loss difference against BF16, format x "
                                   "layer type, per arm"),
    "failure_stages.png": (failure_stages, "Where each format fails: the attributed stage, format x layer type, "
                                           "per arm"),
}


def write_layer_figures(analysis: Analysis, out: Path) -> dict[str, str]:
    """file name -> caption of the layer-type figures that had data (none without those sections)."""
    return {name: caption for name, (draw, caption) in LAYER_FIGURES.items()
            if draw(analysis, out / name) is not None}
