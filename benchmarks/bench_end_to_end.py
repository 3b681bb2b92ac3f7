"""Simulated FP8 against BF16 end to end, as the user experiences `altgrad train`, in one process.

    python benchmarks/bench_end_to_end.py [--preset small] [--format E4M3] [--steps 300] [--rounds 3]
                                          [--data DIR] [--threads N] [--compile]

Variants, each `Trainer` run of the preset with ``--steps`` steps and the same seed and batches:
BF16; the FP8 format with AltGrad's default monitoring (quantization and update statistics every
``stats_interval`` = 10 steps, rank health every 100, no shadow); and the same FP8 run with every
monitor off (intervals past the end), which splits the FP8 cost into the casts and the monitoring.
The variants take turns, round after round, so that a drifting machine hits them alike. Figures:
the median over rounds of each run's median ``tokens_per_s`` record (training windows of 10
steps, statistics steps included, evaluation excluded), and the FP8 / BF16 step-time ratio
within each round, median over rounds (and its range over rounds). ``--compile`` adds each
variant under ``compile: true`` (the first window, which holds the compilation, is left out of
every run's median). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from altgrad.training import Trainer, resolve_config
from altgrad.training.tracking import read_metrics


def variants(fmt: str, steps: int) -> dict[str, dict]:
    off = steps + 1
    return {"BF16": dict(format=None),
            f"{fmt}, default monitoring": dict(format=fmt),
            f"{fmt}, monitoring off": dict(format=fmt, stats_interval=off, rank_interval=off)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--format", default="E4M3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=None, help="fixed CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also run every variant with compile: true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = variants(args.format, args.steps)
    if args.compile:
        runs |= {f"{name}, compiled": changes | {"compile": True} for name, changes in runs.items()}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            reference = None
            for index, (name, changes) in enumerate(runs.items()):
                values = dict(preset=args.preset, max_steps=args.steps, eval_interval=args.steps, eval_iters=1,
                              checkpoint_interval=args.steps, runs_dir=tmp, data=args.data, adapt_threads=False,
                              run_name=f"{round_}-{index}") | changes
                result = Trainer(resolve_config(None, values)).run()
                rate = statistics.median([r["tokens_per_s"] for r in read_metrics(result.run_dir)
                                          if r.get("tokens_per_s")][1:])
                reference = rate if reference is None else reference
                rates[name].append(rate)
                ratios[name].append(reference / rate)
    table = Table(title=f"end to end, {args.preset} preset, {args.steps} steps x {args.rounds} rounds, "
                        f"{torch.get_num_threads()} threads", title_justify="left")
    for column in ("variant", "tokens/s (median of rounds)", "step time vs BF16", "rounds' range"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in runs:
        table.add_row(name, f"{statistics.median(rates[name]):,.0f}", f"{statistics.median(ratios[name]):.3f}x",
                      f"{min(ratios[name]):.3f}-{max(ratios[name]):.3f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
