"""One optimizer step of every arm (DESIGN §4) against torch.optim.AdamW (foreach), in one process.

    python benchmarks/bench_optim.py [--preset small] [--vocab 50257] [--format E5M2] [--rounds 30]

Each arm gets its own copy of the same GPT (every Linear, the tied lm_head included, in the
format) and the same fixed gradients; the reference is ``torch.optim.AdamW(foreach=True)`` on
the same parameters with FP32 masters. Steps are interleaved (every arm takes one step, then
the next round), and the table gives the median and quartiles of the per-step times and the
ratio of medians to the reference. The default vocabulary is GPT-2's (EurLex with tiktoken),
where the tied embedding holds most of the parameters; ``--vocab 257`` is the byte tokenizer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from altgrad.model import GPT, GPTConfig
from altgrad.model.surgery import quantize_model
from altgrad.optim import build_optimizer
from altgrad.training.config import PRESETS, TrainConfig

ARMS = {
    "A adamw, FP32 master": dict(optimizer="adamw", weight_storage="master"),
    "B adamw, format, nearest": dict(optimizer="adamw", weight_storage="format", update_rounding="nearest"),
    "C adamw, format, stochastic": dict(optimizer="adamw", weight_storage="format", update_rounding="stochastic"),
    "D manifold, format, stochastic": dict(optimizer="manifold"),
    "D manifold, FP32 master": dict(optimizer="manifold", weight_storage="master"),
    "E grid, stochastic rungs": dict(optimizer="grid"),
    "ECO adamw, format, nearest, error feedback": dict(optimizer="eco"),
    "C-kahan adamw, format, nearest, bf16 buffer": dict(optimizer="adamw", weight_storage="format",
                                                        compensation="kahan"),
    "D-kahan manifold, format, stochastic, bf16 buffer": dict(optimizer="manifold", compensation="kahan"),
    "E-kahan grid, stochastic rungs, bf16 buffer": dict(optimizer="grid", compensation="kahan"),
}


def build(preset: dict, vocab: int, fmt: str | None, arm: dict | None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=preset["block_size"], n_layer=preset["n_layer"],
                          n_head=preset["n_head"], n_embd=preset["n_embd"], dropout=0.0, bias=True))
    if arm is None:  # the reference: torch's AdamW, foreach, on FP32 parameters
        params = [p for p in model.parameters()]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return model, torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), foreach=True)
    config = TrainConfig(preset="small", format=fmt, **arm)
    quantize_model(model, config.quant_policy(), config.seed)
    return model, build_optimizer(model, config.optimizer_spec(), config.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--format", default="E5M2")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    variants = {"torch AdamW (foreach), reference": build(preset, args.vocab, None, None)}
    variants |= {name: build(preset, args.vocab, args.format, arm) for name, arm in ARMS.items()}
    generator = torch.Generator().manual_seed(1)
    reference_params = list(variants["torch AdamW (foreach), reference"][0].parameters())
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in reference_params]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 3):
        for name, (model, optimizer) in variants.items():
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            begin = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - begin
            if round_ >= 3:  # warm-up rounds: allocator, first-use builds
                times[name].append(elapsed)
    params = sum(p.numel() for p in reference_params)
    table = Table(title=f"one optimizer step, {args.preset} preset, vocab {args.vocab} ({params:,} parameters), "
                        f"{args.format}, {torch.get_num_threads()} threads, median of {args.rounds}",
                  title_justify="left")
    for column in ("arm", "median ms", "q1-q3 ms", "vs AdamW"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    reference = statistics.median(times["torch AdamW (foreach), reference"])
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        table.add_row(name, f"{median * 1e3:.2f}", f"{q1 * 1e3:.2f}-{q3 * 1e3:.2f}", f"{median / reference:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
