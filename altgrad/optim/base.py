"""What the grid-aware optimizers share: torch's AdamW for plain parameters, Adam's moments for
format weights, a seeded random stream, and checkpoint state for all of it.

Parameter groups marked ``geometry: True`` hold weights with a format (`FormatWeight`); a
subclass steps them its own way (in ULPs, in rungs). Every other group (norms, biases,
embeddings and layers without a weight format) takes exactly torch's AdamW step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from .storage import FormatWeight


class GridAwareOptimizer(torch.optim.AdamW):
    """torch.optim.AdamW plus format weights: their storage scales and one seeded generator."""

    def __init__(self, param_groups: list[dict], weights: list[FormatWeight], seed: int, **adamw):
        super().__init__(param_groups, **adamw)
        self.weights = weights
        self._weight_of = {id(w.param): w for w in weights}
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

    def adam_hyper(self, group: dict, step: int, bias_corrected: bool = True) -> list[float]:
        """The scalars of one step (the layout the native kernels take, native.c): Adam's, the
        step size ``lr / (1 - beta1^t)`` (just ``lr`` for a direction without bias correction)
        and the decay ``lr * weight_decay``."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
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
