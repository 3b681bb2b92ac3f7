"""The report's figures (matplotlib, headless, written atomically as PNG)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from ..io import atomic_write  # noqa: E402
from .compare import rank_ratio  # noqa: E402
from .matrix import layer_suffix  # noqa: E402
from .report import Analysis, Group  # noqa: E402
from .report_memory import SAME_BITS  # noqa: E402
from .stats import mean  # noqa: E402


def _label(axis, title: str, xlabel: str, ylabel: str) -> None:
    """A panel's title, axis labels, grid and legend, as every figure here draws them."""
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="x-small")


def _hide_unused(axes, used: int) -> None:
    """Hide the grid's panels past the ``used`` ones."""
    for axis in list(axes.flat)[used:]:
        axis.set_visible(False)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    plt.close(figure)
    return path


def _panels(groups: list[Group]) -> list[tuple[str, str]]:
    """(format, layers) of the non-baseline groups, in matrix order."""
    return list(dict.fromkeys((g.format, g.layers) for g in groups if not g.baseline))


def _curve(group: Group, key: str) -> tuple[list[int], np.ndarray]:
    """Steps and a (seeds x steps) array of one metric over the group's usable runs (NaN where missing)."""
    series = [c.run.series(key) for c in group.cells if c.usable and c.run is not None]
    steps = sorted({s for steps, _ in series for s in steps})
    table = np.full((len(series), len(steps)), np.nan)
    index = {s: i for i, s in enumerate(steps)}
    for row, (run_steps, values) in enumerate(series):
        for s, v in zip(run_steps, values):
            table[row, index[s]] = v
    return steps, table


def _grid(n: int) -> tuple[int, int]:
    columns = min(3, n)
    return -(-n // columns), columns


def loss_curves(analysis: Analysis, path: Path) -> Path | None:
    panels = _panels(analysis.groups)
    if not panels:
        return None
    rows, columns = _grid(len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    arms = list(dict.fromkeys(g.arm for g in analysis.groups if not g.baseline))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    base_steps, base_mean = [], []  # the baseline's mean curve, the same in every panel
    if analysis.baseline is not None:
        base_steps, table = _curve(analysis.baseline, "val_loss")
        base_mean = np.nanmean(table, 0) if len(base_steps) else []
    for axis, (fmt, layers) in zip(axes.flat, panels):
        late: list[float] = []  # values after the first quarter of training set the y-range
        if len(base_steps):
            axis.plot(base_steps, base_mean, "k--", linewidth=1, label=f"{analysis.baseline.format} (mean)")
            late += [v for s, v in zip(base_steps, base_mean) if s >= base_steps[-1] / 4 and math.isfinite(v)]
        for g in analysis.groups:
            if (g.format, g.layers) != (fmt, layers):
                continue
            steps, table = _curve(g, "val_loss")
            if not len(steps):
                continue
            axis.plot(steps, np.nanmean(table, 0), color=colors[g.arm], label=f"{g.arm} ({g.arm_tag})")
            axis.fill_between(steps, np.nanmin(table, 0), np.nanmax(table, 0), color=colors[g.arm], alpha=0.2)
            quarter = [i for i, s in enumerate(steps) if s >= steps[-1] / 4]
            late += [v for v in table[:, quarter].ravel() if math.isfinite(v)]
        if late:
            low, high = min(late), max(late)
            axis.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
        _label(axis, fmt + layer_suffix(layers, " ({})"), "step", "validation loss")
    _hide_unused(axes, len(panels))
    figure.suptitle("validation loss: mean over seeds, band = min..max over seeds", fontsize="small")
    figure.subplots_adjust(top=0.85)
    return _save(figure, path)


def run_stall_ratio(group: Group) -> float:
    """Mean over the group's usable runs of each run's stall ratio (a mean over its layers)."""
    values = []
    for c in group.cells:
        if not c.usable or c.run is None:
            continue
        layers = [v.get("stall_ratio") for v in c.run.summary.get("layers", {}).values()]
        layers = [float(v) for v in layers if isinstance(v, (int, float)) and math.isfinite(v)]
        if layers:
            values.append(mean(layers))
    return mean(values)


def _heatmap(axis, rows: list[str], columns: list[str], values: np.ndarray, title: str, fmt: str,
             cmap: str, center: bool) -> None:
    finite = values[np.isfinite(values)]
    if center and finite.size:
        bound = float(np.max(np.abs(finite))) or 1.0
        image = axis.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = axis.imshow(values, cmap=cmap, aspect="auto")
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = values[i, j]
            if not math.isfinite(value):
                axis.text(j, i, "n/a", ha="center", va="center", fontsize="small", color="grey")
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # white text on dark cells
            axis.text(j, i, format(value, fmt), ha="center", va="center", fontsize="small",
                      color="white" if dark else "black")
    axis.set_title(title, fontsize="small")
    plt.colorbar(image, ax=axis, fraction=0.046)


def heatmaps(analysis: Analysis, path: Path) -> Path | None:
    panels = _panels(analysis.groups)
    arms = list(dict.fromkeys(g.arm for g in analysis.groups if not g.baseline))
    if not panels or not arms:
        return None
    rows = [fmt + layer_suffix(layers) for fmt, layers in panels]
    stall = np.full((len(panels), len(arms)), np.nan)
    delta = np.full((len(panels), len(arms)), np.nan)
    for g in analysis.groups:
        if g.baseline:
            continue
        i, j = panels.index((g.format, g.layers)), arms.index(g.arm)
        stall[i, j] = run_stall_ratio(g)
        if g.key in analysis.vs_baseline:
            delta[i, j] = analysis.vs_baseline[g.key].mean
    # one above the other: with ten arms side by side the two panels made a figure too wide to read
    figure, axes = plt.subplots(2, 1, figsize=(3 + 0.95 * len(arms), 2 * max(2.6, 1.2 + 0.5 * len(rows))))
    _heatmap(axes[0], rows, arms, stall, "stall ratio (1 - flips/updates), mean over layers and seeds", ".3f",
             "viridis", center=False)
    _heatmap(axes[1], rows, arms, delta, "final val loss - BF16 (same seed), mean over seeds", "+.3f",
             "RdBu_r", center=True)
    return _save(figure, path)


def flips_updates(analysis: Analysis, path: Path) -> Path | None:
    curves = {(g.key, key): _curve(g, key) for g in analysis.groups for key in ("optim/flip_rate", "optim/update_rate")}
    panels = [(fmt, layers) for fmt, layers in _panels(analysis.groups)
              if any(len(curves[g.key, "optim/flip_rate"][0]) for g in analysis.groups
                     if (g.format, g.layers) == (fmt, layers))]
    if not panels:
        return None
    figure, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 6.4), squeeze=False)
    arms = list(dict.fromkeys(g.arm for g in analysis.groups if not g.baseline))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for column, (fmt, layers) in enumerate(panels):
        for row, (key, label) in enumerate((("optim/flip_rate", "flip rate"), ("optim/update_rate", "update rate"))):
            axis = axes[row, column]
            for g in analysis.groups:
                if (g.format, g.layers) != (fmt, layers):
                    continue
                steps, table = curves[g.key, key]
                if len(steps):
                    axis.plot(steps, np.nanmean(table, 0), color=colors[g.arm], label=g.arm, linewidth=1)
            if key == "optim/flip_rate":
                axis.set_yscale("log")
            else:
                axis.set_ylim(0, 1.05)  # a rate: near 1 means almost every weight had a gradient
            axis.set_title(f"{fmt}{layer_suffix(layers)}: {label}", fontsize="small")
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize="x-small")
    figure.suptitle("flips (on-grid value changed) and updates (non-zero gradient)\n"
                    "per element, mean over layers and seeds", fontsize="small")
    return _save(figure, path)


def rank_vs_bf16(analysis: Analysis, path: Path) -> Path | None:
    if analysis.baseline is None:
        return None
    reference = {c.seed: c.run for c in analysis.baseline.cells if c.run is not None}
    labels, means, points = [], [], []
    for g in analysis.groups:
        if g.baseline:
            continue
        ratios = [rank_ratio(c.run, reference[c.seed]) for c in g.cells
                  if c.usable and c.run is not None and c.seed in reference]
        ratios = [r for r in ratios if r is not None]
        if ratios:
            labels.append(f"{g.format} {g.arm}" + layer_suffix(g.layers))
            means.append(mean(ratios))
            points.append(ratios)
    if not labels:
        return None
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 3.8))
    axis.bar(range(len(labels)), means, color="C0", alpha=0.6)
    for i, values in enumerate(points):
        axis.plot([i] * len(values), values, "k.", markersize=4)
    axis.axhline(1.0, color="k", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    axis.set_ylabel("effective rank / BF16 (same seed)")
    axis.set_title("rank relative to BF16 at the last measurement, mean over layers (dots: seeds)", fontsize="small")
    return _save(figure, path)


def collapse_steps(analysis: Analysis, path: Path) -> Path | None:
    rows = []
    for g in analysis.groups:
        for c in g.cells:
            collapse = c.run.summary.get("collapse") if c.run is not None else None
            if collapse:
                rows.append((f"{g.format} {g.arm}", c.seed, collapse["step"]))
    if not rows:
        return None
    labels = list(dict.fromkeys(label for label, _, _ in rows))
    figure, axis = plt.subplots(figsize=(6, 1 + 0.4 * len(labels)))
    for label, seed, step in rows:
        axis.plot(step, labels.index(label), "o", label=f"seed {seed}")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("collapse step (validation loss above step 0, or diverged)")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def memory_frontier(analysis: Analysis, path: Path) -> Path | None:
    """Per format: final validation loss (mean over seeds, bar: its 95% t-interval) against the
    bits per weight with a format, one point per arm, the line through the arms on the frontier
    (report_memory: non-dominated by mean loss)."""
    panels = [f for f in analysis.frontiers if f.points]
    if not panels:
        return None
    rows, columns = _grid(len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    names = list(dict.fromkeys(p.name for f in panels for p in f.points))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    base = analysis.baseline.mean_loss() if analysis.baseline is not None else math.nan
    for axis, found in zip(axes.flat, panels):
        span = max(p.bits for p in found.points) - min(p.bits for p in found.points)
        step = 0.012 * (span or 8.0)  # arms with equal bits side by side, their bars apart
        same: dict[int, list] = {}
        for point in found.points:
            same.setdefault(round(point.bits / SAME_BITS), []).append(point)
        x = {id(p): p.bits + (i - (len(row) - 1) / 2) * step for row in same.values() for i, p in enumerate(row)}
        losses = [p.loss.mean for p in found.points]
        close = 0.03 * ((max(losses) - min(losses)) or 1.0)  # labels of arms at one place stacked
        rank = {id(p): sum(abs(q.loss.mean - p.loss.mean) < close for q in row[:i])
                for row in same.values() for i, p in enumerate(row)}
        for point in found.points:
            low, high = point.loss.low, point.loss.high
            bar = [[point.loss.mean - low], [high - point.loss.mean]] if point.loss.n >= 2 else None
            color = colors[point.name]
            axis.errorbar(x[id(point)], point.loss.mean, yerr=bar, fmt="o" if point.on_frontier else "s", color=color,
                          markerfacecolor=color if point.on_frontier else "white", capsize=3,
                          label=f"{point.name} ({point.group.arm_tag})")
            axis.annotate(point.name, (x[id(point)], point.loss.mean), textcoords="offset points",
                          xytext=(5, 3 + 8 * rank[id(point)]), fontsize="x-small")
        line = found.on
        axis.plot([x[id(p)] for p in line], [p.loss.mean for p in line], "k-", linewidth=1, alpha=0.6,
                  label="frontier")
        if math.isfinite(base):
            axis.axhline(base, color="k", linestyle="--", linewidth=1,
                         label=f"{analysis.baseline.format} (no weight format)")
        _label(axis, found.where, "bits per weight with a format (training state)", "final validation loss")
    _hide_unused(axes, len(panels))
    figure.suptitle("memory/loss frontier: mean over seeds, bar = 95% interval\nfilled: on the frontier (no arm "
                    "with fewer or equal bits has a lower mean loss);\narms with equal bits are drawn side by side",
                    fontsize="small")
    figure.subplots_adjust(top=0.8 if rows == 1 else 0.88)
    return _save(figure, path)


FIGURES: dict[str, tuple[Callable[[Analysis, Path], Path | None], str]] = {
    "loss_curves.png": (loss_curves, "Validation loss per format and arm (mean over seeds, band: min to max)"),
    "heatmaps.png": (heatmaps, "Stall ratio and final-loss difference to BF16, format x arm"),
    "flips_updates.png": (flips_updates, "Flip and update rates over training"),
    "rank_vs_bf16.png": (rank_vs_bf16, "Effective rank relative to the BF16 run of the same seed"),
    "collapse.png": (collapse_steps, "Collapse steps of the cells that failed"),
    "memory_frontier.png": (memory_frontier, "Final validation loss against bits per parameter per format "
                                             "(the memory/loss frontier)"),
}


def write_figures(analysis: Analysis, out: Path) -> dict[str, str]:
    """file name -> caption of every figure that had data."""
    written = {}
    for name, (draw, caption) in FIGURES.items():
        if draw(analysis, out / name) is not None:
            written[name] = caption
    return written
