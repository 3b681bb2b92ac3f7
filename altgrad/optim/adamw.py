"""AdamW on format-stored weights (arms B and C of DESIGN §4): AdamW's step, then
``w <- Q(w + delta)`` onto the weight's grid with round-to-nearest (B: steps below half a grid
step are lost) or stochastic rounding (C: unbiased, the control for the geometry arms); with
compensated storage (C-kahan) the weight's buffer is added before rounding and keeps what the
grid could not hold (`FormatWeight.store`).

The stored weights take the step in the operation order of ManifoldAdamW (one fused native
pass on CPU), so that arm C and arm D differ by nothing but the stiffness S(w); other
parameters take torch's AdamW. Arm A (FP32 masters) is plain ``torch.optim.AdamW``; the
factory builds that one directly. ECO (eco.py) is this step with its rounding error fed back
into the first moment (`landed`).
"""

from __future__ import annotations

import torch

from ..quantization import native
from ..quantization.kernel import use_native
from .base import GridAwareOptimizer


class StoredAdamW(GridAwareOptimizer):
    """AdamW whose format weights live on their grid (the update rounding is each weight's own)."""

    #: whether `landed` needs ``w + delta`` before it was rounded (a copy per weight and step)
    keeps_intended = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        self._plain_step()
        for group, params in self._geometry_groups():
            for param in params:
                step = self.count_step(param)
                hyper = self.adam_hyper(group, step)
                state = self.state[param]
                weight = self.weight_of(param)
                if self.recording:  # the torch code (bit-identical), keeping its parts
                    before, decay = param.detach().clone(), param * hyper[7]
                    update = self.adam_direction(param, hyper) * hyper[6] + decay
                    param.sub_(update)
                    without_decay = param.detach() + decay  # w + delta - (its decay part, -decay)
                    intended = param.detach().clone() if self.keeps_intended else None
                    landed_state = self.generator.get_state()
                    if weight.compensation is not None:  # what is rounded: the sum with the compensation
                        without_decay = without_decay + weight.compensation
                    weight.store(self.generator)  # w + delta (+ compensation) onto the grid
                    # Q of the step without its decay, at the projection's scale with its random bits
                    landed = param.detach() - weight.land(without_decay, landed_state)
                    self._record(param, before, -update, -decay, landed)
                    self.landed(group, param, step, intended)
                    continue
                if use_native("auto", native.fits_step(param, param.grad, state["exp_avg"], state["exp_avg_sq"])):
                    native.adam_step(param.data, param.grad, state["exp_avg"], state["exp_avg_sq"], hyper)
                else:
                    param.sub_(self.adam_direction(param, hyper) * hyper[6] + param * hyper[7])
                intended = param.detach().clone() if self.keeps_intended else None
                weight.store(self.generator)  # w + delta (+ compensation) onto the grid
                self.landed(group, param, step, intended)
        return loss

    def landed(self, group: dict, param: torch.Tensor, step: int, intended: torch.Tensor | None) -> None:
        """After ``param`` landed on its grid (``intended``: w + delta before rounding, when kept):
        nothing here; ECO feeds the rounding error back."""
