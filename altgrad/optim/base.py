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

    def _moments(self, params: list[torch.Tensor], second: bool = True) -> tuple[list, list, int]:
        """Each parameter's Adam state (created on first use, as torch's) and the step count after this step."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if second:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        steps = int(self.state[params[0]]["step"])
        return ([self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params] if second else [], steps)

    def adam_directions(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adam's normalised step ``m_hat / (sqrt(v_hat) + eps)`` per parameter, moments updated as torch's AdamW."""
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, step = self._moments(params)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(exp_avgs, denominators)
        torch._foreach_div_(directions, 1 - beta1**step)
        return directions

    def momentum_directions(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradient's momentum (EMA, beta1) over its RMS across the tensor: unitless, like Adam's."""
        beta1, _ = group["betas"]
        exp_avgs, _, _ = self._moments(params, second=False)
        torch._foreach_lerp_(exp_avgs, [p.grad for p in params], 1 - beta1)
        return [m / torch.clamp(m.square().mean().sqrt(), min=1e-30) for m in exp_avgs]

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
