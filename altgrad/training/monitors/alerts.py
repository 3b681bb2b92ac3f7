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

    def alerts(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        """For each check the record measures: the alert when it is raised, else None."""
        judged: dict[str, dict[str, Any] | None] = {}
        for name, key, bad, bound in self._checks():
            value = metrics.get(key)
            if isinstance(value, float) and math.isfinite(value):
                judged[name] = {"value": value, "message": f"{key} = {value:.4g} {bound}", "critical": False} \
                    if bad(value) else None
        return judged
