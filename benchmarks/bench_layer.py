"""One quantized Linear's forward and backward against nn.Linear's, by route, in one process.

    python benchmarks/bench_layer.py [--repeats 7] [--number 2000]

Routes of `QuantizedLinear` (E4M3 weights and activations, E5M2 gradients, bf16 autocast): the
native route (its streams' casts and the GEMMs in the C++ node, the default), the casts from
Python (the streams' ``NativeStream`` taken away: the route of statistics steps and of every
other configuration) and no C++ at all (the Python autograd Function). Two shapes: a tiny layer
(4 x 16 -> 16: the fixed cost a layer adds) and the small preset's MLP input layer (768 x 128 ->
512). Also one cast of a 16-element tensor: `OperandQuantizer` on the Python route against
`NativeStream.cast`. Each figure is the best of ``--repeats`` timeit runs of ``--number`` calls
(a twentieth of them for the larger shape) after one warm-up call, the variants in turns.
"""

from __future__ import annotations

import argparse
import contextlib
import timeit

import torch
from rich.console import Console
from rich.table import Table

from altgrad.quantization import linear_op
from altgrad.quantization.linear import LinearQuantConfig, OperandQuantizer, QuantizedLinear
from altgrad.quantization.scaling import ScalingConfig
from bench_fp8_step import python_gemms as without_extension  # same folder: no C++ op, casts from Python

CONFIG = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")


def layer_runs(rows: int, inputs: int, outputs: int) -> dict[str, tuple]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(inputs, outputs)
    native = QuantizedLinear.from_linear(linear, CONFIG)
    python_casts = QuantizedLinear.from_linear(linear, CONFIG)
    for quantizer in python_casts.quantizers.values():
        quantizer.native = None
    x = torch.randn(rows, inputs, requires_grad=True)
    grad = torch.randn(rows, outputs).to(torch.bfloat16)

    def step(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)

    return {"nn.Linear": (lambda: step(linear), contextlib.nullcontext),
            "QuantizedLinear, native route": (lambda: step(native), contextlib.nullcontext),
            "QuantizedLinear, casts from Python": (lambda: step(python_casts), contextlib.nullcontext),
            "QuantizedLinear, Python autograd Function": (lambda: step(native), without_extension)}


def cast_runs() -> dict[str, tuple]:
    quantizer = OperandQuantizer(CONFIG.activation, "nearest", ScalingConfig(), 0)
    stream = quantizer.native
    quantizer.native = None
    x = torch.randn(16).to(torch.bfloat16)
    runs = {"cast, OperandQuantizer (Python route)": (lambda: quantizer(x, torch.bfloat16), contextlib.nullcontext)}
    if stream is not None:
        runs["cast, NativeStream.cast"] = (lambda: stream.cast(x, torch.bfloat16), contextlib.nullcontext)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    if linear_op.module() is None:
        raise SystemExit(f"the C++ op is unavailable: {linear_op.unavailable_reason()}")
    sets = {"16 elements": cast_runs(), "4 x 16 -> 16": layer_runs(4, 16, 16),
            "768 x 128 -> 512": layer_runs(768, 128, 512)}
    table = Table(title=f"forward + backward (or one cast), best of {args.repeats} runs, "
                        f"{torch.get_num_threads()} threads")
    for column in ("shape", "variant", "us a call", "vs the first row"):
        table.add_column(column, justify="left" if column in ("shape", "variant") else "right")
    for shape, runs in sets.items():
        number = args.number if shape != "768 x 128 -> 512" else max(1, args.number // 20)
        best = {name: float("inf") for name in runs}
        for run, context in runs.values():  # warm-up: first-call allocations and dispatch caches
            with context():
                run()
        for _ in range(args.repeats):  # in turns, so that a burst of the machine hits every variant
            for name, (run, context) in runs.items():
                with context():
                    best[name] = min(best[name], timeit.timeit(run, number=number) / number)
        first = next(iter(best.values()))
        for name, seconds in best.items():
            table.add_row(shape, name, f"{seconds * 1e6:.1f}", f"{seconds / first:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
