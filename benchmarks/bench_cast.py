"""The GEMM operand cast (amax, power-of-two scale, round to E4M3, write bf16) per kernel, in one process.

    python benchmarks/bench_cast.py [--repeats 500] [--preset small]

The shapes are the casts of one `small` (or `paper`) training step: activations (float32
after LayerNorm, bfloat16 elsewhere), gradients (bfloat16) and weights (float32 masters).
Each kernel's time is a ratio to a plain ``x.to(torch.bfloat16)`` of the same tensor (what a
BF16 run does to that operand; a copy for bfloat16 inputs), timed interleaved in the same loop.
The cast is the one training makes (`scaling.cast_operand`): dequantized values, with the
stream's last scale as the native kernel's guess (here the right one, as for most casts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from altgrad.quantization import get_format
from altgrad.quantization.scaling import cast_operand
from altgrad.training.config import PRESETS

KERNELS = ("native", "compiled", "eager")


def shapes(preset: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    tokens, embd = preset["batch_size"] * preset["block_size"], preset["n_embd"]
    return [
        ("LayerNorm out", (tokens, embd), torch.float32),
        ("attention out", (tokens, embd), torch.bfloat16),
        ("MLP hidden", (tokens, 4 * embd), torch.bfloat16),
        ("qkv gradient", (tokens, 3 * embd), torch.bfloat16),
        ("MLP weight", (4 * embd, embd), torch.float32),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    fmt = get_format("E4M3")
    table = Table(title=f"operand cast to E4M3 ({args.preset} shapes): time / x.to(bf16) time, "
                        f"median of {args.repeats} repeats, {torch.get_num_threads()} threads")
    for column in ("operand", "shape", "dtype", "to(bf16) us", *KERNELS):
        table.add_column(column, justify="left" if column in ("operand", "shape", "dtype") else "right")
    for name, shape, dtype in shapes(PRESETS[args.preset]):
        x = torch.randn(shape).to(dtype)
        runs = {"to(bf16)": lambda: x.to(torch.bfloat16) if x.dtype != torch.bfloat16 else x.clone()}
        scale = cast_operand(x, fmt, out_dtype=torch.bfloat16)[1]
        for kernel in KERNELS:
            runs[kernel] = lambda kernel=kernel: cast_operand(x, fmt, out_dtype=torch.bfloat16, kernel=kernel, guess=scale)
        times: dict[str, list[float]] = {key: [] for key in runs}
        for fn in runs.values():  # warm-up: builds and compilations
            fn()
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times["to(bf16)"])
        table.add_row(name, "x".join(map(str, shape)), str(dtype).removeprefix("torch."), f"{base * 1e6:.1f}",
                      *(f"{statistics.median(times[k]) / base:.1f}x" for k in KERNELS))
    Console().print(table)


if __name__ == "__main__":
    main()
