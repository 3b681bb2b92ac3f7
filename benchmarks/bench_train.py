"""Training throughput of the `small` preset, AltGrad vs nanoGPT, in one process.

    python benchmarks/bench_train.py [--nanogpt PATH_TO_NANOGPT_CHECKOUT] [--steps 30] [--compile]

Times full optimizer steps (forward, backward, clip, AdamW) on the same random batches for
AltGrad's GPT in fp32 and bf16 autocast and, given a nanoGPT checkout, for nanoGPT's
model.py with the same config (imported from that folder at run time; nothing is copied).
nanoGPT's CPU autocast is a no-op (its train.py uses nullcontext on CPU), so its "bf16" row
is fp32 arithmetic. Model FLOP utilisation is against a matmul peak measured here too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from altgrad.model import GPT, GPTConfig
from altgrad.training.config import PRESETS

SMALL = PRESETS["small"]


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square matmul: the practical ceiling for these models on this machine."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def load_nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module
    spec.loader.exec_module(module)
    return module


def make_step(model: torch.nn.Module, autocast: bool, compiled: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    forward = torch.compile(model) if compiled else model

    def step(x, y):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (folder with model.py)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--vocab", type=int, default=65, help="65 = nanoGPT's shakespeare_char")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = parser.parse_args()

    shape = dict(n_layer=SMALL["n_layer"], n_head=SMALL["n_head"], n_embd=SMALL["n_embd"],
                 block_size=SMALL["block_size"], dropout=0.0, bias=True, vocab_size=args.vocab)
    batch = SMALL["batch_size"]
    nanogpt = load_nanogpt(args.nanogpt) if args.nanogpt else None

    variants = {}
    for compiled in ([False, True] if args.compile else [False]):
        tag = " +compile" if compiled else ""
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = GPT(GPTConfig(**shape))
            variants[f"AltGrad {precision}{tag}"] = (make_step(model, precision == "bf16", compiled), model)
            if nanogpt is not None:
                torch.manual_seed(0)
                theirs = nanogpt.GPT(nanogpt.GPTConfig(**shape))
                # nanoGPT's train.py: ctx = nullcontext() on CPU, whatever dtype is asked for
                variants[f"nanoGPT {precision}{tag}"] = (make_step(theirs, False, compiled), theirs)

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (batch, shape["block_size"] + 1), generator=generator)
               for _ in range(args.steps)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in batches]
    for step, _ in variants.values():  # warm-up (and compilation)
        for x, y in batches[:3]:
            step(x, y)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (step, _) in variants.items():
            start = time.perf_counter()
            for x, y in batches:
                step(x, y)
            times[name].append((time.perf_counter() - start) / args.steps)

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops_per_token = GPT(GPTConfig(**shape)).flops_per_token()
    tokens_per_step = batch * shape["block_size"]
    reference = statistics.median(times[next(iter(times))])
    table = Table(title=f"small preset training step (batch {batch} x block {shape['block_size']}, vocab {args.vocab}, "
                        f"{torch.get_num_threads()} threads); matmul peak fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
                        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    for column in ("variant", "ms/step", "tokens/s", "MFU", f"time vs {next(iter(times))}"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rate = tokens_per_step / seconds
        precision = "bf16" if "bf16" in name and name.startswith("AltGrad") else "fp32"
        table.add_row(name, f"{seconds * 1e3:.1f}", f"{rate:,.0f}",
                      f"{100 * rate * flops_per_token / peak[precision]:.1f}%", f"{seconds / reference:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
