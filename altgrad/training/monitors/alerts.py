"""Threshold alerts on headline metrics: which record crossed which bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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
