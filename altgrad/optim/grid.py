"""GridOptim (DESIGN §4, arm E): the weight is its code, and a step moves it by whole rungs.

For a format-stored weight at scale s, the proposed move in rungs is

    v = -lr * (d + weight_decay * w)

with d Adam's normalised direction (``grid_direction: adam``) or the gradient's momentum over
its RMS across the tensor (``momentum``); ``lr`` is in rungs per step, as ManifoldAdamW's is in
ULPs (``lr_unit="binade"``, config ``grid_lr_unit``: ``lr * 2^M`` rungs for a weight whose
current format has M mantissa bits, i.e. ``lr`` binades' worth of codes). The weight moves
``floor(v + U)`` rungs, U ~ U[0, 1) (unbiased: E[move] = v, exact to 2^-30; or
``round(v)``, ties to even, with ``update_rounding: nearest``), clipped to ``±rung_clip``. Rungs
are signed codes (`quantization.codes`): a move crosses zero through the code order, and stops
at the grid's ends, so the result is always a finite value of the format, never NaN. A move
that the top end stopped halves the scale afterwards (re-rounding the tensor, counted as a
rescale), so the weight can grow on the next step; the scale never grows back by itself.

On an FP32 master (``weight_storage: master``, arm tag ``grid-master``) the same rule moves the
master's *continuous code position* (`positions`: rung k at the k-th grid value under the
tensor's current amax scale, linear between adjacent signed codes) by ``clip(v, ±rung_clip)``,
without rounding (the fractions accumulate in FP32), clamped at ±top code; it crosses zero
through the code order like the stored arm. The grid only sizes the step. Where the stored
weight is on its grid, its stochastic move is this one in expectation (E[floor(v + U)] = v, and
the value is linear in the position between adjacent codes). The master's grid is the scale of
`GridOptim.master_scale` (halved while its top code is occupied: the stored arm's rescale).

``step()`` returns (flips, updates): weights whose code the move changed (a master: whose nearest
code on the step's grid changed), weights with a non-zero gradient (a rescale after the move
re-rounds the tensor; the update monitor counts those flips too). The decay term is
ManifoldAdamW's in rungs: its step divided by S(w) is the same ``-lr (d + wd w)``, so the two
geometry arms decay alike.

With compensated storage (``compensation: kahan``) a stored weight's move starts at the
continuous position of ``w + c`` instead of its rung, and the buffer keeps what the landing could
not hold: ``c <- (value at the intended position - the landed value) / s`` (the torch code; the
fused native pass has no buffer).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from ..quantization import native
from ..quantization.codes import magnitude_codes, rungs, top_code, values_of_codes, values_of_rungs
from ..quantization.kernel import random_bits, sr_bits_value, use_native
from ..quantization.quantize import draw_seed
from .base import GRID_LR_UNITS, GridAwareOptimizer, lr_unit_factor

GRID_DIRECTIONS = ("adam", "momentum")


class StepCounts(NamedTuple):
    flips: int
    updates: int


def random_rungs(proposed: torch.Tensor, seed: torch.Tensor, sr_bits: int | None = None) -> torch.Tensor:
    """``floor(v + U)``, U ~ U[0, 1), exactly: floor(v), plus one with probability frac(v) to 2^-30.

    30 random bits per element (the counter-based hash of `kernel.random_bits`) are compared
    with ``ceil(frac(v) 2^30)``: every step is exact in float32, so a frac of 0 never moves (a
    float ``U = bits 2^-30`` would round to 1.0 for the top 32 of the 2^30 draws) and E[move] = v.

    With ``sr_bits`` N (1..30), N random bits under the casts' truncation convention
    (`kernel.round_float32_bits` on the integer grid, sign and magnitude): ``sign(v) (floor|v| +
    c)`` with the carry ``c = (floor(frac|v| 2^N) + r) >> N``, r the low N bits of the hash. So
    P(one rung more) = floor(frac|v| 2^N) / 2^N and E[move] = v - sign(v) frac(2^N frac|v|) 2^-N:
    biased toward not moving, and |v| < 2^-N never moves. N = 30 is this rule with 30 bits, equal
    in distribution (to 2^-30) to the rule without sr_bits, not bit for bit.
    """
    if proposed.device.type == "cpu" and native.library() is not None:
        bits = native.random_bits(0, proposed.numel(), seed).reshape(proposed.shape)
    else:
        bits = random_bits(seed, proposed.shape, proposed.device)
    if sr_bits is not None:
        n = sr_bits_value(sr_bits)
        magnitude = proposed.abs()
        whole = torch.floor(magnitude)
        truncated = ((magnitude - whole) * 2.0**n).to(torch.int32)  # < 2^n, exact; truncation is floor here
        carry = torch.bitwise_right_shift(truncated + (bits & ((1 << n) - 1)), n)
        return torch.copysign(whole + carry.float(), proposed)
    whole = torch.floor(proposed)
    return whole + (bits < torch.ceil((proposed - whole) * 2.0**30).to(torch.int32)).float()


def positions(scaled: torch.Tensor, fmt) -> torch.Tensor:
    """The continuous signed code position (float64) of each scaled value: rung k at the k-th
    grid value, linear between neighbouring values, so it crosses zero through the code order
    (-1 at -min_positive, 0 at 0, +1 at +min_positive). Beyond ±max it saturates at ±top code."""
    top = top_code(fmt)
    magnitude = scaled.detach().float().abs().clamp(max=fmt.max)
    code = magnitude_codes(magnitude, fmt).clamp(max=top)  # of the largest grid value <= |x| (truncation)
    low = values_of_codes(code, fmt).double()
    high = values_of_codes((code + 1).clamp(max=top), fmt).double()
    fraction = torch.where(high > low, (magnitude.double() - low) / (high - low).clamp(min=1e-300), 0.0)
    position = code.double() + fraction
    return torch.where(torch.signbit(scaled), -position, position)


def values_at(position: torch.Tensor, fmt) -> torch.Tensor:
    """The scaled value (float64) at each continuous code position: `positions`' inverse, the
    piecewise-linear interpolation between adjacent signed codes, clamped at ±top code."""
    top = top_code(fmt)
    magnitude = position.abs().clamp(max=top)
    code = torch.floor(magnitude).long().clamp(max=top)
    low = values_of_codes(code, fmt).double()
    high = values_of_codes((code + 1).clamp(max=top), fmt).double()
    value = low + (magnitude - code.double()) * (high - low)
    return torch.where(position < 0, -value, value)


class GridOptim(GridAwareOptimizer):
    def __init__(self, param_groups, weights, seed, rung_clip: int = 4, grid_direction: str = "adam",
                 lr_unit: str = "ulp", **adamw):
        if grid_direction not in GRID_DIRECTIONS:
            raise ValueError(f"grid_direction must be one of {', '.join(GRID_DIRECTIONS)}, got {grid_direction!r}")
        if rung_clip < 1:
            raise ValueError(f"rung_clip must be >= 1, got {rung_clip}")
        if lr_unit not in GRID_LR_UNITS:
            raise ValueError(f"grid_lr_unit must be one of {', '.join(GRID_LR_UNITS)}, got {lr_unit!r}")
        super().__init__(param_groups, weights, seed, **adamw)
        self.rung_clip = rung_clip
        self.grid_direction = grid_direction
        self.lr_unit = lr_unit

    @torch.no_grad()
    def step(self, closure=None) -> StepCounts:
        self._run_closure(closure)
        self._plain_step()
        flips = updates = 0
        for group, params in self._geometry_groups():
            for param in params:
                weight = self.weight_of(param)
                adam = self.grid_direction == "adam"
                hyper = self.adam_hyper(group, self.count_step(param, second=adam), bias_corrected=adam,
                                        factor=lr_unit_factor(self.lr_unit, weight))
                moved, updated, blocked = self._move(param, weight, hyper)
                flips, updates = flips + moved, updates + updated
                if blocked:
                    weight.rescale(0.5, self.generator)
        return StepCounts(flips, updates)

    def _direction(self, param, hyper) -> torch.Tensor:
        if self.grid_direction == "adam":
            return self.adam_direction(param, hyper)
        return self.momentum_direction(param, hyper)

    def _proposal(self, direction, param, step_size, decay) -> torch.Tensor:
        """v = -(d step + w decay) rungs (native.c's order); 0/0 (a zero gradient with eps 0) or an
        overflowed direction never becomes a NaN weight."""
        proposed = -(direction * step_size + param * decay)
        return torch.nan_to_num_(proposed, nan=0.0, posinf=self.rung_clip, neginf=-self.rung_clip)

    def _intended(self, position, proposed, fmt) -> torch.Tensor:
        """The continuous target position: ``clamp(p + clip(v, ±rung_clip), ±top)``."""
        top = top_code(fmt)
        return (position + proposed.clamp(-self.rung_clip, self.rung_clip).double()).clamp_(-top, top)

    def _move(self, param, weight, hyper) -> tuple[int, int, bool]:
        """One tensor's rung moves: (flips, updates, whether the top end stopped a move)."""
        if not weight.stored:
            return self._move_master(param, weight, hyper)
        fmt, scale, state = weight.fmt, weight.forward_scale(), self.state[param]
        stochastic = weight.update_rounding == "stochastic"
        seed = draw_seed(self.generator, param.device) if stochastic else None
        tensors = (param, param.grad, state["exp_avg"], state.get("exp_avg_sq", param))
        compensation = weight.compensation
        if self.grid_direction == "adam" and not self.recording and compensation is None \
                and use_native("auto", native.fits_step(*tensors)):
            hyper = hyper + [float(scale), 1.0 / float(scale)]
            flips, updates, blocked = native.grid_step(param.data, *tensors[1:], hyper, fmt.emin, fmt.mantissa_bits,
                                                       top_code(fmt), self.rung_clip, _table(fmt), seed,
                                                       weight.sr_bits)
            return flips, updates, blocked > 0
        direction = self._direction(param, hyper)
        proposed = self._proposal(direction, param, hyper[6], hyper[7])
        before = rungs(param * scale, fmt)
        top = top_code(fmt)
        # where the move starts: the weight's rung, or with compensation the position of w + c
        start = before.double() if compensation is None else positions((param + compensation) * scale, fmt)
        after, target = self._land(before, proposed, seed, top, start, weight.sr_bits)
        inverse = 1.0 / scale
        if self.recording:
            # the intended step: the continuous move from the start (GridOptim on a master);
            # its decay part: the same move without weight decay subtracted from it, in weight units
            w = param.detach().clone()
            without = self._proposal(direction, param, hyper[6], 0.0)
            intended = values_at(self._intended(start, proposed, fmt), fmt)
            intended_without = values_at(self._intended(start, without, fmt), fmt)
            landed_without, _ = self._land(before, without, seed, top, start, weight.sr_bits)
            delta = (intended * inverse).float() - w
            decay = ((intended - intended_without) * inverse).float()
            landed = (values_of_rungs(after, fmt) - values_of_rungs(landed_without, fmt)) * inverse
            self._record(param, w, delta, decay, landed)
        if compensation is not None:  # Kahan: what the rungs could not hold of the intended position
            intended = values_at(self._intended(start, proposed, fmt), fmt)
            compensation.copy_((intended - values_of_rungs(after, fmt).double()) * inverse)
        param.copy_(values_of_rungs(after, fmt) * inverse)
        return int((after != before).sum()), int((param.grad != 0).sum()), bool((target.abs() > top).any())

    def _land(self, before, proposed, seed, top, start=None, sr_bits=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A stored weight's landing: ``floor(v + U)`` rungs (the random bits of ``seed``; with
        ``sr_bits``, `random_rungs`' few-bit rule) or ``round(v)`` (ties to even), clipped to
        ±rung_clip, stopped at ±top: (rungs after, target).
        With compensation the move starts at the continuous position ``start`` of w + c: the
        rounded quantity is ``start - before + clip(v, ±rung_clip)``, still at most rung_clip rungs."""
        if start is not None:
            offset = start - before.double()
            if bool((offset != 0).any()):
                proposed = (offset + proposed.clamp(-self.rung_clip, self.rung_clip).double()).float()
        if seed is not None:
            moves = random_rungs(proposed, seed, sr_bits)
        else:
            moves = torch.round(proposed)  # half to even
        moves = moves.clamp_(-self.rung_clip, self.rung_clip).to(torch.int32)
        target = before + moves
        return target.clamp(-top, top), target

    def master_scale(self, weight) -> float | torch.Tensor:
        """The scale of a master's grid for this step: its current amax scale, halved while the
        top code is occupied (``amax * s >= max``), so that a weight the top end stopped can grow
        on the next step, as a stored weight can after its rescale."""
        scale = weight.current_scale()
        amax = weight.param.detach().abs().amax()
        if isinstance(scale, float):
            amax = float(amax)
            while amax * scale >= weight.fmt.max and scale > 2.0**-126:
                scale *= 0.5
            return scale
        while bool(amax * scale >= weight.fmt.max) and bool(scale > 2.0**-126):
            scale = scale * 0.5
        return scale

    def _move_master(self, param, weight, hyper) -> tuple[int, int, bool]:
        """GridOptim on an FP32 master: the same proposal v, moved exactly (no rounding) along the
        continuous code position under this step's grid (`master_scale`), clipped to ±rung_clip,
        clamped at ±top; the fractions accumulate in the FP32 master. Flips: elements whose
        nearest code on this step's grid changed (``round(p)``; ties to even)."""
        fmt = weight.fmt
        scale = self.master_scale(weight)
        direction = self._direction(param, hyper)
        proposed = self._proposal(direction, param, hyper[6], hyper[7])
        position = positions(param * scale, fmt)
        target = self._intended(position, proposed, fmt)
        inverse = 1.0 / scale
        w = param.detach().clone() if self.recording else None
        moved = (proposed != 0) & (target != position)  # v = 0 leaves the master exactly as it is
        param.copy_(torch.where(moved, (values_at(target, fmt) * inverse).float(), param))
        if self.recording:
            without = self._proposal(direction, w, hyper[6], 0.0)
            decay = ((values_at(target, fmt) - values_at(self._intended(position, without, fmt), fmt))
                     * inverse).float()
            self._record(param, w, param.detach() - w, decay, decay)  # nothing is lost in landing
        flips = int((torch.round(target) != torch.round(position)).sum())
        return flips, int((param.grad != 0).sum()), False


@lru_cache(maxsize=None)
def _table(fmt) -> torch.Tensor:
    """Every finite non-negative value of the format by magnitude code (float32, CPU): the C lookup table."""
    return values_of_codes(torch.arange(top_code(fmt) + 1), fmt)
