"""The run summary's per-layer table: each Linear's formats now (after any emergency shift), its
storage and optimizer, and what the monitors totalled over the run."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model.surgery import LayerAssignment, quantized_layers
from ..quantization.linear import LinearQuantConfig
from .monitors import Monitor
from .shift import FormatShifter


def layer_summary(layers: list[LayerAssignment], model: nn.Module, monitors: list[Monitor],
                  shifter: FormatShifter | None, optimizer: str, compensation: str | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Per Linear layer: formats now, storage (with its compensation, e.g. ``kahan bfloat16``),
    optimizer, the monitors' totals, and ``formats_at_start`` for a layer that shifted."""
    totals: dict[str, dict[str, Any]] = {}
    for monitor in monitors:
        for name, values in monitor.summary().items():
            totals.setdefault(name, {}).update(values)
    live = quantized_layers(model)
    shifted = shifter.current_formats() if shifter else {}
    summary = {}
    for assignment in layers:
        config = live[assignment.name].config if assignment.name in live else None
        summary[assignment.name] = describe(config, optimizer, compensation) | totals.get(assignment.name, {})
        if assignment.name in shifted:
            summary[assignment.name]["formats_at_start"] = {
                op: assignment.config.format_name(op) for op in shifted[assignment.name]}
    return summary


def describe(config: LinearQuantConfig | None, optimizer: str, compensation: str | None = None) -> dict[str, str]:
    """One layer's formats, storage and optimizer."""
    if config is None:
        return {"weight": "high precision", "activation": "high precision", "gradient": "high precision",
                "storage": "master", "optimizer": "adamw"}
    described = {operand: config.format_name(operand) for operand in ("weight", "activation", "gradient")}
    compensated = f", {compensation}" if compensation else ""
    storage = config.weight_storage if config.weight_storage == "master" else \
        f"format ({config.update_rounding}{compensated})"
    return described | {"storage": storage, "optimizer": optimizer if config.weight is not None else "adamw"}
