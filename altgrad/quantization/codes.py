"""Code indices of on-grid values, vectorised: the integer state behind a format's grid.

A format's finite non-negative values, ascending, are `FloatFormat.positive_values`; the
*magnitude code* of a value is its position in that list, which is also its bit pattern
without the sign (finite codes are contiguous from 0 in every registered format: the
reserved inf/NaN codes sit at the top). A *rung* is the signed code, ``sign(v) * code``:
consecutive rungs are neighbouring grid values, and rung 0 is zero, so walking rungs crosses
zero through the code order (..., -min_positive, 0, +min_positive, ...).

Everything here is integer arithmetic on the float32 exponent and a power-of-two multiply,
so it is exact, and it is tested against the Python `FloatFormat.encode` loop on every code.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .formats import FloatFormat


def magnitude_codes(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The magnitude code (int32) of every value of ``fmt`` in ``values`` (already on the grid).

    Normal values ``2^b (1 + m/2^M)`` have code ``(b - emin + 1) 2^M + m``; subnormals
    ``m 2^(emin - M)`` have code ``m``. Both are ``(b' - emin) 2^M + |v| 2^(M - b')`` with
    ``b' = max(b, emin)``: one power-of-two multiply, exact. Values off the grid give
    meaningless codes: round them first.
    """
    magnitude = values.float().abs()
    _, exponent = torch.frexp(magnitude)  # |v| = f 2^exponent, f in [0.5, 1): binade = exponent - 1
    binade = torch.clamp(exponent - 1, min=fmt.emin)
    binade = torch.where(magnitude == 0, fmt.emin, binade)  # frexp(0) has exponent 0, not -inf
    steps = magnitude * torch.exp2((fmt.mantissa_bits - binade).float())
    return ((binade - fmt.emin) << fmt.mantissa_bits).to(torch.int32) + steps.to(torch.int32)


@lru_cache(maxsize=None)
def _value_table(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    return torch.tensor(fmt.positive_values, dtype=torch.float32, device=device)


def values_of_codes(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The value (float32) of each magnitude code ``0 .. len(positive_values) - 1``."""
    return _value_table(fmt, codes.device)[codes.long()]


def top_code(fmt: FloatFormat) -> int:
    """The magnitude code of the largest finite value (max)."""
    return len(fmt.positive_values) - 1


def rungs(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Signed codes (int32): ``sign(v) * magnitude_code(v)``; ±0 are both rung 0."""
    codes = magnitude_codes(values, fmt)
    return torch.where(torch.signbit(values), -codes, codes)


def values_of_rungs(rung: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The value (float32) of each signed code; rung 0 is +0."""
    magnitude = values_of_codes(rung.abs(), fmt)
    return torch.where(rung < 0, -magnitude, magnitude)
