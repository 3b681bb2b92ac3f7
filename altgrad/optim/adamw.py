"""AdamW on format-stored weights (arms B and C of DESIGN §4): torch's AdamW step, then
``w <- Q(w + delta)`` onto the weight's grid with round-to-nearest (B: steps below half a grid
step are lost) or stochastic rounding (C: unbiased, the control for the geometry arms).

Arm A (FP32 masters) is plain ``torch.optim.AdamW``; the factory builds that one directly.
"""

from __future__ import annotations

import torch

from .base import GridAwareOptimizer


class StoredAdamW(GridAwareOptimizer):
    """AdamW whose format weights live on their grid (the update rounding is each weight's own)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        self._plain_step()  # every group: there is no geometry here, only storage
        for weight in self.weights:
            if weight.param.grad is not None:
                weight.project(self.generator)
        return loss
