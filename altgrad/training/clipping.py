"""Gradient clipping: one global norm, or per partition of layers that share a gradient format.

``grad_clip_mode: global`` (the default, nanoGPT's rule): every gradient is scaled by
``min(1, grad_clip / ||g||_2)``, one L2 norm over all parameters.

``grad_clip_mode: partition`` (DESIGN §4, failure handling): the weights of the quantized
layers that share a gradient format and scale policy form a *partition* and are clipped
together; every other parameter (norms, biases, embeddings, layers whose gradient stays in high
precision) keeps the global rule on its own L2 norm. A partition P with gradient format F is
clipped to the range F can represent under P's scale:

    s_P    = the power-of-two amax scale of P under its policy, from the largest gradient
             amax of P over the previous ``amax_history_len`` steps (delayed scaling; no scale,
             s_P = 1, for ``scaling: none``), with the policy's margin
    R_P    = max_F / s_P                  the largest gradient magnitude F represents under s_P
    c_P    = min(1, grad_clip * R_P / amax(g_P))        amax: the largest |element| of P's gradients

and every gradient of P is multiplied by c_P. The bound is on the max-norm, so in words: a
partition is clipped exactly when one of its gradients lies beyond what its format could
represent, were it cast with the scale its own recent history gives it, and then it is scaled
as a whole, so its direction is kept (the cast of an out-of-range value would saturate that
element alone and bend the direction). ``grad_clip`` is the bound in units of R_P (1: the top of
the range). Read plainly, this is a spike clip against the partition's recent gradient amax: with
power-of-two scales R_P lies between 1x and 2x that amax (times 2^margin), so the format enters
only through where its power-of-two grid puts the scale. The weight gradients clipped here are
the ones the optimizer reads; the gradient format's own cast is of the layer's output gradient.

Why this bound and not an L2 norm in the format's units: under per-tensor amax scaling a
constant factor on a gradient only moves its scale (by exactly that factor for a power of
two) and leaves its grid values as they were, so a bound measured against the scale of the
gradient being judged could never bind. What a format's range really limits is how far a
gradient can jump beyond the magnitudes its scale was set for, which is what the delayed
reference measures: a spike in one partition is cut back to its own format's range without
shrinking the gradients of the others (one global norm would shrink all of them, and in a
narrow format a shrunken step is more often a stalled one). The first step of a partition has
no history and is not clipped; a non-finite step is not clipped (the trainer skips it) and
leaves the history alone.

Logged as ``grad/clip_factor/<partition>`` (partitions are named by their gradient format,
with the scale policy added where two share a format; the others are ``high_precision``), and
totalled in the run's summary (clipped steps and the smallest factor per partition).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..quantization.formats import FloatFormat
from ..quantization.scaling import ScalingConfig, scale_from_amax

CLIP_MODES = ("global", "partition")
HIGH_PRECISION = "high_precision"


def _norm(params: list[torch.Tensor], norm_type: float) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads, norm_type)) if grads else 0.0


def _scale(params: list[torch.Tensor], factor: float) -> None:
    if factor < 1.0:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)


@dataclass
class Partition:
    """The weights of the quantized layers that share one gradient format and scale policy."""

    name: str
    fmt: FloatFormat
    scaling: ScalingConfig
    params: list[torch.Tensor]
    history: list[float] = field(default_factory=list)  # gradient amax of the previous steps

    def range_top(self) -> float | None:
        """R_P: the largest gradient magnitude the format represents under the partition's scale
        (None before the first step of history)."""
        if self.scaling.mode == "none":
            return self.fmt.max
        if not self.history:
            return None
        reference = max(self.history[-self.scaling.history_len:])
        scale = float(scale_from_amax(torch.tensor(reference), self.fmt, self.scaling.margin,
                                      self.scaling.power_of_two))
        return self.fmt.max / scale

    def clip(self, grad_clip: float) -> float:
        """Clip this partition's gradients in place; returns the factor c_P."""
        amax = _norm(self.params, math.inf)
        if not math.isfinite(amax):
            return 1.0
        top = self.range_top()
        self.history = (self.history + [amax])[-self.scaling.history_len:]
        factor = min(1.0, grad_clip * top / amax) if top is not None and amax > 0 else 1.0
        _scale(self.params, factor)
        return factor


def _partitions(model: nn.Module) -> list[Partition]:
    """The quantized layers' weights grouped by (gradient format, scale policy), in model order."""
    groups: dict[tuple, Partition] = {}
    seen: set[int] = set()
    for layer in quantized_layers(model).values():
        config = layer.config
        if config.gradient is None or id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        key = (config.gradient, config.scaling)
        if key not in groups:
            groups[key] = Partition(config.gradient.name, config.gradient, config.scaling, [])
        groups[key].params.append(layer.weight)
    partitions = list(groups.values())
    names = [p.name for p in partitions]
    for partition in partitions:
        if names.count(partition.name) > 1:  # two policies share a format: name the policy too
            s = partition.scaling
            policy = s.mode + (str(s.history_len) if s.mode == "delayed" else "")
            partition.name += f"/{policy}" + (f"/margin{s.margin}" if s.margin else "") + \
                ("" if s.power_of_two else "/exact")
    return partitions


class GradientClipper:
    """Clips a model's gradients by ``mode``; call once per step, after backward."""

    def __init__(self, model: nn.Module, grad_clip: float, mode: str = "global"):
        if mode not in CLIP_MODES:
            raise ValueError(f"grad_clip_mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
        self.grad_clip = grad_clip
        self.mode = mode
        params = [p for p in model.parameters() if p.requires_grad]
        self.partitions = _partitions(model) if mode == "partition" else []
        owned = {id(p) for partition in self.partitions for p in partition.params}
        self.plain = [p for p in params if id(p) not in owned]
        self.totals: dict[str, dict[str, Any]] = {
            name: {"clipped_steps": 0, "min_factor": 1.0} for name in self._names()}

    def regroup(self, model: nn.Module) -> None:
        """Partitions anew after a layer's gradient format changed (an emergency shift): a partition
        that keeps its name keeps its history; totals are kept by name."""
        if self.mode != "partition":
            return
        history = {p.name: p.history for p in self.partitions}
        self.partitions = _partitions(model)
        for partition in self.partitions:
            partition.history = list(history.get(partition.name, []))
        owned = {id(p) for partition in self.partitions for p in partition.params}
        self.plain = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        for name in self._names():
            self.totals.setdefault(name, {"clipped_steps": 0, "min_factor": 1.0})

    def _names(self) -> Iterable[str]:
        return [p.name for p in self.partitions] + ([HIGH_PRECISION] if self.partitions and self.plain else [])

    def __call__(self) -> tuple[float, dict[str, float]]:
        """(the L2 norm of all gradients before clipping, the clip factor of each partition)."""
        if self.grad_clip <= 0:
            return _norm(self.plain + [p for partition in self.partitions for p in partition.params], 2.0), {}
        if not self.partitions:
            return float(torch.nn.utils.clip_grad_norm_(self.plain, self.grad_clip)), {}
        squares = [_norm(p.params, 2.0) ** 2 for p in self.partitions]
        factors = {p.name: p.clip(self.grad_clip) for p in self.partitions}
        if self.plain:  # the global rule, torch's, on the rest
            plain_norm = float(torch.nn.utils.clip_grad_norm_(self.plain, self.grad_clip))
            squares.append(plain_norm**2)
            factors[HIGH_PRECISION] = min(1.0, self.grad_clip / (plain_norm + 1e-6))  # torch's factor
        for name, factor in factors.items():
            if factor < 1.0:
                self.totals[name]["clipped_steps"] += 1
                self.totals[name]["min_factor"] = min(self.totals[name]["min_factor"], factor)
        return math.sqrt(sum(squares)), factors

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: dict(totals) for name, totals in self.totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {p.name: list(p.history) for p in self.partitions},
                "totals": self.summary()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for partition in self.partitions:
            partition.history = list(state["history"].get(partition.name, []))
        for name, totals in state["totals"].items():  # partitions of earlier formats too (a shift moved them)
            self.totals[name] = dict(totals)
