"""Exact minifloat simulation: formats, rounding, scaling and bit-stall detection."""

from .formats import REGISTRY, SPEC_SYNTAX, FloatFormat, FormatError, get_format
from .quantize import ROUNDINGS, quantize, quantize_ste
from .scaling import AmaxTracker, QuantStats, ScalingConfig, scale_from_amax, scaled_quantize
from .stall import FlipCount, bit_stall_mask, count_flips

__all__ = [
    "REGISTRY",
    "ROUNDINGS",
    "SPEC_SYNTAX",
    "AmaxTracker",
    "FlipCount",
    "FloatFormat",
    "FormatError",
    "QuantStats",
    "ScalingConfig",
    "bit_stall_mask",
    "count_flips",
    "get_format",
    "quantize",
    "quantize_ste",
    "scale_from_amax",
    "scaled_quantize",
]
