"""The cost of thread-invariant LayerNorm gradients (model/layernorm.py) in a whole training step.

    python benchmarks/bench_layernorm.py [--preset small] [--threads 1 2] [--steps 60] [--rounds 5]

One process, two copies of the preset's GPT (same weights, same batch): one with AltGrad's
LayerNorm, one with PyTorch's `nn.LayerNorm`. They take turns one forward/backward step (BF16
autocast, as `altgrad train`) at a time, so the machine's bursts hit both alike; per thread
count, the median ms a step of each and the median of the per-turn ratios (ours / PyTorch's).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from altgrad.model import GPT, GPTConfig
from altgrad.training import resolve_config


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    began = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=257, help="257: byte-level data; 50304: GPT-2 tokens")
    args = parser.parse_args()
    cfg = resolve_config(None, {"preset": args.preset})
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=args.vocab, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias))
    theirs = copy.deepcopy(ours)
    for module in theirs.modules():
        if isinstance(module, nn.LayerNorm):
            module.__class__ = nn.LayerNorm  # PyTorch's forward and backward, the same parameters
    x = torch.randint(0, args.vocab, (cfg.batch_size, cfg.block_size))
    y = torch.randint(0, args.vocab, (cfg.batch_size, cfg.block_size))
    print(f"preset {args.preset}: {cfg.n_layer} layers, {cfg.n_embd} wide, batch {cfg.batch_size} x block "
          f"{cfg.block_size}, vocab {args.vocab}; {args.rounds} rounds of {args.steps} turns")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model in (ours, theirs):  # warm-up
            for _ in range(5):
                step(model, x, y)
        times = {"ours": [], "pytorch": []}
        ratios = []
        for round_ in range(args.rounds):
            order = [("ours", ours), ("pytorch", theirs)][:: 1 if round_ % 2 == 0 else -1]
            for _ in range(args.steps):
                turn = {name: step(model, x, y) for name, model in order}
                for name, seconds in turn.items():
                    times[name].append(seconds)
                ratios.append(turn["ours"] / turn["pytorch"])
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        q = statistics.quantiles(ratios, n=4)
        print(f"{threads} thread{'s' if threads > 1 else ''}: ours {ms['ours']:.2f} ms/step, PyTorch's "
              f"{ms['pytorch']:.2f} ms/step; ratio median {statistics.median(ratios):.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
