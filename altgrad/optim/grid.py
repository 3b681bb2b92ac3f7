"""GridOptim (DESIGN §4, arm E): the weight is its code, and a step moves it by whole rungs.

For a format-stored weight at scale s, the proposed move in rungs is

    v = -lr * (d + weight_decay * w)

with d Adam's normalised direction (``grid_direction: adam``) or the gradient's momentum over
its RMS across the tensor (``momentum``); ``lr`` is in rungs per step, as ManifoldAdamW's is in
ULPs. The weight moves ``floor(v + U)`` rungs, U ~ U[0, 1) (unbiased: E[move] = v; or
``round(v)``, ties to even, with ``update_rounding: nearest``), clipped to ``±rung_clip``. Rungs
are signed codes (`quantization.codes`): a move crosses zero through the code order, and stops
at the grid's ends, so the result is always a finite value of the format, never NaN. A move
that the top end stopped halves the scale afterwards (re-rounding the tensor, counted as a
rescale), so the weight can grow on the next step; the scale never grows back by itself.

``step()`` returns (flips, updates): weights whose code changed, weights with a non-zero gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..quantization import native
from ..quantization.codes import rungs, top_code, values_of_rungs
from ..quantization.kernel import random_bits
from ..quantization.quantize import draw_seed
from .base import GridAwareOptimizer

GRID_DIRECTIONS = ("adam", "momentum")


class StepCounts(NamedTuple):
    flips: int
    updates: int


def uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) with 30 random bits per element, from a seed drawn from ``generator`` (counter-based)."""
    seed = draw_seed(generator, device)
    if device.type == "cpu" and native.library() is not None:
        bits = native.random_bits(0, shape.numel(), seed).reshape(shape)
    else:
        bits = random_bits(seed, shape, device)
    return bits.float() * 2.0**-30


class GridOptim(GridAwareOptimizer):
    def __init__(self, param_groups, weights, seed, rung_clip: int = 4, grid_direction: str = "adam", **adamw):
        if grid_direction not in GRID_DIRECTIONS:
            raise ValueError(f"grid_direction must be one of {', '.join(GRID_DIRECTIONS)}, got {grid_direction!r}")
        if rung_clip < 1:
            raise ValueError(f"rung_clip must be >= 1, got {rung_clip}")
        super().__init__(param_groups, weights, seed, **adamw)
        self.rung_clip = rung_clip
        self.grid_direction = grid_direction

    def _directions(self, group, params):
        if self.grid_direction == "adam":
            return self.adam_directions(group, params)
        return self.momentum_directions(group, params)

    @torch.no_grad()
    def step(self, closure=None) -> StepCounts:
        self._run_closure(closure)
        self._plain_step()
        flips = updates = 0
        for group, params in self._geometry_groups():
            for param, direction in zip(params, self._directions(group, params)):
                weight = self.weight_of(param)
                proposed = direction.add_(param, alpha=group["weight_decay"]).mul_(-group["lr"])
                # 0/0 (a zero gradient with eps 0) or an overflowed direction never becomes a NaN weight
                torch.nan_to_num_(proposed, nan=0.0, posinf=self.rung_clip, neginf=-self.rung_clip)
                if weight.update_rounding == "stochastic":
                    moves = torch.floor(proposed.add_(uniform(param.shape, self.generator, param.device)))
                else:
                    moves = torch.round(proposed)
                moves = moves.clamp_(-self.rung_clip, self.rung_clip).to(torch.int32)
                scale = weight.scale
                before = rungs(param * scale, weight.fmt)
                target = before + moves
                top = top_code(weight.fmt)
                after = target.clamp(-top, top)
                param.copy_(values_of_rungs(after, weight.fmt) * (1.0 / scale))
                flips += int((after != before).sum())
                updates += int((param.grad != 0).sum())
                if bool((target.abs() > top).any()):
                    weight.rescale(0.5, self.generator)
        return StepCounts(flips, updates)
