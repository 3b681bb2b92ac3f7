"""GridOptim (DESIGN §4, arm E): the weight is its code, and a step moves it by whole rungs.

For a format-stored weight at scale s, the proposed move in rungs is

    v = -lr * (d + weight_decay * w)

with d Adam's normalised direction (``grid_direction: adam``) or the gradient's momentum over
its RMS across the tensor (``momentum``); ``lr`` is in rungs per step, as ManifoldAdamW's is in
ULPs. The weight moves ``floor(v + U)`` rungs, U ~ U[0, 1) (unbiased: E[move] = v, exact to
2^-30; or
``round(v)``, ties to even, with ``update_rounding: nearest``), clipped to ``±rung_clip``. Rungs
are signed codes (`quantization.codes`): a move crosses zero through the code order, and stops
at the grid's ends, so the result is always a finite value of the format, never NaN. A move
that the top end stopped halves the scale afterwards (re-rounding the tensor, counted as a
rescale), so the weight can grow on the next step; the scale never grows back by itself.

``step()`` returns (flips, updates): weights whose code the move changed, weights with a non-zero
gradient (a rescale after the move re-rounds the tensor; the update monitor counts those flips
too). The decay term is ManifoldAdamW's in rungs: its step divided by S(w) is the same
``-lr (d + wd w)``, so the two geometry arms decay alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from ..quantization import native
from ..quantization.codes import rungs, top_code, values_of_codes, values_of_rungs
from ..quantization.kernel import random_bits, use_native
from ..quantization.quantize import draw_seed
from .base import GridAwareOptimizer

GRID_DIRECTIONS = ("adam", "momentum")


class StepCounts(NamedTuple):
    flips: int
    updates: int


def random_rungs(proposed: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``floor(v + U)``, U ~ U[0, 1), exactly: floor(v), plus one with probability frac(v) to 2^-30.

    30 random bits per element (the counter-based hash of `kernel.random_bits`) are compared
    with ``ceil(frac(v) 2^30)``: every step is exact in float32, so a frac of 0 never moves (a
    float ``U = bits 2^-30`` would round to 1.0 for the top 32 of the 2^30 draws) and E[move] = v.
    """
    if proposed.device.type == "cpu" and native.library() is not None:
        bits = native.random_bits(0, proposed.numel(), seed).reshape(proposed.shape)
    else:
        bits = random_bits(seed, proposed.shape, proposed.device)
    whole = torch.floor(proposed)
    return whole + (bits < torch.ceil((proposed - whole) * 2.0**30).to(torch.int32)).float()


class GridOptim(GridAwareOptimizer):
    def __init__(self, param_groups, weights, seed, rung_clip: int = 4, grid_direction: str = "adam", **adamw):
        if grid_direction not in GRID_DIRECTIONS:
            raise ValueError(f"grid_direction must be one of {', '.join(GRID_DIRECTIONS)}, got {grid_direction!r}")
        if rung_clip < 1:
            raise ValueError(f"rung_clip must be >= 1, got {rung_clip}")
        super().__init__(param_groups, weights, seed, **adamw)
        self.rung_clip = rung_clip
        self.grid_direction = grid_direction

    @torch.no_grad()
    def step(self, closure=None) -> StepCounts:
        self._run_closure(closure)
        self._plain_step()
        flips = updates = 0
        for group, params in self._geometry_groups():
            for param in params:
                weight = self.weight_of(param)
                adam = self.grid_direction == "adam"
                hyper = self.adam_hyper(group, self.count_step(param, second=adam), bias_corrected=adam)
                moved, updated, blocked = self._move(param, weight, hyper)
                flips, updates = flips + moved, updates + updated
                if blocked:
                    weight.rescale(0.5, self.generator)
        return StepCounts(flips, updates)

    def _move(self, param, weight, hyper) -> tuple[int, int, bool]:
        """One tensor's rung moves: (flips, updates, whether the top end stopped a move)."""
        fmt, scale, state = weight.fmt, weight.forward_scale(), self.state[param]
        stochastic = weight.update_rounding == "stochastic"
        seed = draw_seed(self.generator, param.device) if stochastic else None
        tensors = (param, param.grad, state["exp_avg"], state.get("exp_avg_sq", param))
        if self.grid_direction == "adam" and use_native("auto", native.fits_step(*tensors)):
            hyper = hyper + [float(scale), 1.0 / float(scale)]
            flips, updates, blocked = native.grid_step(param.data, *tensors[1:], hyper, fmt.emin, fmt.mantissa_bits,
                                                       top_code(fmt), self.rung_clip, _table(fmt), seed)
            return flips, updates, blocked > 0
        if self.grid_direction == "adam":
            direction = self.adam_direction(param, hyper)
        else:
            direction = self.momentum_direction(param, hyper)
        proposed = -(direction * hyper[6] + param * hyper[7])  # -(d step + w decay), as native.c
        # 0/0 (a zero gradient with eps 0) or an overflowed direction never becomes a NaN weight
        torch.nan_to_num_(proposed, nan=0.0, posinf=self.rung_clip, neginf=-self.rung_clip)
        if seed is not None:
            moves = random_rungs(proposed, seed)
        else:
            moves = torch.round(proposed)  # half to even
        moves = moves.clamp_(-self.rung_clip, self.rung_clip).to(torch.int32)
        before = rungs(param * scale, fmt)
        target = before + moves
        top = top_code(fmt)
        after = target.clamp(-top, top)
        param.copy_(values_of_rungs(after, fmt) * (1.0 / scale))
        return int((after != before).sum()), int((param.grad != 0).sum()), bool((target.abs() > top).any())


@lru_cache(maxsize=None)
def _table(fmt) -> torch.Tensor:
    """Every finite non-negative value of the format by magnitude code (float32, CPU): the C lookup table."""
    return values_of_codes(torch.arange(top_code(fmt) + 1), fmt)
