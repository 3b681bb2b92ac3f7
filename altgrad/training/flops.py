"""Model FLOPs utilisation: the training FLOPs a run achieved against the matmul peak measured on
the same device, in the run's GEMM dtype.

Training FLOPs per token follow the PaLM appendix (as nanoGPT's ``estimate_mfu``): ``6 N`` for
the weights (N: parameters without the position embedding; forward 2N, backward 4N) plus
``12 L T d`` for attention (L layers, T the block size, d the width). The peak is not a data
sheet number but measured here, once per process and thread count: the best of a few timed
square matmuls, so MFU says how much of what this machine can do in this dtype the run used (on a
shared machine the peak is measured under the same sharing). On CPU the peak is that of the
threads the run was given (its CPU allotment), not of however many the thread governor
(`threads.py`) runs with at the end: a run that had to drop to one thread on a busy machine
shows that as a lower MFU.
"""

from __future__ import annotations

import time
from functools import cache

import torch

from ..model import GPTConfig

PEAK_SIZE = {"cpu": 1024, "cuda": 8192}


def flops_per_token(config: GPTConfig, params: int) -> float:
    return 6.0 * params + 12.0 * config.n_layer * config.block_size * config.n_embd


@cache
def measured_peak(device_type: str, dtype: torch.dtype, index: int = 0, threads: int | None = None) -> float:
    """FLOP/s of the best of a few square matmuls on the device, in ``dtype``; on CPU with
    ``threads`` intra-op threads (default: the current count), restored afterwards."""
    if device_type == "cpu" and threads and threads != torch.get_num_threads():
        current = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measured_peak(device_type, dtype, index, threads)
        finally:
            torch.set_num_threads(current)
    size = PEAK_SIZE.get(device_type, 1024)
    device = torch.device(device_type, index) if device_type == "cuda" else torch.device(device_type)
    generator = torch.Generator().manual_seed(0)  # its own stream: the run's RNG does not move
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def utilisation(config: GPTConfig, params: int, tokens_per_s: float, device: torch.device, dtype: torch.dtype,
                processes: int = 1, threads: int | None = None) -> dict[str, float]:
    """``mfu`` (achieved / the peak of all processes' devices), ``achieved_flops`` and
    ``peak_flops`` (one device's, FLOP/s), for a run's average ``tokens_per_s``; ``threads``: the
    CPU threads the run was given."""
    achieved = flops_per_token(config, params) * tokens_per_s
    peak = measured_peak(device.type, dtype, device.index or 0, threads if device.type == "cpu" else None)
    return {"mfu": achieved / (peak * processes), "achieved_flops": achieved, "peak_flops": peak}
