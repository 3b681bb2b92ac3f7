"""Fake quantization: round a tensor onto a format's grid, keeping its dtype."""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Literal

import torch

from . import native
from .formats import FloatFormat, get_format
from .kernel import (
    P_EMIN_BIASED,
    P_MANTISSA,
    P_MAX_BITS,
    P_OVERFLOW_BITS,
    P_SR_BITS,
    round_float32_bits,
    round_nearest_by_scaling,
    native_nearest_fits,
    run_compiled,
    scaling_kernel_fits,
    sr_bits_value,
    use_native,
)

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_INF_BITS = 0x7F800000
_NAN_BITS = 0x7FC00000


def float32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _params(fmt: FloatFormat, saturate: bool, device: torch.device, sr_bits: int | None = None) -> torch.Tensor:
    """The kernel's view of a format: mantissa bits, emin, max, what overflow becomes, and the
    random bits of its stochastic rounding (``sr_bits``, `kernel.sr_bits_value`: None is 30).

    Overflow (a finite value rounding beyond max) saturates to ±max, or with saturate=False
    becomes inf where the format has inf, else NaN where it has NaN, else ±max (a format with
    neither has nothing else to give). Input ±inf follows the same rule, as in gfloat.
    """
    return _format_params(fmt, saturate, device, sr_bits_value(sr_bits))  # checked before the cache


@lru_cache(maxsize=None)
def _format_params(fmt: FloatFormat, saturate: bool, device: torch.device, sr_bits: int) -> torch.Tensor:
    max_bits = float32_bits(fmt.max)
    if saturate:
        overflow = max_bits
    elif fmt.has_inf:
        overflow = _INF_BITS
    elif fmt.has_nan:
        overflow = _NAN_BITS
    else:
        overflow = max_bits
    values = [0] * 5
    values[P_MANTISSA] = fmt.mantissa_bits
    values[P_EMIN_BIASED] = fmt.emin + 127
    values[P_MAX_BITS] = max_bits
    values[P_OVERFLOW_BITS] = overflow
    values[P_SR_BITS] = sr_bits
    return torch.tensor(values, dtype=torch.int32, device=device)


@lru_cache(maxsize=None)
def _check_fits(fmt: FloatFormat, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize supports float32, bfloat16 and float16 tensors, got {dtype}")
    if not fmt.fits(dtype):
        raise ValueError(f"{fmt.name} has values that {dtype} cannot hold exactly; quantize a float32 tensor")


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Two 32-bit seeds for the stochastic kernel, drawn from ``generator`` (or torch's default)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64, device=gen_device)
    return seed.to(device)


def quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    kernel: str = "auto",
    sr_bits: int | None = None,
) -> torch.Tensor:
    """Round every element of x to a value of ``fmt`` (fake quantization, x's dtype kept).

    - ``rounding="nearest"``: round to nearest, ties to even, in one rounding.
    - ``rounding="stochastic"``: round up with probability equal to the fraction of a grid
      step, so E[q(x)] = x inside the range; reproducible from ``generator`` (default:
      torch's global generator, so ``torch.manual_seed`` fixes it). ``sr_bits`` N (1..30):
      with N random bits, the fraction truncated to N bits (biased toward zero; `kernel`'s
      module doc gives the bias); None: the exact rule.
    - ``saturate``: overflow to ±max (default); otherwise to inf if the format has it.
    NaN stays NaN, -0 stays -0. ``kernel``: auto | native | compiled | eager (bit-identical).
    """
    fmt = get_format(fmt)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    _check_fits(fmt, x.dtype)
    params = _params(fmt, bool(saturate), x.device, sr_bits)
    seed = draw_seed(generator, x.device) if rounding == "stochastic" else None
    by_scaling = seed is None and scaling_kernel_fits(fmt.mantissa_bits, fmt.emin)
    native_fits = seed is not None or native_nearest_fits(fmt.mantissa_bits, fmt.emin, fmt.max)
    if use_native(kernel, native_fits and native.supports(x, x.dtype)):
        return native.round_to_grid(x, params, x.dtype, seed=seed)
    if by_scaling:
        return run_compiled(round_nearest_by_scaling, kernel, x.numel(), x, params).to(x.dtype)
    return run_compiled(round_float32_bits, kernel, x.numel(), x, params, seed)


class _QuantizeSTE(torch.autograd.Function):
    """Quantize forward, identity backward.

    The straight-through estimator passes the gradient unchanged, also where the value was
    saturated: with amax scaling almost nothing saturates, and this is what the FP8 training
    recipes (torchao float8, TransformerEngine) do, so simulated runs match them.
    """

    @staticmethod
    def forward(ctx, x, fmt, rounding, saturate, generator, sr_bits):  # noqa: D401 - autograd API
        return quantize(x, fmt, rounding=rounding, saturate=saturate, generator=generator, sr_bits=sr_bits)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None, None


def quantize_ste(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    sr_bits: int | None = None,
) -> torch.Tensor:
    """`quantize` with a straight-through gradient (d q(x) / dx := 1)."""
    return _QuantizeSTE.apply(x, get_format(fmt), rounding, saturate, generator, sr_bits)
