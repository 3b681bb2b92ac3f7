"""Quantize throughput against x.clone() and torch's native float8 round trip, in one process.

    python benchmarks/bench_quantize.py [--numel 16777216] [--repeats 15]

Every figure is a ratio to x.clone() on the same tensor, timed in the same loop (median of
interleaved repeats), so machine noise affects numerator and denominator alike. clone is
the memory-bandwidth floor for an out-of-place elementwise op.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from altgrad.quantization import REGISTRY, quantize


def _median_seconds(fn, repeats: int) -> float:
    fn()
    fn()  # warm-up: compilation and allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gfloat_seconds_per_element(x: torch.Tensor) -> float | None:
    """gfloat's numpy reference, timed on a 1M slice (it is too slow for the full tensor)."""
    try:
        from gfloat import RoundMode, round_ndarray
        from gfloat.formats import format_info_ocp_e4m3
    except ImportError:
        return None
    part = x[: 1 << 20].numpy().astype(np.float64)
    seconds = _median_seconds(lambda: round_ndarray(format_info_ocp_e4m3, part, RoundMode.TiesToEven, sat=True), 3)
    return seconds / part.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.numel)
    clone = _median_seconds(lambda: x.clone(), args.repeats)

    table = Table(title=f"quantize on {args.numel:,} float32 values, time / x.clone() time "
                        f"(clone: {clone * 1e3:.1f} ms, {torch.get_num_threads()} threads)")
    table.add_column("format")
    table.add_column("nearest", justify="right")
    table.add_column("stochastic", justify="right")
    for name, fmt in REGISTRY.items():
        ratios = []
        for rounding in ("nearest", "stochastic"):
            seconds = _median_seconds(lambda: quantize(x, fmt, rounding=rounding), args.repeats)
            ratios.append(seconds / _median_seconds(lambda: x.clone(), args.repeats))
        table.add_row(name, *(f"{r:.2f}x" for r in ratios))

    native = _median_seconds(lambda: x.to(torch.float8_e4m3fn).float(), args.repeats)
    table.add_row("torch native E4M3 round trip", f"{native / clone:.2f}x", "-", style="dim")
    eager = _median_seconds(lambda: quantize(x, "E4M3", kernel="eager"), 3)
    table.add_row("AltGrad eager kernel (E4M3)", f"{eager / clone:.2f}x", "-", style="dim")
    gfloat = _gfloat_seconds_per_element(x)
    if gfloat is not None:
        ratio = gfloat * x.numel() / clone
        table.add_row("gfloat round_ndarray (E4M3, per element)", f"{ratio:.0f}x", "-", style="dim")
    Console().print(table)


if __name__ == "__main__":
    main()
