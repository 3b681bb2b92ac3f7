"""The monitor protocol: what the trainer calls around one optimizer step.

A monitor is due on some steps (``due``); on those the trainer calls, in order,
``before_forward`` -> forward/backward -> ``after_backward`` -> gradient clipping ->
``before_update`` -> optimizer step -> ``after_update`` (the last two only when the step is
applied, i.e. loss and gradients are finite). ``after_*`` return metrics (stable names for
metrics.jsonl and W&B); ``alerts`` judges a logged record: for each alert the monitor owns and
the record measures, a dict (``value``, ``message``, ``critical``) when it is raised, else None
(the trainer warns once per excursion and counts them). ``summary`` goes into summary.json;
``state_dict``/``load_state_dict`` go into checkpoints, so a resumed run continues exactly.
A new monitor is a new file with a class like `BaseMonitor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class StepContext:
    step: int  # the number of the step being taken, 1-based (step 1 is the first update)
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # its micro-batches
    grad_accum: int
    rng_state: dict[str, Any] | None = None  # RNG state before the forward, when a due monitor needs_rng
    average: Callable[[list[torch.Tensor]], None] | None = None  # averages tensors over processes (DDP)


class Monitor(Protocol):
    name: str
    needs_rng: bool

    def due(self, step: int) -> bool: ...
    def before_forward(self, ctx: StepContext) -> None: ...
    def after_backward(self, ctx: StepContext) -> dict[str, float]: ...
    def before_update(self, ctx: StepContext) -> None: ...
    def after_update(self, ctx: StepContext) -> dict[str, float]: ...
    def alerts(self, record: dict[str, Any]) -> dict[str, dict[str, Any] | None]: ...
    def summary(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseMonitor:
    """No-op defaults; due every ``interval`` steps."""

    name = "base"
    needs_rng = False

    def __init__(self, interval: int):
        self.interval = interval

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def before_forward(self, ctx: StepContext) -> None:
        pass

    def after_backward(self, ctx: StepContext) -> dict[str, float]:
        return {}

    def before_update(self, ctx: StepContext) -> None:
        pass

    def after_update(self, ctx: StepContext) -> dict[str, float]:
        return {}

    def alerts(self, record: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (undefined, never 0) when the denominator is 0."""
    return numerator / denominator if denominator else math.nan


def layer_mean(values: Iterable[float]) -> float:
    """The headline convention (DESIGN §3): the mean over layers, each layer once; undefined
    (NaN) layers are left out, and the mean of no defined layer is NaN."""
    defined = [v for v in values if math.isfinite(v)]
    return sum(defined) / len(defined) if defined else math.nan
