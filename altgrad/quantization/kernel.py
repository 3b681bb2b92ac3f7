"""The rounding kernels: integer arithmetic on the float32 bit pattern, and a fast exact
nearest-rounding path by power-of-two scaling (`round_nearest_by_scaling`) where it fits.

Why integers: a float trick (``(x + C) - C``) depends on the FPU's rounding mode, on
flush-to-zero settings and on what a compiler with fast-math flags may reassociate. Integer
ops mean the same thing in eager PyTorch and in torch.compile's generated code, so the
compiled kernel (one fused pass, near memory bandwidth) is bit-identical to the eager one.

For |x| with float32 exponent field ``ex`` and significand ``sig`` (implicit bit included),
the target grid spacing is ``2^(max(ex, emin_b) - 127 - M)``; rounding is then an integer
right shift of ``sig`` by ``shift = 23 - M + max(emin_b - ex, 0)`` with the chosen tie or
random rule, giving ``k`` grid steps. One rounding, subnormals included, no double rounding.

Stochastic rounding adds ``shift`` random bits before truncating, so P(round up) is exactly
the fraction of a grid step, i.e. E[q(x)] = x. The random bits are a counter-based hash of
the element index and a 64-bit seed drawn from a ``torch.Generator``: reproducible, and the
same in eager and compiled code. Shifts above 30 bits (|x| below 2^-7 of the smallest
subnormal, P(up) < 2^-7) keep the top 30 bits of the fraction, so P(up) is exact to 2^-30.

Few-bit stochastic rounding (``sr_bits = N``, 1..30; the params slot ``P_SR_BITS``, 30 by
default, which is the rule above): ``kept = min(shift, N)`` bits, i.e. the fraction of a grid
step truncated to N bits plus N random bits, as hardware with an N-bit random source does
(Fitzgibbon and Felix 2025, "SRFastest"; gfloat's ``RoundMode.StochasticFastest``). The noise
is the low ``kept`` bits of the 30-bit hash, as for the exact rule, so an element whose grid
step needs at most N bits rounds exactly as without ``sr_bits``. For |x| = (k + f) d (d the grid
spacing at x, 0 <= f < 1): P(|q| = (k + 1) d) = floor(2^N f) / 2^N, so
``E[q(x)] - x = -sign(x) d 2^-N frac(2^N f)``: biased toward zero, by less than d 2^-N, and
exactly unbiased where f is a multiple of 2^-N; |x| < d 2^-N below the smallest subnormal
always rounds to 0.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

from . import native

_SIGN_MASK = -(2**31)  # 0x80000000 as int32
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_MANTISSA_MASK = 0x7FFFFF
_RANDOM_BITS = 30
_MASK32 = 0xFFFFFFFF

# Params tensor layout (int32, on the input's device): kept as data, not Python constants, so
# that one compiled graph serves every format without recompiling. P_SR_BITS: the random bits of
# stochastic rounding (`sr_bits`; _RANDOM_BITS, the exact rule, by default).
P_MANTISSA, P_EMIN_BIASED, P_MAX_BITS, P_OVERFLOW_BITS, P_SR_BITS = range(5)

log = logging.getLogger(__name__)


def sr_bits_value(sr_bits: int | None) -> int:
    """The random bits stochastic rounding draws per element: ``sr_bits`` (1..30), or 30 for None
    (the exact rule; 30 bits give the same bits as None, on every path). ValueError otherwise."""
    if sr_bits is None:
        return _RANDOM_BITS
    if isinstance(sr_bits, bool) or not isinstance(sr_bits, int) or not 1 <= sr_bits <= _RANDOM_BITS:
        raise ValueError(f"sr_bits must be an integer from 1 to {_RANDOM_BITS} (or None), got {sr_bits!r}")
    return sr_bits


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xorshift-multiply) on int64 values < 2^32.

    Both multipliers are < 2^31 so that products stay below 2^63: no signed overflow, which
    would be undefined behaviour in compiled C++.
    """
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _MASK32
    return h ^ (h >> 15)


def random_bits(seed: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """30 uniform random bits per element (int32), from the element index and a seed pair."""
    index = torch.arange(shape.numel(), dtype=torch.int64, device=device)
    h = _mix32((index & _MASK32) ^ seed[0])
    h = _mix32(h ^ (index >> 32) ^ seed[1])
    return (h >> (32 - _RANDOM_BITS)).to(torch.int32).reshape(shape)


def round_float32_bits(x: torch.Tensor, params: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
    """Round x (float32, bfloat16 or float16) onto the grid described by ``params``.

    ``seed`` None means round-to-nearest-even; otherwise stochastic rounding with that seed and
    ``params[P_SR_BITS]`` random bits (module doc). Returns a tensor of x's dtype and shape.
    """
    bits = x.float().view(torch.int32)
    mantissa_bits = params[P_MANTISSA]
    emin_biased = params[P_EMIN_BIASED]

    magnitude = bits & _ABS_MASK
    sign = bits & _SIGN_MASK
    exponent = magnitude >> 23
    exponent_eff = torch.clamp(exponent, min=1)
    significand = (magnitude & _MANTISSA_MASK) | ((exponent > 0).to(torch.int32) << 23)
    exponent_target = torch.maximum(exponent_eff, emin_biased)
    exact_shift = 23 - mantissa_bits + exponent_target - exponent_eff  # may exceed 31

    one = torch.ones_like(exact_shift)
    if seed is None:
        shift = torch.clamp(exact_shift, max=31)  # any shift >= 25 rounds sig < 2^24 to 0
        half = torch.bitwise_left_shift(one, shift - 1)
        floor_steps = torch.bitwise_right_shift(significand, shift)
        # Ties go to the even code. Its last bit is the mantissa's, or for M = 0 (powers of
        # two) the exponent field's, (exponent_target - emin_b + 1); code 0 counts as even.
        exponent_parity = (exponent_target - emin_biased + 1) & (floor_steps != 0).to(torch.int32)
        odd = torch.where(mantissa_bits == 0, exponent_parity, floor_steps) & 1
        steps = torch.bitwise_right_shift(significand + (half - 1) + odd, shift)
    else:
        kept = torch.minimum(exact_shift, params[P_SR_BITS])  # N random bits: the fraction truncated to N
        truncated = torch.bitwise_right_shift(significand, torch.clamp(exact_shift - kept, max=31))
        noise = random_bits(seed, x.shape, x.device) & (torch.bitwise_left_shift(one, kept) - 1)
        steps = torch.bitwise_right_shift(truncated + noise, kept)

    # steps * 2^(exponent_target - 127 - M): float(steps) is exact (steps <= 2^(M+1)), and the
    # power of two is added to its exponent field (a multiply, not a shift, of a signed int).
    scale_field = (exponent_target - 127 - mantissa_bits) * (1 << 23)
    out = steps.to(torch.float32).view(torch.int32) + scale_field
    out = torch.where(steps == 0, torch.zeros_like(out), out)
    out = torch.where(out > params[P_MAX_BITS], params[P_OVERFLOW_BITS], out)
    out = torch.where(magnitude == _INF_BITS, params[P_OVERFLOW_BITS], out)  # ±inf in: as overflow
    out = torch.where(magnitude > _INF_BITS, magnitude, out)  # NaN in, NaN out (payload kept)
    return (out | sign).view(torch.float32).to(x.dtype)


def round_nearest_by_scaling(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even as ``round(|x| 2^(M-e)) 2^(e-M)``: the fast kernel for most formats.

    ``e`` is the binade of |x| floored at the format's emin, so ``|x| 2^(M-e)`` counts grid
    steps; both multiplications are by powers of two (exact) and `torch.round` rounds half to
    even whatever the compiler flags, so this equals `round_float32_bits` bit for bit where
    `scaling_kernel_fits` holds (tested), with half the operations. Same params, same
    overflow, inf and NaN rules.
    """
    x = x.float()
    bits = x.view(torch.int32)
    mantissa_bits = params[P_MANTISSA]
    magnitude = bits & _ABS_MASK
    # capped at 254 so that inf keeps a finite, non-zero 2^(M-e) (inf * 0 would be NaN)
    exponent_target = torch.clamp(torch.maximum(magnitude >> 23, params[P_EMIN_BIASED]), max=254)
    up = (mantissa_bits - exponent_target + 254).mul(1 << 23).view(torch.float32)  # 2^(M - e)
    down = (exponent_target - mantissa_bits).mul(1 << 23).view(torch.float32)  # 2^(e - M)
    out = (torch.round(magnitude.view(torch.float32) * up) * down).view(torch.int32)
    out = torch.where(out > params[P_MAX_BITS], params[P_OVERFLOW_BITS], out)  # overflow, and inf in
    out = torch.where(magnitude > _INF_BITS, magnitude, out)  # NaN in, NaN out (payload kept)
    return (out | (bits & _SIGN_MASK)).view(torch.float32)


def scaling_kernel_fits(mantissa_bits: int, emin: int) -> bool:
    """Whether `round_nearest_by_scaling` is exact for a format: M >= 1 (M = 0 ties go to the
    even exponent, not the even step count) and the grid spacing 2^(emin-M) at least 2^-125,
    so that every power of two it uses is a normal float32 and float32 subnormal inputs
    (below half a step) round to zero even where the CPU treats them as zero (DAZ)."""
    return mantissa_bits >= 1 and emin - mantissa_bits >= -125


def native_nearest_fits(mantissa_bits: int, emin: int, fmt_max: float) -> bool:
    """Whether the native kernel's nearest rounding (magic addition, ``native.c``) is exact for a
    format: where `round_nearest_by_scaling` is, and max < 2^(105 + M), so that the constant
    2^(e + 23 - M) of every binade up to max is a finite float32."""
    return scaling_kernel_fits(mantissa_bits, emin) and fmt_max < 2.0 ** (105 + mantissa_bits)


_compiled: dict = {}
_compile_failed = False


def _compiled_version(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


#: Tensors at least this large use the compiled kernel under ``kernel="auto"``; smaller ones
#: are not worth a compilation. Both kernels give bit-identical results.
COMPILE_MIN_NUMEL = 1 << 13

#: auto: the native C kernel where it applies (see `use_native`), else compiled for large
#: tensors and eager for small ones; native: the same, but an unavailable native kernel is an
#: error; compiled / eager: torch.compile'd or eager torch code only. All are bit-identical.
KERNELS = ("auto", "native", "compiled", "eager")


def default_kernel() -> str:
    """The kernel choice from ``ALTGRAD_KERNEL`` (auto | native | compiled | eager), default auto."""
    return _kernel_choice(os.environ.get("ALTGRAD_KERNEL", "auto"))


@lru_cache(maxsize=16)
def _kernel_choice(value: str) -> str:  # read on every cast: parsed once per value
    choice = value.strip().lower()
    return choice if choice in KERNELS else "auto"


def _resolve(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return default_kernel() if kernel == "auto" else kernel


def use_native(kernel: str, eligible: bool) -> bool:
    """Whether to call the native kernel (`native.py`) for a case it covers (``eligible``).

    Never while torch.compile traces (the torch kernels are traceable, a ctypes call is not).
    """
    kernel = _resolve(kernel)
    if kernel not in ("auto", "native") or not eligible or torch.compiler.is_compiling():
        return False
    if native.library() is None:
        if kernel == "native":
            raise RuntimeError(f"the native quantize kernel is unavailable: {native.unavailable_reason()}")
        return False
    return True


def run_compiled(fn, kernel: str, numel: int, *args, min_numel: int = COMPILE_MIN_NUMEL):
    """``fn(*args)``, compiled or eager per ``kernel`` (bit-identical; native counts as auto here).

    ``auto`` compiles for tensors of at least ``min_numel`` elements, and falls back to eager
    for good if compilation fails (no C++ compiler, unsupported backend, ...).
    """
    global _compile_failed
    kernel = _resolve(kernel)
    use_compiled = kernel == "compiled" or (kernel in ("auto", "native") and numel >= min_numel
                                            and not _compile_failed)
    if torch.compiler.is_compiling() or not use_compiled:
        return fn(*args)
    try:
        return _compiled_version(fn)(*args)
    except Exception as error:
        if kernel == "compiled":
            raise
        _compile_failed = True
        log.warning("torch.compile of a quantize kernel failed (%s); using eager kernels", error)
        return fn(*args)
