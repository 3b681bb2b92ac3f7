"""Simulated FP8 against BF16 end to end, as the user experiences `altgrad train`, step by step.

    python benchmarks/bench_end_to_end.py [--preset small] [--format E4M3] [--steps 300] [--skip 20]
                                          [--repeats 3] [--data DIR] [--compile [exact] [fused]]

Variants, each a `Trainer` run of the preset with ``--steps`` steps and the same seed and batches:
BF16; the FP8 format with AltGrad's default monitoring (quantization and update statistics every
``stats_interval`` = 10 steps, rank health every 100, no shadow); and the same FP8 run with every
monitor off (intervals past the end), which splits the FP8 cost into the casts and the monitoring.
``--compile`` adds each variant under ``compile: true`` in the compile modes given (default exact).

Every variant runs in its own process, at the full thread count, and the processes take turns
one training step at a time (a turn is one pass of the trainer's loop: the step, its monitors,
logging and metric records; evaluation and checkpoints only at the end, outside the figures), so
that the bursts of a shared or virtualised machine hit every variant alike: timing whole runs one
after another here gave ratios anywhere from 0.86x to 1.42x for the same code. The waiting
processes sleep (a blocked semaphore; their OpenMP threads stop spinning after their last
region). Two processes of the same variant still differ by a few per cent (measured: 1.029x
and 1.069x for two identical FP8 variants in one set), so the set is run ``--repeats`` times
with fresh processes, the order rotated each time, and the windows of all repeats are pooled. The first ``--skip`` steps are left out (warm-up, lazy set-up). Monitoring runs on
every 10th step, so the figures are over windows of 10 steps, each holding one statistics step:
the median window per variant as ms a step and tokens/s; the FP8 / BF16 ratio as the median and
quartiles of the per-window ratios (the same steps of both runs, taken in turns); and the ratio
of the total times of all steps, which also holds the rarer costs (rank health every 100 steps)
and every burst of the machine. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table


def variants(fmt: str, steps: int) -> dict[str, dict]:
    off = steps + 1
    return {"BF16": dict(format=None),
            f"{fmt}, default monitoring": dict(format=fmt),
            f"{fmt}, monitoring off": dict(format=fmt, stats_interval=off, rank_interval=off)}


def _worker(index: int, count: int, values: dict, turn, changed, times) -> None:
    """One variant's run; its loop waits for its turn before each step and hands it on after."""
    from altgrad.training import Trainer, resolve_config

    def wait_turn() -> None:
        with changed:
            changed.wait_for(lambda: turn.value % count == index)

    def hand_on() -> None:
        with changed:
            turn.value += 1
            changed.notify_all()

    trainer = Trainer(resolve_config(None, values))
    build = trainer._build

    def build_then_take_turns() -> None:
        build()
        step, started = trainer._step, [None]

        def step_in_turn(number: int):
            if started[0] is not None:  # the previous pass of the loop is over: time it, hand on
                times.append(time.perf_counter() - started[0])
                hand_on()
            wait_turn()
            started[0] = time.perf_counter()
            return step(number)

        trainer._step = step_in_turn

    trainer._build = build_then_take_turns
    try:
        trainer.run()
    finally:
        hand_on()  # the last step's turn (and a failed run's) goes on


def _turns(runs: dict[str, dict], args) -> dict[str, list[float]]:
    """One set: every variant in its own process, taking turns step by step; each one's loop times."""
    context = multiprocessing.get_context("spawn")
    turn, changed = context.Value("q", 0), context.Condition()
    with context.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        times = {name: manager.list() for name in runs}
        processes = []
        for index, (name, changes) in enumerate(runs.items()):
            values = dict(preset=args.preset, max_steps=args.steps, eval_interval=args.steps, eval_iters=1,
                          checkpoint_interval=args.steps, runs_dir=tmp, data=args.data, adapt_threads=False,
                          run_name=f"variant-{index}") | changes
            processes.append(context.Process(target=_worker, args=(index, len(runs), values, turn, changed,
                                                                   times[name])))
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(process.exitcode for process in processes):
            raise SystemExit("a variant failed; see its traceback above")
        return {name: list(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--format", default="E4M3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=20, help="first steps left out of the figures")
    parser.add_argument("--repeats", type=int, default=3, help="sets of fresh processes, the order rotated")
    parser.add_argument("--data", default=None)
    parser.add_argument("--compile", nargs="*", choices=("exact", "fused"), default=None, metavar="MODE",
                        help="also run every variant with compile: true, in each compile_mode given "
                             "(exact | fused; --compile alone: exact)")
    args = parser.parse_args()
    runs = variants(args.format, args.steps)
    if args.compile is not None:
        runs |= {f"{name}, compiled ({mode})": changes | {"compile": True, "compile_mode": mode}
                 for mode in args.compile or ["exact"] for name, changes in runs.items()}
    names = list(runs)
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name, values in _turns({name: runs[name] for name in order}, args).items():
            times[name].append(values)
    window = 10
    # times[k]: the loop pass of step k + 1 (the last step's is not timed); any 10 consecutive steps hold
    # exactly one statistics step. Windows of every repeat, pooled (each paired with BF16's of its repeat).
    steps = {name: [step for values in repeats for step in values[args.skip:]] for name, repeats in times.items()}
    windows = {name: [sum(values[i:i + window]) / window
                      for values in repeats for i in range(args.skip, len(values) - window + 1, window)]
               for name, repeats in times.items()}
    from altgrad.training import resolve_config

    tokens = resolve_config(None, dict(preset=args.preset)).tokens_per_step
    table = Table(title=f"end to end, {args.preset} preset, steps {args.skip + 1}-{args.steps - 1} in turns, windows of "
                        f"{window} steps, {args.repeats} repeats, {torch.get_num_threads()} threads a process",
                  title_justify="left")
    for column in ("variant", "ms a step (median window)", "tokens/s", "vs BF16 (median window)",
                   "window ratio q1-q3", "vs BF16 (all steps)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, values in windows.items():
        ratios = [a / b for a, b in zip(values, windows["BF16"])]
        q1, median_ratio, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        median = statistics.median(values)
        table.add_row(name, f"{median * 1e3:.2f}", f"{tokens / median:,.0f}", f"{median_ratio:.3f}x",
                      f"{q1:.3f}-{q3:.3f}x", f"{sum(steps[name]) / sum(steps['BF16']):.3f}x")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
