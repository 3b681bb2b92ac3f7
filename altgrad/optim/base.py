"""What the grid-aware optimizers share: torch's AdamW for plain parameters, Adam's moments for
format weights, a seeded random stream, and checkpoint state for all of it.

Parameter groups marked ``geometry: True`` hold weights with a format (`FormatWeight`); a
subclass steps them its own way (in ULPs, in rungs). Every other group (norms, biases,
embeddings and layers without a weight format) takes exactly torch's AdamW step.

Step records (the update monitor's raw material, DESIGN §5.2): on a statistics step the
monitor sets ``recording``; each format weight's step then takes the torch code (bit-identical
to the native kernels, which cannot expose their intermediates) and leaves a `StepRecord`:
the step before it lands on the grid, its weight-decay part, and what of that part landed
under the weight's own landing rule. Steps that are not recorded do no extra work.
`StepRecorder` gives the same record for any optimizer, torch's AdamW included.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

from .storage import FormatWeight

#: grid_lr's unit for the geometry optimizers: ``ulp`` (ULPs or rungs per step) or ``binade``
#: (grid_lr * 2^M of them for a weight whose format has M mantissa bits: a fraction of a binade).
GRID_LR_UNITS = ("ulp", "binade")


def lr_unit_factor(unit: str, weight: FormatWeight) -> float:
    """What grid_lr is multiplied by for this weight now: 1 (``ulp``) or ``2^M`` of its current
    format (``binade``; exact, and read at step time: an emergency shift changes the format)."""
    if unit not in GRID_LR_UNITS:
        raise ValueError(f"grid_lr_unit must be one of {', '.join(GRID_LR_UNITS)}, got {unit!r}")
    return 2.0 ** weight.fmt.mantissa_bits if unit == "binade" else 1.0


class StepRecord(NamedTuple):
    """One weight's optimizer step, in weight units (float32 tensors of the weight's shape)."""

    before: torch.Tensor  # the weight before the step (stored: on its grid; a master: FP32)
    delta: torch.Tensor  # the optimizer's step before it lands on the grid (a master: its change)
    decay: torch.Tensor  # the decoupled weight decay's part of delta (zeros without weight decay)
    decay_landed: torch.Tensor  # Q(w + delta) - Q(w + delta - decay), Q the landing rule (identity: = decay)


def plain_record(group: dict, before: torch.Tensor, after: torch.Tensor) -> StepRecord:
    """The record of torch's AdamW step on an FP32 master (arm A, and plain groups): it lands
    nowhere (Q is the identity), its step is the master's change, and its decoupled decay is
    ``-lr * weight_decay * w`` (torch multiplies w by ``1 - lr * weight_decay`` first)."""
    decay = before * -(group["lr"] * group["weight_decay"])
    return StepRecord(before, after - before, decay, decay)


class StepRecorder:
    """The records of one step of any optimizer for chosen parameters: ``start`` before the step,
    ``finish`` after it (a dict by ``id(param)``; parameters without a gradient are absent).

    Format weights of a `GridAwareOptimizer` record themselves (its ``recording`` flag); every
    other parameter is stepped by torch's AdamW, whose record `plain_record` defines."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._plain: dict[int, tuple[dict, torch.Tensor, torch.Tensor]] = {}

    def start(self, params: Iterable[torch.Tensor]) -> None:
        own = getattr(self.optimizer, "_weight_of", {})
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        self._plain = {id(p): (group_of[id(p)], p, p.detach().clone()) for p in params
                       if id(p) not in own and id(p) in group_of and p.grad is not None}
        if isinstance(self.optimizer, GridAwareOptimizer):
            self.optimizer.recording = True
            self.optimizer.records = {}

    def finish(self) -> dict[int, StepRecord]:
        records: dict[int, StepRecord] = {}
        if isinstance(self.optimizer, GridAwareOptimizer):
            records |= self.optimizer.records
            self.optimizer.recording = False
            self.optimizer.records = {}
        for key, (group, param, before) in self._plain.items():
            records[key] = plain_record(group, before, param.detach().clone())
        self._plain = {}
        return records


class GridAwareOptimizer(torch.optim.AdamW):
    """torch.optim.AdamW plus format weights: their storage scales and one seeded generator."""

    def __init__(self, param_groups: list[dict], weights: list[FormatWeight], seed: int, **adamw):
        super().__init__(param_groups, **adamw)
        self.weights = weights
        self._weight_of = {id(w.param): w for w in weights}
        self.recording = False  # set for one step by `StepRecorder`: format weights leave a StepRecord
        self.records: dict[int, StepRecord] = {}
        # Stochastic update rounding and random rungs draw from here: reproducible, resumable.
        self.generator = torch.Generator().manual_seed(seed)

    def weight_of(self, param: torch.Tensor) -> FormatWeight:
        return self._weight_of[id(param)]

    @contextlib.contextmanager
    def _only(self, groups: list[dict]) -> Iterator[None]:
        """Let torch's AdamW.step see only ``groups``."""
        everything = self.param_groups
        self.param_groups = groups
        try:
            yield
        finally:
            self.param_groups = everything

    def _plain_step(self) -> None:
        """torch's AdamW step on the groups without geometry."""
        with self._only([g for g in self.param_groups if not g.get("geometry")]):
            super().step()

    def _geometry_groups(self) -> Iterator[tuple[dict, list[torch.Tensor]]]:
        for group in self.param_groups:
            if group.get("geometry"):
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    yield group, params

    def count_step(self, param: torch.Tensor, second: bool = True) -> int:
        """Create a parameter's Adam state on first use (as torch's) and count this step; returns the count."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            if second:
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        state["step"] += 1
        return int(state["step"])

    def adam_hyper(self, group: dict, step: int, bias_corrected: bool = True, factor: float = 1.0) -> list[float]:
        """The scalars of one step (the layout the native kernels take, native.c): Adam's, the
        step size ``lr / (1 - beta1^t)`` (just ``lr`` for a direction without bias correction)
        and the decay ``lr * weight_decay``, with ``lr`` the group's times ``factor`` (the unit of
        grid_lr, `lr_unit_factor`: a power of two, so both paths take the same exact scalars)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"] * factor
        return [beta1, 1 - beta1, beta2, 1 - beta2, 1 / math.sqrt(1 - beta2**step), group["eps"],
                lr / (1 - beta1**step) if bias_corrected else lr, lr * group["weight_decay"]]

    def adam_direction(self, param: torch.Tensor, hyper: list[float]) -> torch.Tensor:
        """``m / (sqrt(v_hat) + eps)`` of one parameter, its moments updated in place; times the
        step size it is Adam's step. The operation sequence of the native kernels (each op
        rounds once); mathematically torch's AdamW."""
        state, grad = self.state[param], param.grad
        beta1, c1, beta2, c2, inv_bias2_sqrt, eps = hyper[:6]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad * c1)
        exp_avg_sq.mul_(beta2).add_((grad * grad) * c2)
        # torch's float32 sqrt on CPU is within 0.5001 ulp, not correctly rounded; through float64 it is
        # (a float64 square root of a float32 rounds to the float32 one exactly), as C's sqrtf.
        root = exp_avg_sq.double().sqrt().float()
        return exp_avg / (root * inv_bias2_sqrt + eps)

    def momentum_direction(self, param: torch.Tensor, hyper: list[float]) -> torch.Tensor:
        """The gradient's momentum (EMA, beta1) over its RMS across the tensor: unitless, like Adam's."""
        exp_avg = self.state[param]["exp_avg"]
        exp_avg.mul_(hyper[0]).add_(param.grad * hyper[1])
        return exp_avg / torch.clamp(exp_avg.square().mean().sqrt(), min=1e-30)

    def _record(self, param: torch.Tensor, before: torch.Tensor, delta: torch.Tensor, decay: torch.Tensor,
                decay_landed: torch.Tensor) -> None:
        self.records[id(param)] = StepRecord(before, delta, decay, decay_landed)

    def _run_closure(self, closure: Callable | None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["altgrad"] = {"generator": self.generator.get_state(),
                            "weights": {w.name: w.state_dict() for w in self.weights}}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("altgrad")
        super().load_state_dict(state_dict)
        self.generator.set_state(extra["generator"])
        for weight in self.weights:
            weight.load_state_dict(extra["weights"][weight.name])
