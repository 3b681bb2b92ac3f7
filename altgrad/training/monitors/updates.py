"""What the optimizer step does to the weights on their grid (DESIGN §3), per quantized layer
with a weight format, on every ``stats_interval``-th step.

The *on-grid* weight is the stored weight (``weight_storage: format``) or, for an FP32
master, its cast at the scale of this step's forward, with the run's weight rounding
(stochastic casts before and after the step share their random bits, so a flip is caused by
the update, not by the noise). With that:

- ``optim/updates/<layer>``: elements with a non-zero gradient; ``optim/update_rate/<layer>``;
- ``optim/flips/<layer>``: elements whose on-grid value changed, over **all** elements
  (momentum and weight decay move weights too); ``optim/flip_rate/<layer>``;
- ``optim/stall_ratio/<layer>`` = 1 - flips / updates (NaN when there were no updates; it
  can be negative when more weights flip than get gradients);
- ``quant/bit_stall_rate/<layer>``: updates whose on-grid value did not change, over updates
  (NaN without updates), i.e. the realised outcome of the run's own rounding;
- ``bit_position/{mean,std}/<layer>``: the magnitude code of each on-grid weight
  (0 .. 2^(E+M) - 1 per sign) after the step;
- ``optim/rescales/<layer>``: storage scale changes so far (format storage);
- the effective step sizes (DESIGN §5.2: arms compared at known step sizes), from the
  optimizer's own `optim.StepRecord` of the step (it records itself on these steps; torch's
  AdamW, which cannot, is recorded by its definition, `optim.plain_record`):
  ``optim/rel_update_intended/<layer>`` = RMS(delta) / RMS(w before), delta the optimizer's
  step before it lands on the grid (a master: its change; GridOptim stored: the continuous
  move of its master rule from the on-grid start);
  ``optim/rel_update_realized/<layer>`` = RMS(on-grid w after - on-grid w before) / RMS(on-grid
  w before);
  ``optim/decay_applied/<layer>`` = <Q(w + delta) - Q(w + delta - d), d> / <d, d>, d the
  decoupled weight decay's part of delta and Q the run's landing rule (the identity for an
  FP32 master, so exactly 1; the stored projection at its scale with the same random bits;
  GridOptim's rung landing with the same U): the fraction of the intended decay that landed.
  Each is NaN where undefined (w = 0 before the step; no weight decay), never 0;
- headlines: the mean over layers of each rate (``optim/update_rate``, ``optim/flip_rate``,
  ``optim/stall_ratio``, ``quant/bit_stall_rate``, ``optim/rel_update_intended``,
  ``optim/rel_update_realized``, ``optim/decay_applied``), the element-weighted ones beside the
  first four as ``..._elementwise``, and ``optim/rescales`` (the sum).

The run's summary gets, per layer, the totals over the measured steps: updates, flips,
stall ratio, the bit-position drift (mean code at the last measurement minus the first) and
the change of the weight's scale over the same span, as a power of two (after an emergency
format shift, both count from the first measurement in the new format). Read them together:
a code is an index *under the scale*, so a scale change by 2^k moves the code of every normal
value by k 2^M (a stored weight's rescales, a master's cast scale) without moving the weight.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

from ...model.surgery import quantized_layers
from ...optim import StepRecord, StepRecorder
from ...quantization import native
from ...quantization.codes import magnitude_codes
from ...quantization.formats import FloatFormat
from ...quantization.kernel import use_native
from ...quantization.linear import QuantizedLinear
from ...quantization.quantize import quantize
from .base import BaseMonitor, StepContext, layer_mean, ratio

#: Every name this monitor logs (<layer>: a quantized layer with a weight format).
METRICS: dict[str, str] = {
    "optim/updates/<layer>": "elements with a non-zero gradient this step",
    "optim/update_rate/<layer>": "updates over the layer's elements",
    "optim/update_rate": "update rate; mean over layers",
    "optim/update_rate_elementwise": "updates over all elements (element-weighted)",
    "optim/flips/<layer>": "elements whose on-grid value changed this step (over all elements)",
    "optim/flip_rate/<layer>": "flips over the layer's elements",
    "optim/flip_rate": "flip rate; mean over layers",
    "optim/flip_rate_elementwise": "flips over all elements (element-weighted)",
    "optim/stall_ratio/<layer>": "1 - flips / updates (NaN without updates; negative when more flip than update)",
    "optim/stall_ratio": "stall ratio; mean over layers (NaN layers left out)",
    "optim/stall_ratio_elementwise": "1 - all flips / all updates (element-weighted)",
    "quant/bit_stall_rate/<layer>": "updates whose on-grid value did not change, over updates (NaN without updates)",
    "quant/bit_stall_rate": "bit-stall rate; mean over layers (NaN layers left out)",
    "quant/bit_stall_rate_elementwise": "all stalled updates over all updates (element-weighted)",
    "bit_position/mean/<layer>": "mean magnitude code (0 .. 2^(E+M) - 1) of the on-grid weights after the step",
    "bit_position/std/<layer>": "standard deviation of those codes",
    "optim/rescales/<layer>": "storage scale changes so far (format storage only)",
    "optim/rescales": "storage scale changes so far, summed over layers (format storage only)",
    "optim/rel_update_intended/<layer>": "RMS(delta) / RMS(w) before the step, delta the optimizer's step before it "
                                         "lands on the grid (a master: its change); NaN for w = 0",
    "optim/rel_update_intended": "intended relative update; mean over layers (NaN layers left out)",
    "optim/rel_update_realized/<layer>": "RMS(change of the on-grid weight) / RMS(on-grid weight before the step); "
                                         "NaN for w = 0",
    "optim/rel_update_realized": "realized relative update; mean over layers (NaN layers left out)",
    "optim/decay_applied/<layer>": "fraction of the step's decoupled weight decay d that landed: "
                                   "<Q(w+delta) - Q(w+delta-d), d> / <d, d>, Q the run's landing rule (1 for FP32 "
                                   "masters); NaN without weight decay",
    "optim/decay_applied": "decay applied; mean over layers (NaN layers left out)",
}


def step_counts(before: torch.Tensor, after_scaled: torch.Tensor, scale, grad: torch.Tensor,
                fmt: FloatFormat) -> tuple[int, int, int, int, int]:
    """What one step did to a weight on its grid: (updates, flips, stalled, sum of the magnitude
    codes after the step, sum of their squares). ``before`` is the on-grid weight before the step
    in weight units, ``after_scaled`` the grid values after it under ``scale`` (a power of two).
    One native pass on CPU; the same integers from torch elsewhere."""
    inverse = 1.0 / float(scale)
    if use_native("auto", native.fits_step(before, after_scaled, grad)):
        return native.update_stats(before, after_scaled, inverse, grad, fmt.emin, fmt.mantissa_bits)
    updated, changed = grad != 0, before != after_scaled * inverse  # -0 and +0 are the same weight
    codes = magnitude_codes(after_scaled, fmt).long()
    return (int(updated.sum()), int(changed.sum()), int((updated & ~changed).sum()), int(codes.sum()),
            int((codes * codes).sum()))


def code_moments(code_sum: int, code_squares: int, n: int) -> tuple[float, float]:
    """Mean and standard deviation (n - 1 in the denominator; NaN for one element) of n codes
    from their exact integer sums."""
    if n < 2:
        return code_sum / n, float("nan")
    return code_sum / n, math.sqrt((n * code_squares - code_sum * code_sum) / (n * (n - 1)))  # exact integers


def _norm(x: torch.Tensor) -> float:
    """The L2 norm in float64. A parallel sum: its last bits follow the thread count (as the
    signal-to-noise ratios'), while everything the run computes stays bit for bit."""
    return float(torch.linalg.vector_norm(x.detach().double()))


def step_sizes(record: StepRecord, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """The intended and realized relative updates and the decay applied of one weight's step
    (see the module doc; RMS ratios are norm ratios: the element count cancels). ``before`` and
    ``after``: the on-grid weight before and after the step, in weight units."""
    decay = record.decay.double()
    return {"optim/rel_update_intended": ratio(_norm(record.delta), _norm(record.before)),
            "optim/rel_update_realized": ratio(_norm(after.double() - before.double()), _norm(before)),
            "optim/decay_applied": ratio(float((record.decay_landed.double() * decay).sum()),
                                         float((decay * decay).sum()))}


def _scaled_grid(layer: QuantizedLinear, scale, generator_seed: int) -> torch.Tensor:
    """The scaled grid values of the weight the forward pass uses under ``scale``."""
    weight = layer.weight.detach()
    if layer.quantizers["weight"].stored is not None:
        return weight * scale
    config = layer.config
    generator = torch.Generator().manual_seed(generator_seed) if config.rounding == "stochastic" else None
    return quantize(weight.float() * scale, layer.weight_format, rounding=config.rounding, generator=generator,
                    sr_bits=config.sr_bits)


def _on_grid(layer: QuantizedLinear, scale, generator_seed: int) -> torch.Tensor:
    """The on-grid weight in weight units under ``scale`` (a stored weight as it is)."""
    if layer.quantizers["weight"].stored is not None:
        return layer.weight.detach().clone()
    return _scaled_grid(layer, scale, generator_seed) / scale


class UpdateMonitor(BaseMonitor):
    name = "updates"

    def __init__(self, model: nn.Module, interval: int, optimizer: torch.optim.Optimizer | None = None):
        super().__init__(interval)
        self.layers = {name: layer for name, layer in quantized_layers(model).items() if layer.weight_format is not None}
        # the optimizer's step records give the step sizes (without an optimizer they are not logged)
        self.recorder = StepRecorder(optimizer) if optimizer is not None else None
        self.totals: dict[str, dict[str, Any]] = {
            name: {"updates": 0, "flips": 0, "stalled": 0, "first_position": None, "last_position": None,
                   "first_scale": None, "last_scale": None, "format": None}
            for name in self.layers}
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor, Any, int]] = {}

    def due(self, step: int) -> bool:
        return bool(self.layers) and super().due(step)

    def before_update(self, ctx: StepContext) -> None:
        self._before = {}
        for name, layer in self.layers.items():
            scale = layer.weight_scale
            if layer.weight.grad is None or scale is None:
                continue
            seed = (ctx.step * 1_000_003 + zlib.crc32(name.encode())) % 2**62
            before = _on_grid(layer, scale, seed)
            self._before[name] = (before, scale, seed)
        if self.recorder is not None:
            self.recorder.start([self.layers[name].weight for name in self._before])

    def after_update(self, ctx: StepContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        rates: dict[str, dict[str, float]] = {"optim/update_rate": {}, "optim/flip_rate": {},
                                              "optim/stall_ratio": {}, "quant/bit_stall_rate": {}}
        records = self.recorder.finish() if self.recorder is not None else {}
        sizes: dict[str, dict[str, float]] = {"optim/rel_update_intended": {}, "optim/rel_update_realized": {},
                                              "optim/decay_applied": {}}
        updates_all = flips_all = stalled_all = numel_all = 0
        rescales = 0
        for name, (before, scale, seed) in self._before.items():
            layer = self.layers[name]
            stored = layer.quantizers["weight"].stored
            scale = layer.weight_scale if stored is not None else scale  # a stored weight may rescale
            scaled = _scaled_grid(layer, scale, seed)  # after the step only the grid values are needed
            updates, flips, stalled, code_sum, code_squares = step_counts(
                before, scaled, scale, layer.weight.grad.detach(), layer.weight_format)
            numel = scaled.numel()
            position, spread = code_moments(code_sum, code_squares, numel)
            layer_rates = {"optim/update_rate": updates / numel, "optim/flip_rate": flips / numel,
                           "optim/stall_ratio": 1.0 - ratio(flips, updates),
                           "quant/bit_stall_rate": ratio(stalled, updates)}
            for key, value in layer_rates.items():
                metrics[f"{key}/{name}"] = value
                rates[key][name] = value
            record = records.get(id(layer.weight))
            if record is not None:
                for key, value in step_sizes(record, before, scaled / scale).items():
                    metrics[f"{key}/{name}"] = value
                    sizes[key][name] = value
            metrics |= {f"optim/updates/{name}": updates, f"optim/flips/{name}": flips,
                        f"bit_position/mean/{name}": position, f"bit_position/std/{name}": spread}
            if stored is not None:
                metrics[f"optim/rescales/{name}"] = int(stored.rescales)
                rescales += int(stored.rescales)
            totals = self.totals[name]
            totals["updates"] += updates
            totals["flips"] += flips
            totals["stalled"] += stalled
            totals["last_position"], totals["last_scale"] = position, float(layer.weight_scale)
            if totals["first_position"] is None or totals.get("format") != layer.weight_format.name:
                # codes of different formats do not compare: drift counts from the last format shift
                totals["first_position"], totals["first_scale"] = position, totals["last_scale"]
                totals["format"] = layer.weight_format.name
            updates_all, flips_all, stalled_all, numel_all = (updates_all + updates, flips_all + flips,
                                                              stalled_all + stalled, numel_all + numel)
        self._before = {}
        if not numel_all:
            return metrics
        metrics |= {key: layer_mean(values.values()) for key, values in rates.items()}
        metrics |= {key: layer_mean(values.values()) for key, values in sizes.items() if values}
        metrics |= {"optim/update_rate_elementwise": updates_all / numel_all,
                    "optim/flip_rate_elementwise": flips_all / numel_all,
                    "optim/stall_ratio_elementwise": 1.0 - ratio(flips_all, updates_all),
                    "quant/bit_stall_rate_elementwise": ratio(stalled_all, updates_all)}
        if any(layer.quantizers["weight"].stored is not None for layer in self.layers.values()):
            metrics["optim/rescales"] = rescales
        return metrics

    def summary(self) -> dict[str, Any]:
        """Per layer: totals over the measured steps."""
        out = {}
        for name, totals in self.totals.items():
            stored = self.layers[name].quantizers["weight"].stored
            first, last = totals["first_position"], totals["last_position"]
            out[name] = {"updates": totals["updates"], "flips": totals["flips"],
                         "stall_ratio": 1.0 - ratio(totals["flips"], totals["updates"]),
                         "bit_stall_rate": ratio(totals["stalled"], totals["updates"]),
                         "bit_position_drift": last - first if first is not None else float("nan"),
                         "scale_log2_change": (math.log2(totals["last_scale"] / totals["first_scale"])
                                               if first is not None else float("nan")),
                         "rescales": int(stored.rescales) if stored is not None else None}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"totals": {name: dict(t) for name, t in self.totals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, totals in state["totals"].items():
            self.totals[name] = {**self.totals.get(name, {}), **totals}
