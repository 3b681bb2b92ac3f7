"""The FP32 gradient shadow as a monitor: every ``shadow_interval`` steps (see `training.shadow`)."""

from __future__ import annotations

from torch import nn

from ...model import GPTConfig
from ..shadow import GradientShadow
from .base import BaseMonitor, StepContext

#: Every name this monitor logs (see `training.shadow`; <layer>: every Linear layer with a gradient).
METRICS: dict[str, str] = {
    "grad_cos_sim/<layer>": "cosine similarity of the layer's weight gradient with the FP32 shadow's",
    "grad_rel_err/<layer>": "|g - g32| / |g32| of the layer's weight gradient (inf when g32 = 0)",
    "grad_cos_sim/mean": "gradient cosine similarity; mean over layers",
    "grad_rel_err/mean": "gradient relative error; mean over layers",
}


class ShadowMonitor(BaseMonitor):
    name = "shadow"
    needs_rng = True  # the shadow replays the step's dropout masks

    def __init__(self, model: nn.Module, model_config: GPTConfig, device, interval: int):
        super().__init__(interval)
        self.model = model
        self.shadow = GradientShadow(model_config, device)

    def after_backward(self, ctx: StepContext) -> dict[str, float]:
        return self.shadow.compare(self.model, ctx.batches, ctx.grad_accum, ctx.rng_state, ctx.average)
