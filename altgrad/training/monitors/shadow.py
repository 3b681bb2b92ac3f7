"""The FP32 gradient shadow as a monitor: every ``shadow_interval`` steps (see `training.shadow`)."""

from __future__ import annotations

from torch import nn

from ...model import GPTConfig
from ..shadow import GradientShadow
from .base import BaseMonitor, StepContext


class ShadowMonitor(BaseMonitor):
    name = "shadow"
    needs_rng = True  # the shadow replays the step's dropout masks

    def __init__(self, model: nn.Module, model_config: GPTConfig, device, interval: int):
        super().__init__(interval)
        self.model = model
        self.shadow = GradientShadow(model_config, device)

    def after_backward(self, ctx: StepContext) -> dict[str, float]:
        return self.shadow.compare(self.model, ctx.batches, ctx.grad_accum, ctx.rng_state)
