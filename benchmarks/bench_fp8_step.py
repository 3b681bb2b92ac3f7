"""Step time of simulated FP8 training against the fp32 and bf16 baselines, in one process.

    python benchmarks/bench_fp8_step.py [--steps 20] [--rounds 5] [--preset small] [--kernel auto]

Full optimizer steps (forward, backward, clip, AdamW) of the same model on the same random
batches. FP8 variants swap every Linear (lm_head included) for QuantizedLinear: E4M3
weights/activations with E5M2 gradients (the issue's target: <= 1.15x the bf16 step), the
same with stochastic rounding, and E3M4 (a format without a native dtype); E4M3 again with its
casts made from Python (no native streams: the route of every non-default configuration and of
statistics steps), and again with the GEMMs on the Python autograd Function as well (no C++ op
at all); and the floor: E4M3 layers on the Python route whose casts are plain ``.to(bfloat16)``
(what those layers cost beyond the casts). Variants are
interleaved step by step (each batch goes through every variant before the next batch), and
the median and quartiles of the per-step times are reported, so that the drift of a shared
machine hits all variants alike. ``--kernel`` picks the quantize kernel (ALTGRAD_KERNEL).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from altgrad.model import GPT, GPTConfig
from altgrad.model.surgery import quantize_model, quantized_layers
from altgrad.quantization import linear, linear_op
from altgrad.quantization.kernel import KERNELS
from altgrad.training.config import PRESETS, TrainConfig
from bench_train import make_step  # same folder: the optimizer step both benchmarks time

FLOOR = "E4M3 layers, casts replaced by .to(bf16)"
PYTHON_CASTS = "fp8 E4M3 / E5M2, casts from Python"
PYTHON_GEMMS = "fp8 E4M3 / E5M2, Python autograd Function"
VARIANTS = {
    "fp32": None,
    "bf16": None,
    "fp8 E4M3 fwd / E5M2 bwd": {"format": "E4M3", "grad_format": "E5M2"},
    "fp8 E4M3 / E5M2, stochastic": {"format": "E4M3", "grad_format": "E5M2", "rounding": "stochastic",
                                    "grad_rounding": "stochastic"},
    "fp8 E3M4 fwd / E5M2 bwd": {"format": "E3M4", "grad_format": "E5M2"},
    PYTHON_CASTS: {"format": "E4M3", "grad_format": "E5M2"},
    PYTHON_GEMMS: {"format": "E4M3", "grad_format": "E5M2"},
    FLOOR: {"format": "E4M3", "grad_format": "E5M2"},
}
PYTHON_ROUTE = (PYTHON_CASTS, FLOOR)  # their layers' streams have no NativeStream


@contextlib.contextmanager
def no_op_casts():
    """Every QuantizedLinear cast replaced by ``x.to(dtype)`` (dequantized: nothing to unscale)."""
    real = linear.cast_operand
    linear.cast_operand = lambda x, fmt, reference=None, **kwargs: (x.to(kwargs["out_dtype"]), 1.0, 1.0, 1.0)
    try:
        yield
    finally:
        linear.cast_operand = real


@contextlib.contextmanager
def python_gemms():
    """The quantized GEMMs on the Python autograd Function (the C++ op's reference) instead, and
    the casts from Python: no C++ extension at all."""
    real = linear_op.module
    linear_op.module = lambda: None
    try:
        yield
    finally:
        linear_op.module = real


MODES = {FLOOR: no_op_casts, PYTHON_GEMMS: python_gemms}


def make_fp8_step(preset: dict, vocab: int, rule: dict | None, autocast: bool, python_route: bool = False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=preset["block_size"], n_layer=preset["n_layer"],
                          n_head=preset["n_head"], n_embd=preset["n_embd"], dropout=0.0, bias=True))
    if rule is not None:
        quantize_model(model, TrainConfig(**rule).quant_policy())
    if python_route:
        for layer in quantized_layers(model).values():
            for quantizer in layer.quantizers.values():
                quantizer.native = None
    return make_step(model, autocast, compiled=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=257, help="257 = the byte tokenizer")
    parser.add_argument("--kernel", default="auto", choices=KERNELS, help="quantize kernel (default: auto)")
    args = parser.parse_args()
    os.environ["ALTGRAD_KERNEL"] = args.kernel
    preset = PRESETS[args.preset]
    steps = {name: make_fp8_step(preset, args.vocab, rule, name != "fp32", name in PYTHON_ROUTE)
             for name, rule in VARIANTS.items()}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (preset["batch_size"], preset["block_size"] + 1), generator=generator)
               for _ in range(args.steps)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in batches]
    for step in steps.values():  # warm-up, including the compilation of the cast kernels
        for x, y in batches[:3]:
            step(x, y)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for x, y in batches:
            for name, step in steps.items():
                with MODES.get(name, contextlib.nullcontext)():
                    start = time.perf_counter()
                    step(x, y)
                    times[name].append(time.perf_counter() - start)
    bf16 = statistics.median(times["bf16"])
    table = Table(title=f"{args.preset} preset step time, batch {preset['batch_size']} x block "
                        f"{preset['block_size']}, {torch.get_num_threads()} threads, kernel {args.kernel}, "
                        f"{args.rounds} x {args.steps} steps per variant")
    for column in ("variant", "median ms", "q1 ms", "q3 ms", "median / bf16"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, samples in times.items():
        q1, _, q3 = statistics.quantiles(samples, n=4)
        median = statistics.median(samples)
        table.add_row(name, f"{median * 1e3:.1f}", f"{q1 * 1e3:.1f}", f"{q3 * 1e3:.1f}", f"{median / bf16:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
