"""ManifoldAdamW (DESIGN §4, arm D): AdamW whose step is measured in ULPs of the weight's format.

For a weight with a format, the AdamW step (after Adam's normalisation, weight decay included)
is multiplied by the local stiffness ``S(w) = 2^(floor(log2 |w s|) - M) / s``, the grid
spacing at w under the tensor's scale s (the smallest spacing at w = 0; capped by
``max_stiffness``)::

    delta = -lr * S(w) * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)

(computed as ``-(m / (sqrt(v_hat) + eps) * step_size + w * lr * weight_decay) * S(w)`` with
``step_size = lr / (1 - beta1^t)``, the same ops in the native kernel and the torch code)

so ``lr`` is in ULPs per step and every weight moves about the same number of codes: a
multiplicative update, like Madam's. With ``lr_unit="binade"`` (config ``grid_lr_unit``) lr is
multiplied by ``2^M`` of the weight's current format, so the step is
``lr * 2^floor(log2 |w s|) / s`` times Adam's direction: the same for every mantissa width (the
binade floored at the format's emin, as S is), and one sweep range serves every format. Scaling the *gradient* by S instead would be almost
undone by Adam's normalisation (the tests show that variant fails the definition).
Format-stored weights then round ``w + delta`` onto their grid (their update rounding; with
compensated storage, ``w + delta + c``, `FormatWeight.store`);
FP32-master weights take ``w + delta``. Parameters without a format take torch's AdamW step,
with their own (absolute) learning rate. On E0M7 and E1M6 S is constant, so this is AdamW with
a rescaled learning rate: a built-in sanity check.
"""

from __future__ import annotations

import math

import torch

from ..quantization import native
from ..quantization.kernel import use_native
from .base import GRID_LR_UNITS, GridAwareOptimizer, lr_unit_factor


class ManifoldAdamW(GridAwareOptimizer):
    def __init__(self, param_groups, weights, seed, max_stiffness: float | None = None, lr_unit: str = "ulp",
                 **adamw):
        if lr_unit not in GRID_LR_UNITS:
            raise ValueError(f"grid_lr_unit must be one of {', '.join(GRID_LR_UNITS)}, got {lr_unit!r}")
        super().__init__(param_groups, weights, seed, **adamw)
        self.max_stiffness = max_stiffness
        self.lr_unit = lr_unit

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        self._plain_step()
        cap = math.inf if self.max_stiffness is None else self.max_stiffness
        for group, params in self._geometry_groups():
            for param in params:
                weight = self.weight_of(param)
                hyper = self.adam_hyper(group, self.count_step(param), factor=lr_unit_factor(self.lr_unit, weight))
                state = self.state[param]
                if self.recording:  # the torch code (bit-identical), keeping its parts
                    self._recorded_step(param, weight, hyper)
                    continue
                if use_native("auto", native.fits_step(param, param.grad, state["exp_avg"], state["exp_avg_sq"])):
                    fmt, scale = weight.fmt, weight.current_scale()
                    native.manifold_step(param.data, param.grad, state["exp_avg"], state["exp_avg_sq"],
                                         hyper + [float(scale), 1.0 / float(scale), cap], fmt.emin, fmt.mantissa_bits,
                                         max(int(fmt.exponents[-1]), fmt.emin))
                else:
                    stiffness = weight.stiffness(self.max_stiffness)  # at w before the step
                    direction = self.adam_direction(param, hyper)
                    step_size, decay = hyper[6], hyper[7]
                    param.sub_((direction * step_size + param * decay) * stiffness)
                if weight.stored:
                    weight.store(self.generator)  # w + delta (+ compensation) onto the grid, its update rounding
        return loss

    def _recorded_step(self, param, weight, hyper) -> None:
        """The torch step above with its parts kept: delta, its decay part and what of that landed."""
        before = param.detach().clone()
        stiffness = weight.stiffness(self.max_stiffness)
        direction = self.adam_direction(param, hyper)
        decay = param * hyper[7]
        update = (direction * hyper[6] + decay) * stiffness
        decay = decay * stiffness  # the decay part of the step is -decay
        param.sub_(update)
        if not weight.stored:  # a master takes w + delta (its change is the step): nothing is lost in landing
            self._record(param, before, param.detach() - before, -decay, -decay)
            return
        without_decay = param.detach() + decay
        landed_state = self.generator.get_state()
        if weight.compensation is not None:  # what is rounded: the sum with the compensation
            without_decay = without_decay + weight.compensation
        weight.store(self.generator)
        landed = param.detach() - weight.land(without_decay, landed_state)
        self._record(param, before, -update, -decay, landed)
