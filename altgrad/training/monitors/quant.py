"""What the casts do (DESIGN §3): overflow, underflow, dynamic range and SNR of every operand
cast of every QuantizedLinear, and dead input units, on every ``stats_interval``-th step.

Statistics need extra reductions (and on a GPU a host sync), so they are gathered on those
steps only. Names (metrics.jsonl and W&B):

- per layer: ``quant/{overflow,underflow}_rate/<kind>/<layer>`` (kind: weight, activation,
  gradient; the rate is over that cast's elements) and ``grad_snr_db/<layer>``;
- headlines, the **mean over layers** (each layer once): ``quant/{overflow,underflow}_rate``
  (a layer's rate over all its casts' elements) and ``/<kind>``; beside them the
  element-weighted rates ``quant/{overflow,underflow}_rate_elementwise`` (and ``/<kind>``),
  which at a GPT-2 vocabulary are mostly the tied lm_head's; ``quant/dynamic_range_used`` (and
  ``/<kind>``) and ``quant/snr_db/<kind>`` (each layer's from its summed signal and noise
  energies): means over layers;
- ``quant/dead_fraction_sampled`` (and ``/<layer>``): input units of a layer that were exactly
  zero after quantization in every token of every *sampled* (stats) step of the last
  ``dead_window`` steps; the headline is the mean over layers. Steps between samples are not
  observed, hence the name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...model.surgery import quantized_layers
from ...quantization.linear import OPERANDS
from ...quantization.scaling import QuantStats
from .base import BaseMonitor, StepContext, layer_mean, ratio

#: Every name this monitor logs (<layer>: a quantized layer; <kind>: weight, activation, gradient).
METRICS: dict[str, str] = {
    "quant/overflow_rate": "overflowed (saturated) elements over a layer's cast elements; mean over layers",
    "quant/overflow_rate/<kind>": "the same for one operand kind; mean over layers",
    "quant/overflow_rate/<kind>/<layer>": "overflowed elements of one layer's cast of that operand",
    "quant/overflow_rate_elementwise": "overflowed elements over all cast elements (element-weighted)",
    "quant/overflow_rate_elementwise/<kind>": "the same for one operand kind (element-weighted)",
    "quant/underflow_rate": "non-zero elements that cast to zero, over a layer's cast elements; mean over layers",
    "quant/underflow_rate/<kind>": "the same for one operand kind; mean over layers",
    "quant/underflow_rate/<kind>/<layer>": "underflowed elements of one layer's cast of that operand",
    "quant/underflow_rate_elementwise": "underflowed elements over all cast elements (element-weighted)",
    "quant/underflow_rate_elementwise/<kind>": "the same for one operand kind (element-weighted)",
    "quant/dynamic_range_used": "fraction of the format's binades the scaled values span; mean over layers",
    "quant/dynamic_range_used/<kind>": "the same for one operand kind; mean over layers",
    "quant/snr_db/<kind>": "10 log10(signal / quantization noise energy) of a layer's casts; mean over layers "
                           "(absent when every layer is exact or has no signal)",
    "grad_snr_db/<layer>": "SNR in dB of one layer's gradient cast (absent when exact)",
    "quant/dead_fraction_sampled": "input units zero after quantization in every sampled step of the last "
                                   "dead_window steps; mean over layers",
    "quant/dead_fraction_sampled/<layer>": "the same for one layer",
}


def _counts(stats: list[QuantStats]) -> tuple[int, int, int]:
    return sum(s.overflow for s in stats), sum(s.underflow for s in stats), sum(s.numel for s in stats)


def _rates(per_layer: dict[str, list[QuantStats]], suffix: str) -> dict[str, float]:
    """Layer-mean headline and element-weighted rates of overflow and underflow."""
    counts = {name: _counts(stats) for name, stats in per_layer.items() if stats}
    if not counts:
        return {}
    over, under, numel = (sum(c[i] for c in counts.values()) for i in range(3))
    return {f"quant/overflow_rate{suffix}": layer_mean(ratio(o, n) for o, _, n in counts.values()),
            f"quant/underflow_rate{suffix}": layer_mean(ratio(u, n) for _, u, n in counts.values()),
            f"quant/overflow_rate_elementwise{suffix}": ratio(over, numel),
            f"quant/underflow_rate_elementwise{suffix}": ratio(under, numel)}


def _snr_db(stats: list[QuantStats]) -> float:
    """10 log10(signal / noise) over a layer's casts; inf when exact, NaN without signal."""
    signal, noise = sum(s.signal for s in stats), sum(s.noise for s in stats)
    if noise == 0:
        return math.inf if signal > 0 else math.nan
    return 10.0 * math.log10(signal / noise) if signal > 0 else math.nan


def summarize_stats(per_layer: dict[str, dict[str, list[QuantStats]]]) -> dict[str, float]:
    """Headline, per-kind and per-layer metrics from the QuantStats of one stats step. Every
    headline is a mean over layers (a layer's figure is over its own casts first)."""
    out: dict[str, float] = {}
    for kind in OPERANDS:
        by_layer = {name: stats for name, layer in per_layer.items() if (stats := layer.get(kind, []))}
        if not by_layer:
            continue
        out |= _rates(by_layer, f"/{kind}")
        out[f"quant/dynamic_range_used/{kind}"] = layer_mean(
            sum(s.dynamic_range_used for s in stats) / len(stats) for stats in by_layer.values())
        snr = {name: _snr_db(stats) for name, stats in by_layer.items()}
        if any(math.isfinite(value) for value in snr.values()):  # all exact (inf) or no signal: nothing to say
            out[f"quant/snr_db/{kind}"] = layer_mean(snr.values())
        for name, stats in by_layer.items():
            over, under, numel = _counts(stats)
            out[f"quant/overflow_rate/{kind}/{name}"] = over / numel
            out[f"quant/underflow_rate/{kind}/{name}"] = under / numel
            if kind == "gradient" and math.isfinite(snr[name]):
                out[f"grad_snr_db/{name}"] = snr[name]
    everything = {name: [s for stats in layer.values() for s in stats] for name, layer in per_layer.items()}
    everything = {name: stats for name, stats in everything.items() if stats}
    if everything:
        out |= _rates(everything, "")
        out["quant/dynamic_range_used"] = layer_mean(
            sum(s.dynamic_range_used for s in stats) / len(stats) for stats in everything.values())
    return out


class QuantStatsMonitor(BaseMonitor):
    """The cast statistics above, from a model after surgery (never due without quantized layers)."""

    name = "quant"

    def __init__(self, model: nn.Module, interval: int, dead_window: int):
        super().__init__(interval)
        self.layers = quantized_layers(model)
        self.dead_window = dead_window
        self.alive: dict[str, torch.Tensor] = {}
        self.window_began = 0

    def due(self, step: int) -> bool:
        return bool(self.layers) and super().due(step)

    def _collect(self, on: bool) -> None:
        for layer in self.layers.values():
            for quantizer in layer.quantizers.values():
                quantizer.collecting = on

    def before_forward(self, ctx: StepContext) -> None:
        self._collect(True)

    def after_backward(self, ctx: StepContext) -> dict[str, float]:
        self._collect(False)
        per_layer = {}
        for name, layer in self.layers.items():
            per_layer[name] = {kind: q.stats for kind, q in layer.quantizers.items() if q.stats}
            activation = layer.quantizers["activation"]
            if activation.alive is not None:
                seen = self.alive.get(name)
                self.alive[name] = activation.alive if seen is None else seen | activation.alive
            for quantizer in layer.quantizers.values():
                quantizer.stats, quantizer.alive = [], None
        metrics = summarize_stats(per_layer)
        if self.alive and ctx.step - self.window_began >= self.dead_window:
            dead = {name: 1.0 - float(alive.float().mean()) for name, alive in self.alive.items()}
            metrics.update({f"quant/dead_fraction_sampled/{name}": value for name, value in dead.items()})
            metrics["quant/dead_fraction_sampled"] = layer_mean(dead.values())
            self.alive, self.window_began = {}, ctx.step
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"alive": dict(self.alive), "window_began": self.window_began}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alive, self.window_began = dict(state["alive"]), int(state["window_began"])
