"""Training speed on a shared CPU: quiet, and beside one competing CPU-bound process, with AltGrad's
default (spinning threads whose number follows the CPUs the run gets, `training/threads.py`), a
fixed thread count, and a fixed count with the OpenMP wait policy PASSIVE.

    python benchmarks/bench_contention.py [--steps 300] [--data DIR] [--format E4M3]

Each configuration is `altgrad train --preset small` (BF16, then the FP8 format) in a fresh
process, so that the OpenMP runtime reads its environment at start, exactly as a user's run.
The competitor is `python3 -c "while True: pass"`, started before the run and stopped after it.
Figures: the median of the trainer's ``tokens_per_s`` records (training windows, default
monitoring included, the first 20% of records left out as warm-up), and the FP8 / BF16 step-time
ratio of the same setting, and the thread counts each run used. Run it on an otherwise quiet
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from altgrad.training.tracking import read_metrics

#: name -> (environment changes, train flags)
POLICIES = {"adaptive threads (default)": ({}, []),
            "fixed threads, spinning": ({}, ["--fixed-threads"]),
            "fixed threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--fixed-threads"])}


@contextlib.contextmanager
def competitor(on: bool):
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if process is not None:
            process.kill()
            process.wait()


def tokens_per_s(runs: Path, name: str, fmt: str | None, steps: int, data: str | None, env: dict,
                 flags: list[str]) -> tuple[float, list[int]]:
    command = [sys.executable, "-m", "altgrad", "train", "--preset", "small", "--max-steps", str(steps),
               "--runs-dir", str(runs), "--run-name", name, "--eval-interval", str(steps), *flags]
    command += ["--format", fmt] if fmt else []
    command += ["--data", data] if data else []
    subprocess.run(command, env=env, check=True, capture_output=True)
    rates = [r["tokens_per_s"] for r in read_metrics(runs / name) if r.get("tokens_per_s")]
    threads = sorted({r["threads"] for r in read_metrics(runs / name) if "threads" in r})
    return statistics.median(rates[len(rates) // 5:]), threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--format", default="E4M3")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    table = Table(title=f"small preset, {args.steps} steps, tokens/s (median of training windows)")
    for column in ("threads", "machine", "BF16", args.format, f"{args.format}/BF16 step time",
                   "thread counts used (BF16 / FP8)"):
        table.add_column(column, justify="right" if column not in ("threads", "machine") else "left")
    with tempfile.TemporaryDirectory() as folder:
        for policy, (changes, flags) in POLICIES.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            env |= {k: v for k, v in changes.items() if v}
            for busy in (False, True):
                tag = f"{'busy' if busy else 'quiet'}-{len(table.rows)}"
                with competitor(busy):
                    bf16, bf16_threads = tokens_per_s(Path(folder), f"bf16-{tag}", None, args.steps, args.data, env,
                                                      flags)
                    fp8, fp8_threads = tokens_per_s(Path(folder), f"fp8-{tag}", args.format, args.steps, args.data,
                                                    env, flags)
                table.add_row(policy, "beside one busy process" if busy else "quiet", f"{bf16:,.0f}", f"{fp8:,.0f}",
                              f"{bf16 / fp8:.3f}", f"{bf16_threads} / {fp8_threads}")
    Console().print(table)


if __name__ == "__main__":
    main()
