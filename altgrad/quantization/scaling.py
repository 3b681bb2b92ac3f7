"""Per-tensor amax scaling, current or delayed, and a scaled quantize that reports statistics.

The scale maps a tensor's amax onto the format's max: ``scale = max / amax * 2^-margin``.
The quantized tensor is ``q(x * scale) / scale``. Power-of-two scales keep both
multiplications exact, so the result is exactly a format value times a power of two.
Delayed scaling (TransformerEngine style) uses the amax of earlier steps, kept in a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FloatFormat, get_format
from .quantize import Rounding, quantize

SCALING_MODES = ("current", "delayed", "none")
AMAX_REDUCTIONS = ("max", "most_recent")


@dataclass(frozen=True)
class ScalingConfig:
    """How a tensor's scale is chosen. ``mode="none"`` quantizes unscaled values."""

    mode: str = "current"
    history_len: int = 16
    amax_reduce: str = "max"
    margin: int = 0
    power_of_two: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SCALING_MODES:
            raise ValueError(f"scaling mode must be one of {', '.join(SCALING_MODES)}, got {self.mode!r}")
        if self.amax_reduce not in AMAX_REDUCTIONS:
            raise ValueError(f"amax_reduce must be one of {', '.join(AMAX_REDUCTIONS)}, got {self.amax_reduce!r}")
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {self.history_len}")


def scale_from_amax(amax: torch.Tensor, fmt: FloatFormat, margin: int = 0, power_of_two: bool = True) -> torch.Tensor:
    """``max / amax * 2^-margin`` (rounded down to a power of two if asked); 1 where amax is 0 or not finite."""
    amax = amax.float()
    usable = torch.isfinite(amax) & (amax > 0)
    scale = fmt.max / torch.where(usable, amax, torch.ones_like(amax)) * 2.0**-margin
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return torch.where(usable & torch.isfinite(scale), scale, torch.ones_like(scale))


class AmaxTracker:
    """Chooses the scale for one tensor stream (e.g. one layer's activations) step after step.

    ``current``: amax of the tensor being quantized. ``delayed``: amax from the history of
    earlier steps (``max`` of the window or the ``most_recent``); the first step, with no
    history yet, uses the current amax. Call `scale` then `record` once per step.
    """

    def __init__(self, config: ScalingConfig, fmt: FloatFormat):
        self.config = config
        self.fmt = fmt
        self.history: torch.Tensor | None = None
        self.count = 0

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.mode == "none":
            return torch.ones((), device=x.device)
        if cfg.mode == "current" or self.count == 0:
            amax = x.detach().abs().amax().float()
        elif cfg.amax_reduce == "max":
            amax = self.history[: min(self.count, cfg.history_len)].amax()
        else:
            amax = self.history[(self.count - 1) % cfg.history_len]
        return scale_from_amax(amax, self.fmt, cfg.margin, cfg.power_of_two)

    def record(self, x: torch.Tensor) -> None:
        if self.config.mode != "delayed":
            return
        if self.history is None:
            self.history = torch.zeros(self.config.history_len, device=x.device)
        self.history[self.count % self.config.history_len] = x.detach().abs().amax().float()
        self.count += 1

    def state_dict(self) -> dict:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.count = state["history"], int(state["count"])


@dataclass(frozen=True)
class QuantStats:
    """What one scaled quantize did to a tensor (counts are over its elements)."""

    numel: int
    overflow: int  # scaled finite values beyond ±max (saturated)
    underflow: int  # non-zero values that became zero
    binades_used: int  # distinct binades hit by non-zero quantized values
    binades_total: int  # binades of the format
    scale: float

    @property
    def overflow_rate(self) -> float:
        return self.overflow / self.numel if self.numel else 0.0

    @property
    def underflow_rate(self) -> float:
        return self.underflow / self.numel if self.numel else 0.0

    @property
    def dynamic_range_used(self) -> float:
        """Fraction of the format's binades in use."""
        return self.binades_used / self.binades_total


def scaled_quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    scale: torch.Tensor | float,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, QuantStats]:
    """``q(x * scale) / scale`` and the statistics of that rounding."""
    fmt = get_format(fmt)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    scaled = x.float() * scale_t
    q = quantize(scaled, fmt, rounding=rounding, saturate=saturate, generator=generator)
    magnitude = q.abs()
    nonzero = magnitude[magnitude > 0]
    used = torch.unique(torch.floor(torch.log2(nonzero[torch.isfinite(nonzero)]))).numel()
    stats = QuantStats(
        numel=x.numel(),
        overflow=int((torch.isfinite(scaled) & (scaled.abs() > fmt.max)).sum()),
        underflow=int(((scaled != 0) & (q == 0)).sum()),
        binades_used=used,
        binades_total=len(fmt.exponents),
        scale=float(scale_t),
    )
    return (q / scale_t).to(x.dtype), stats
