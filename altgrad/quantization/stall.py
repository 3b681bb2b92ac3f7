"""Bit-stall detection: updates too small to move a weight to another code of the format.

An update is an element with a non-zero proposed change ``delta``. It stalls when
``q(w + delta) == q(w)`` (compared by bit pattern, in the scaled domain): the optimizer moved
the FP32 master but the weight the model computes with did not change. For w on the grid this
holds exactly when |delta| is below half the gap to the neighbouring code in delta's
direction (ties per round-to-nearest-even).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import FloatFormat, get_format
from .quantize import quantize


def _quantized_bits(x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor) -> torch.Tensor:
    q = quantize(x.float() * scale, fmt)
    # -0 and +0 are the same weight: compare magnitudes' bits for zeros.
    q = torch.where(q == 0, torch.zeros_like(q), q)
    return q.view(torch.int32)


def bit_stall_mask(
    w: torch.Tensor, delta: torch.Tensor, fmt: str | FloatFormat, scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Boolean mask of the updates (delta != 0) that leave the quantized weight unchanged."""
    fmt = get_format(fmt)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=w.device)
    before = _quantized_bits(w, fmt, scale_t)
    after = _quantized_bits(w.float() + delta.float(), fmt, scale_t)
    return (delta != 0) & (before == after)


@dataclass(frozen=True)
class FlipCount:
    """Updates and flips of one step (DESIGN §3): a flip is any element whose quantized value
    changed, counted over all elements, updated or not."""

    updates: int
    flips: int

    @property
    def stall_ratio(self) -> float:
        """1 - flips / updates; undefined (NaN, never 0) when nothing was updated."""
        return 1.0 - self.flips / self.updates if self.updates else math.nan


def count_flips(
    w_before: torch.Tensor,
    w_after: torch.Tensor,
    fmt: str | FloatFormat,
    scale: torch.Tensor | float = 1.0,
    updated: torch.Tensor | None = None,
) -> FlipCount:
    """Count updates and flips between two versions of a weight tensor.

    ``updated`` marks the updates (DESIGN: elements with a non-zero gradient this step);
    by default, the elements whose master value changed.
    """
    fmt = get_format(fmt)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=w_before.device)
    if updated is None:
        updated = w_after != w_before
    flipped = _quantized_bits(w_before, fmt, scale_t) != _quantized_bits(w_after, fmt, scale_t)
    return FlipCount(updates=int(updated.sum()), flips=int(flipped.sum()))
