"""What discreteness does to a run (DESIGN §3): per-step quantization statistics of every
QuantizedLinear, bit-stall around the optimizer step, dead input units, and threshold alerts.

Statistics are gathered on "stats steps" only (every ``stats_interval`` steps): they need
extra reductions, and on a GPU a host sync. Metric names are stable, for metrics.jsonl and W&B:

- ``quant/{overflow_rate,underflow_rate,dynamic_range_used,snr_db}`` overall, ``/<kind>`` for
  weight, activation and gradient, and overflow/underflow ``/<kind>/<layer>`` per layer;
- ``grad_snr_db/<layer>``: signal-to-quantization-noise ratio of the layer's output gradient;
- ``quant/bit_stall_rate`` (and ``/<layer>``): updates (non-zero gradient) whose quantized
  weight did not change in the optimizer step; ``quant/flip_rate``: weights whose quantized
  value changed; ``quant/zero_update_rate``: weights whose FP32 master did not change at all;
- ``quant/dead_fraction`` (and ``/<layer>``): input units of a layer that were exactly zero
  after quantization for every token over the last ``dead_window`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..quantization.linear import OPERANDS
from ..quantization.scaling import QuantStats
from ..quantization.stall import count_flips


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _rates(stats: list[QuantStats], suffix: str = "") -> dict[str, float]:
    """Element-weighted overflow and underflow rates of a group of casts."""
    numel = sum(s.numel for s in stats)
    return {f"quant/overflow_rate{suffix}": sum(s.overflow for s in stats) / numel,
            f"quant/underflow_rate{suffix}": sum(s.underflow for s in stats) / numel}


def summarize_stats(per_layer: dict[str, dict[str, list[QuantStats]]]) -> dict[str, float]:
    """Overall, per-kind and per-layer metrics from the QuantStats of one stats step."""
    out: dict[str, float] = {}
    everything: list[QuantStats] = []
    for kind in OPERANDS:
        kind_stats = [s for layer in per_layer.values() for s in layer.get(kind, [])]
        if not kind_stats:
            continue
        everything += kind_stats
        out |= _rates(kind_stats, f"/{kind}")
        out[f"quant/dynamic_range_used/{kind}"] = _mean([s.dynamic_range_used for s in kind_stats])
        snr = _mean([s.snr_db for s in kind_stats])
        if snr is not None:
            out[f"quant/snr_db/{kind}"] = snr
        for name, layer in per_layer.items():
            stats = layer.get(kind, [])
            if stats:
                out |= _rates(stats, f"/{kind}/{name}")
                if kind == "gradient":
                    signal, noise = sum(s.signal for s in stats), sum(s.noise for s in stats)
                    if noise > 0 and signal > 0:
                        out[f"grad_snr_db/{name}"] = 10.0 * math.log10(signal / noise)
    if everything:
        out |= _rates(everything)
        out["quant/dynamic_range_used"] = _mean([s.dynamic_range_used for s in everything])
    return out


@dataclass(frozen=True)
class Thresholds:
    overflow: float
    underflow: float
    bit_stall: float
    grad_cos: float

    def _checks(self):
        return [
            ("overflow", "quant/overflow_rate", lambda v: v > self.overflow, f"> {self.overflow:g}"),
            ("underflow", "quant/underflow_rate", lambda v: v > self.underflow, f"> {self.underflow:g}"),
            ("bit_stall", "quant/bit_stall_rate", lambda v: v > self.bit_stall, f"> {self.bit_stall:g}"),
            ("grad_cos", "grad_cos_sim/mean", lambda v: v < self.grad_cos, f"< {self.grad_cos:g}"),
        ]

    def measured(self, name: str, metrics: dict[str, Any]) -> bool:
        return any(key in metrics for check, key, _, _ in self._checks() if check == name)

    def crossed(self, metrics: dict[str, Any]) -> dict[str, tuple[float, str]]:
        """Alerts raised by one record: name -> (value, message)."""
        alerts = {}
        for name, key, bad, bound in self._checks():
            value = metrics.get(key)
            if isinstance(value, float) and math.isfinite(value) and bad(value):
                alerts[name] = (value, f"{key} = {value:.4g} {bound}")
        return alerts


class QuantMonitor:
    """Collects the metrics above from a model after surgery (a no-op without quantized layers)."""

    def __init__(self, model: nn.Module, dead_window: int):
        self.layers = quantized_layers(model)
        self.dead_window = dead_window
        self.alive: dict[str, torch.Tensor] = {}
        self.window_began = 0
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def collect(self, on: bool) -> None:
        """Switch statistics gathering on (for the next forward/backward) or off."""
        for layer in self.layers.values():
            for quantizer in layer.quantizers.values():
                quantizer.collecting = on

    def quantization_metrics(self, step: int) -> dict[str, float]:
        """The statistics gathered since `collect(True)`, and the dead-unit fractions when a window ends."""
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
        if self.alive and step - self.window_began >= self.dead_window:
            dead = {name: 1.0 - float(alive.float().mean()) for name, alive in self.alive.items()}
            metrics.update({f"quant/dead_fraction/{name}": value for name, value in dead.items()})
            units = sum(alive.numel() for alive in self.alive.values())
            metrics["quant/dead_fraction"] = sum(int((~a).sum()) for a in self.alive.values()) / units
            self.alive, self.window_began = {}, step
        return metrics

    def before_step(self) -> None:
        """Remember the quantized layers' weights and which elements get an update."""
        self._before = {}
        for name, layer in self.layers.items():
            weight = layer.quantizers["weight"]
            if weight.fmt is not None and layer.weight.grad is not None and weight.last_scale is not None:
                self._before[name] = (layer.weight.detach().clone(), layer.weight.grad != 0)

    def after_step(self) -> dict[str, float]:
        """Bit-stall, flip and zero-update rates of the step just taken (same scale before and after)."""
        metrics: dict[str, float] = {}
        updates = flips = unchanged = numel = 0
        for name, (before, updated) in self._before.items():
            layer = self.layers[name]
            quantizer = layer.quantizers["weight"]
            after = layer.weight.detach()
            count = count_flips(before, after, quantizer.fmt, quantizer.last_scale, updated=updated)
            metrics[f"quant/bit_stall_rate/{name}"] = count.stall_ratio
            updates, flips = updates + count.updates, flips + count.flips
            unchanged += int((after == before).sum())
            numel += before.numel()
        self._before = {}
        if numel:
            metrics["quant/bit_stall_rate"] = 1.0 - flips / updates if updates else 0.0
            metrics["quant/flip_rate"] = flips / numel
            metrics["quant/zero_update_rate"] = unchanged / numel
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"alive": dict(self.alive), "window_began": self.window_began}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alive, self.window_began = dict(state["alive"]), int(state["window_began"])
