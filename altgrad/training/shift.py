"""Emergency mantissa shift (DESIGN §4, failure handling): a layer that keeps failing in its
format moves, in the middle of the run, to the neighbouring format that fixes the failure.

``format_shift: true`` watches every quantized layer, its *forward* operands (weight and
activation, which shift together) and its *gradient* operand separately:

| trigger, ``shift_patience`` measurements in a row | side | move |
|---|---|---|
| overflow rate of the weight or activation cast > ``overflow_threshold`` | forward | one more exponent bit, one less mantissa bit (E3M4 -> E4M3) |
| overflow rate of the gradient cast > ``overflow_threshold`` | gradient | the same |
| a non-finite weight gradient in the layer (a skipped step) | forward and gradient | the same |
| bit-stall rate > ``bit_stall_threshold`` (weights stored in the format) | forward | one more mantissa bit, one less exponent bit (E5M2 -> E4M3) |

Overflow and bit-stall are measured on statistics steps (``stats_interval``); a non-finite
step is judged on every step. Bit-stall counts only for weights stored in the format: an FP32
master keeps what one step could not move, so its stall costs nothing. The new format is the
registry's format of that shape (E4M3 is OCP E4M3), or the IEEE-style default for a shape
outside it. An operand never returns to a format it has left (no oscillation between two
failures), and a move with no neighbour (E7M0 has no mantissa bit to give, E0M7 no exponent
bit) is reported once, as impossible.

A shift re-creates the layer's quantizers in place (`QuantizedLinear.reformat`), re-projects a
stored weight onto the new grid with its update rounding, and is an event: step, layer,
operands, old and new format and the reason, in metrics.jsonl (``format_shifts``), W&B, the live
display and ``summary.json``. The events are saved in checkpoints and replayed on resume, so a
resumed run knows the current format of every layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..quantization.formats import FloatFormat, FormatError, get_format
from ..quantization.linear import QuantizedLinear

SIDES = {"forward": ("weight", "activation"), "gradient": ("gradient",)}


def neighbour(fmt: FloatFormat, more: str) -> FloatFormat | None:
    """The format with one more ``exponent`` (or ``mantissa``) bit and one less of the other,
    or None when there is none."""
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    E, M = (E + 1, M - 1) if more == "exponent" else (E - 1, M + 1)
    if E < 0 or M < 0:
        return None
    try:
        return get_format(f"E{E}M{M}")
    except FormatError:  # e.g. beyond float32's range
        return None


def _worst(metrics: dict[str, Any], keys: list[str]) -> tuple[str, float] | None:
    """The largest finite measured value among ``keys`` (None when none was measured)."""
    measured = [(key, float(metrics[key])) for key in keys
                if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])]
    return max(measured, key=lambda item: item[1]) if measured else None


class FormatShifter:
    """Watches the layers' measurements and shifts formats (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, patience: int,
                 overflow_threshold: float, bit_stall_threshold: float):
        self.layers: dict[str, QuantizedLinear] = quantized_layers(model)
        self.optimizer = optimizer
        self.weight_of = {id(w.param): w for w in getattr(optimizer, "weights", [])}
        self.patience = patience
        self.overflow_threshold = overflow_threshold
        self.bit_stall_threshold = bit_stall_threshold
        self.streaks: dict[str, int] = {}  # "<layer>|<side>|<trigger>" -> measurements in a row
        self.events: list[dict[str, Any]] = []
        self.impossible: set[str] = set()  # "<layer>|<side>|<direction>" already reported

    # ---- judging ----------------------------------------------------------------------------
    def _judge(self, key: str, measured: tuple[str, float] | None, bound: float) -> tuple[str, float] | None:
        """Count a measurement against its bound; the measurement when the streak reached patience."""
        if measured is None:
            return None  # not measured this step: the streak neither grows nor breaks
        if measured[1] <= bound:
            self.streaks.pop(key, None)
            return None
        self.streaks[key] = self.streaks.get(key, 0) + 1
        return measured if self.streaks[key] >= self.patience else None

    def observe(self, step: int, metrics: dict[str, Any], applied: bool) -> list[dict[str, Any]]:
        """After a step (before its gradients are cleared): the shifts it triggered, applied."""
        events = []
        for name, layer in self.layers.items():
            config = layer.config
            wanted: dict[str, tuple[str, str]] = {}  # side -> (direction, reason)
            # a skipped step: is this layer's weight gradient one of the non-finite ones?
            finite = applied or layer.weight.grad is None or bool(torch.isfinite(layer.weight.grad).all())
            if self._judge(f"{name}|nonfinite", ("non-finite weight gradient", 0.0 if finite else 1.0), 0.5):
                reason = f"non-finite weight gradient, {self.patience} steps in a row"
                wanted = {"forward": ("exponent", reason), "gradient": ("exponent", reason)}
            for side, operands in SIDES.items():
                keys = [f"quant/overflow_rate/{op}/{name}" for op in operands if getattr(config, op) is not None]
                hit = self._judge(f"{name}|{side}|overflow", _worst(metrics, keys), self.overflow_threshold)
                if hit and side not in wanted:
                    operand = hit[0].split("/")[2]  # quant/overflow_rate/<operand>/<layer>
                    wanted[side] = ("exponent", f"{operand} overflow rate {hit[1]:.4g} > {self.overflow_threshold:g}, "
                                                f"{self.patience} measurements in a row")
            stored = layer.quantizers["weight"].stored is not None
            key = f"quant/bit_stall_rate/{name}"
            hit = self._judge(f"{name}|stall", _worst(metrics, [key]) if stored else None, self.bit_stall_threshold)
            if hit and "forward" not in wanted:
                wanted["forward"] = ("mantissa", f"bit-stall rate {hit[1]:.4g} > {self.bit_stall_threshold:g}, "
                                                 f"{self.patience} measurements in a row")
            for side, (direction, reason) in wanted.items():
                event = self._shift(step, name, side, direction, reason)
                if event is not None:
                    events.append(event)
        return events

    # ---- shifting ---------------------------------------------------------------------------
    def _history(self, name: str, operand: str) -> set[str]:
        """The formats an operand has held (the original and every shift's old format)."""
        return {event["from"][operand] for event in self.events if event["layer"] == name and operand in event["from"]}

    def _shift(self, step: int, name: str, side: str, direction: str, reason: str) -> dict[str, Any] | None:
        layer = self.layers[name]
        for streak in [key for key in self.streaks if key.startswith(f"{name}|{side}|") or
                       (side == "forward" and key == f"{name}|stall") or key == f"{name}|nonfinite"]:
            del self.streaks[streak]
        old = {op: getattr(layer.config, op) for op in SIDES[side] if getattr(layer.config, op) is not None}
        new = {op: neighbour(fmt, direction) for op, fmt in old.items()}
        new = {op: fmt for op, fmt in new.items() if fmt is not None and fmt.name not in self._history(name, op)}
        if not new:
            if f"{name}|{side}|{direction}" in self.impossible:
                return None
            formats = "+".join(fmt.name for fmt in old.values())
            event = {"step": step, "layer": name, "side": side, "direction": direction, "from": {}, "to": {},
                     "shifted": False, "reason": f"{reason}; no format with one more {direction} bit than "
                                                 f"{formats} that this layer has not left already"}
            self.apply(event, project=True)
            return event
        event = {"step": step, "layer": name, "side": side, "direction": direction,
                 "from": {op: old[op].name for op in new},
                 "to": {op: fmt.name for op, fmt in new.items()}, "shifted": True, "reason": reason}
        self.apply(event, project=True)
        return event

    def apply(self, event: dict[str, Any], project: bool) -> None:
        """Put an event's layer in its new formats (``project=False``: a checkpoint's weights follow)."""
        self.events.append(event)
        if not event["shifted"]:
            self.impossible.add(f"{event['layer']}|{event['side']}|{event['direction']}")
            return
        layer = self.layers[event["layer"]]
        formats = {op: get_format(name) for op, name in event["to"].items()}
        layer.reformat(**formats)
        weight = self.weight_of.get(id(layer.weight))
        if "weight" in formats and weight is not None:
            weight.reformat(formats["weight"], getattr(self.optimizer, "generator", None), project=project)

    # ---- checkpoints and summary ------------------------------------------------------------
    def current_formats(self) -> dict[str, dict[str, str]]:
        """Per shifted layer: the formats now (operand -> name)."""
        out: dict[str, dict[str, str]] = {}
        for event in self.events:
            if event["shifted"]:
                out.setdefault(event["layer"], {}).update(event["to"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"events": [dict(e) for e in self.events], "streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the saved shifts (formats only: load the model and optimizer state after this)."""
        for event in state["events"]:
            self.apply(dict(event), project=False)
        self.streaks = dict(state["streaks"])


def describe(event: dict[str, Any]) -> str:
    """One line for the console: ``h.0.attn.c_attn weight+activation E3M4 -> E4M3 (reason)``."""
    layer = event["layer"].removeprefix("transformer.")
    if not event["shifted"]:
        return f"{layer} {event['side']}: cannot shift ({event['reason']})"
    operands = "+".join(event["to"])
    before = "+".join(dict.fromkeys(event["from"].values()))
    after = "+".join(dict.fromkeys(event["to"].values()))
    return f"{layer} {operands} {before} -> {after} ({event['reason']})"
