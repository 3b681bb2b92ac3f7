"""Plots of runs side by side (matplotlib, headless), written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from ..io import atomic_write  # noqa: E402
from .runs import RunRecord  # noqa: E402

#: (metric, panel title); panels without data in any run are left out.
PANELS = (
    ("val_loss", "validation loss"),
    ("loss", "training loss"),
    ("grad_cos_sim/mean", "gradient cosine similarity to FP32"),
    ("quant/bit_stall_rate", "bit-stall rate"),
    ("quant/overflow_rate", "overflow rate"),
    ("quant/underflow_rate", "underflow rate"),
)


def plot_runs(runs: list[RunRecord], path: Path) -> Path:
    panels = [(key, title) for key, title in PANELS if any(run.series(key)[0] for run in runs)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colors = {run.name: f"C{index % 10}" for index, run in enumerate(runs)}  # one colour per run in every panel
    for axis, (key, title) in zip(axes.flat, panels):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                axis.plot(steps, values, label=run.name, color=colors[run.name],
                          marker="o" if key == "val_loss" else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    figure.tight_layout()
    atomic_write(Path(path), lambda stream: figure.savefig(stream, format="png", dpi=120))
    plt.close(figure)
    return Path(path)
