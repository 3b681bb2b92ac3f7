"""Rank health (DESIGN §3): stable rank, effective rank and spectral norm of every Linear weight,
every ``rank_interval`` steps, on the weight the forward pass really uses.

For a quantized layer that is the on-grid weight (the stored one, or a master's cast at its
scale with the run's weight rounding; a stochastic cast uses one fixed draw); other layers use
the FP32 weight. Singular values come from
``torch.linalg.svdvals`` in float32. Names: ``rank/stable/<layer>`` = ||W||_F^2 / sigma_1^2,
``rank/effective/<layer>`` = exp(H(p)), p_i = sigma_i / sum(sigma) (Roy & Vetterli 2007),
``rank/spectral_norm/<layer>`` = sigma_1, and the means over layers ``rank/stable`` and
``rank/effective``.

A warning (``rank_drop/<layer>``) is raised when a layer's effective rank falls more than
``rank_threshold`` (relative) below its highest value over the trailing ``window`` steps;
layers matching ``critical_layers`` warn at ``rank_threshold * critical_threshold_multiplier``,
and their warnings are marked critical. Drops are judged from step ``settle`` on (the end of the
first window, or of warmup if later), and the window holds only measurements from there.

Why not against step 0 (the rule before): every healthy run leaves its random initialisation's
rank in its early phase, so a step-0 reference warned on nearly every run. Measured on the small
preset (2000 steps, rank every 100) over the default BF16 run (lr 1e-3, built-in corpus: six
layers warned, five critical, under the step-0 rule) and 132 tuning runs of the EurLex matrix
(BF16, E3M4, E4M3, E5M2, E7M0; arms A, C, C-kahan, ECO, D, Dm, E, Em; lr 0.002-0.016, grid_lr
0.05-0.4): the step-0 rule warned on 126 of the 127 runs that record step-0 values. This rule
(window a quarter of training) warns on 6: five whose loss degraded (the geometry arms at grid_lr
0.4, final val 1.57-2.39), where an MLP layer's rank fell by a third to a half within 500 steps
(95.7 to 46.1 at worst), and one at the margin (E3M4 Em grid_lr 0.2, val 1.394: an attn.c_proj
15.6% against the critical 15%). In the six BF16 runs the largest fall is 11.6% (bound 30%) and
11.5% for a critical layer (bound 15%); the default run's 9.8% (lm_head). What this rule cannot see
is a collapse inside the first window: that is told apart from healthy restructuring only against
a reference run (``altgrad compare``'s rank vs ref). Step-0 values are still measured when the
monitor is built, before any update, and reported in the summary; the window's measurements are kept in checkpoints.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from ...quantization.linear import QuantizedLinear
from ...quantization.quantize import quantize
from ...quantization.scaling import scale_from_amax
from .base import BaseMonitor, StepContext, layer_mean

#: Every name this monitor logs (<layer>: every Linear layer).
METRICS: dict[str, str] = {
    "rank/stable/<layer>": "stable rank ||W||_F^2 / sigma_1^2 of the forward weight (NaN when all zero)",
    "rank/effective/<layer>": "effective rank exp(H(p)), p_i = sigma_i / sum(sigma) (NaN when all zero)",
    "rank/spectral_norm/<layer>": "largest singular value sigma_1",
    "rank/stable": "stable rank; mean over layers",
    "rank/effective": "effective rank; mean over layers",
}


def forward_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight the forward pass computes with, in weight units (float32)."""
    weight = layer.weight.detach().float()
    if not isinstance(layer, QuantizedLinear) or layer.weight_format is None:
        return weight
    if layer.quantizers["weight"].stored is not None:
        return weight
    scale = layer.weight_scale
    if scale is None:  # before the first forward: the scale current scaling would choose
        scale = scale_from_amax(weight.abs().amax(), layer.weight_format, layer.config.scaling.margin)
    rounding = layer.config.rounding  # the run's own weight rounding; stochastic: one fixed draw
    generator = torch.Generator().manual_seed(0) if rounding == "stochastic" else None
    return quantize(weight * scale, layer.weight_format, rounding=rounding, generator=generator,
                    sr_bits=layer.config.sr_bits) / scale


def rank_measures(weight: torch.Tensor) -> dict[str, float]:
    """Stable rank, effective rank and spectral norm of a 2-D tensor (NaN for an all-zero one)."""
    weight = weight.float()
    # W and W^T have the same singular values; LAPACK is 2x faster on the tall one (512x128: 2 ms
    # against 4.5 ms for 128x512 on CPU)
    sigma = torch.linalg.svdvals(weight if weight.shape[0] >= weight.shape[-1] else weight.T)
    top, total = float(sigma[0]), float(sigma.sum())
    if top == 0 or not math.isfinite(total):
        return {"stable": math.nan, "effective": math.nan, "spectral_norm": top}
    p = sigma / total
    entropy = -float((p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum())
    return {"stable": float(sigma.square().sum()) / top**2, "effective": math.exp(entropy), "spectral_norm": top}


class RankMonitor(BaseMonitor):
    name = "rank"

    def __init__(self, model: nn.Module, interval: int, threshold: float, critical_layers: tuple[str, ...],
                 critical_multiplier: float, window: int, settle: int = 0):
        super().__init__(interval)
        self.window, self.settle = max(1, window), max(settle, window)
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, layer -> effective rank) in the window
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.threshold = threshold
        self.critical = {name for name in self.layers if any(fnmatch.fnmatchcase(name, p) for p in critical_layers)}
        self.critical_multiplier = critical_multiplier
        self.initial = {name: rank_measures(forward_weight(layer))["effective"] for name, layer in self.layers.items()}

    def after_update(self, ctx: StepContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, layer in self.layers.items():
            for key, value in rank_measures(forward_weight(layer)).items():
                metrics[f"rank/{key}/{name}"] = value
        for key in ("stable", "effective"):
            metrics[f"rank/{key}"] = layer_mean(metrics[f"rank/{key}/{name}"] for name in self.layers)
        self.observe(ctx.step, {name: metrics[f"rank/effective/{name}"] for name in self.layers})
        return metrics

    def observe(self, step: int, ranks: dict[str, float]) -> None:
        """Keep a measurement in the window (from ``settle`` on), dropping those it left behind."""
        if step >= self.settle:
            self.history = [(t, r) for t, r in self.history if t >= step - self.window] + [(step, dict(ranks))]

    def reference(self, name: str, step: int) -> float | None:
        """The layer's highest finite effective rank in the window ending at ``step``."""
        values = [ranks[name] for t, ranks in self.history
                  if step - self.window <= t <= step and math.isfinite(ranks.get(name, math.nan))]
        return max(values) if values else None

    def bound(self, name: str) -> float:
        """The relative drop that warns for this layer."""
        return self.threshold * (self.critical_multiplier if name in self.critical else 1.0)

    def alerts(self, record: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        judged: dict[str, dict[str, Any] | None] = {}
        step = record.get("step")
        if not isinstance(step, int) or step < self.settle:
            return judged
        for name in self.layers:
            value, top = record.get(f"rank/effective/{name}"), self.reference(name, step)
            if not isinstance(value, float) or top is None:
                continue
            drop = 1.0 - value / top
            critical = name in self.critical
            judged[f"rank_drop/{name}"] = None if not drop > self.bound(name) else {
                "value": value, "critical": critical,
                "message": (f"{'critical layer ' if critical else ''}{name}: effective rank {value:.1f} is "
                            f"{drop:.0%} below its highest {top:.1f} of the last {self.window} steps "
                            f"(threshold {self.bound(name):.0%})")}
        return judged

    def summary(self) -> dict[str, Any]:
        return {name: {"effective_rank_step0": value} for name, value in self.initial.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self.initial), "history": [[step, dict(ranks)] for step, ranks in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial.update(state["initial"])
        self.history = [(int(step), dict(ranks)) for step, ranks in state.get("history", [])]  # older: none
