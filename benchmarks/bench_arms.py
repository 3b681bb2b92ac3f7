"""End-to-end training throughput of every arm, as `altgrad train` runs it, in one process.

    python benchmarks/bench_arms.py [--steps 300] [--rounds 2] [--format E5M2] [--data DIR]

Each arm trains the small preset for ``--steps`` steps with the default monitoring (quantization
and update statistics every 10 steps; no shadow, as `altgrad train`'s defaults), the same seed and
batches; the arms take turns, round after round, so that a drifting machine hits them alike.
The figure is the median of the trainer's own ``tokens_per_s`` records (training windows, the
monitors' cost included, evaluation excluded), and its ratio to the BF16 run of the same round.
``--data`` defaults to what `altgrad train` uses (data/eurlex when prepared, else the built-in corpus).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from rich.console import Console
from rich.table import Table

from altgrad.training import Trainer, resolve_config
from altgrad.training.tracking import read_metrics

ARMS = {
    "BF16 (reference)": dict(format=None),
    "A adamw, FP32 master": dict(),
    "B adamw, format, nearest": dict(weight_storage="format", update_rounding="nearest"),
    "C adamw, format, stochastic": dict(weight_storage="format", update_rounding="stochastic"),
    "D manifold, format, stochastic": dict(optimizer="manifold"),
    "E grid, stochastic rungs": dict(optimizer="grid"),
    "ECO adamw, format, nearest, error feedback": dict(optimizer="eco"),
    "C-kahan adamw, format, nearest, bf16 buffer": dict(weight_storage="format", compensation="kahan"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--format", default="E5M2")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in ARMS}
    ratios: dict[str, list[float]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            reference = None
            for name, arm in ARMS.items():
                values = dict(preset="small", format=args.format, max_steps=args.steps, eval_interval=args.steps,
                              eval_iters=1, checkpoint_interval=args.steps, runs_dir=tmp, data=args.data,
                              run_name=f"{round_}-{name.split()[0]}") | arm
                result = Trainer(resolve_config(None, values)).run()
                records = read_metrics(result.run_dir)
                rate = statistics.median(r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
                reference = rate if reference is None else reference
                rates[name].append(rate)
                ratios[name].append(rate / reference)
    table = Table(title=f"end-to-end training, small preset, {args.format}, {args.steps} steps x {args.rounds} rounds, "
                        "default monitoring", title_justify="left")
    for column in ("arm", "tokens/s (median of rounds)", "vs BF16"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name in ARMS:
        table.add_row(name, f"{statistics.median(rates[name]):,.0f}", f"{statistics.median(ratios[name]):.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
