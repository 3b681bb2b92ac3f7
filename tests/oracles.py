"""Independent references: gfloat and ml_dtypes descriptions of AltGrad's formats."""

from __future__ import annotations

import numpy as np
from gfloat import Domain, FormatInfo
from gfloat.formats import format_info_ocp_e4m3, format_info_ocp_e5m2

from altgrad.quantization import REGISTRY, FloatFormat, get_format

#: Custom formats tested beside the registry: other biases, FP6, FP4, IEEE-style variants,
#: and float16 itself (E5M10 with inf), which numpy can check too.
CUSTOM_SPECS = (
    "E3M4:bias=3",
    "E2M3",
    "E3M2",
    "E2M1",
    "E4M3:special=ieee",
    "E3M4:bias=3,special=ieee",
    "E4M3:bias=10",
    "E5M2:special=fn",
    "E5M10:special=ieee",
)
ALL_FORMATS = [*REGISTRY.values(), *(get_format(s) for s in CUSTOM_SPECS)]
EIGHT_BIT_FORMATS = [f for f in ALL_FORMATS if f.bits <= 8]


def gfloat_info(fmt: FloatFormat) -> FormatInfo:
    if fmt is REGISTRY["E4M3"]:
        return format_info_ocp_e4m3
    if fmt is REGISTRY["E5M2"]:
        return format_info_ocp_e5m2
    high_nans = {"none": 0, "fn": 1, "ieee": 2**fmt.mantissa_bits - 1}[fmt.special]
    return FormatInfo(
        fmt.name,
        k=fmt.bits,
        precision=fmt.mantissa_bits + 1,
        bias=fmt.bias,
        is_signed=True,
        domain=Domain.Extended if fmt.has_inf else Domain.Finite,
        has_nz=True,
        num_high_nans=high_nans,
        has_subnormals=True,
        is_twos_complement=False,
    )


def probe_points(fmt: FloatFormat) -> np.ndarray:
    """Every value, every midpoint between neighbours, the float32 neighbours of both,
    points beyond max, ±inf and NaN, with both signs (float32)."""
    values = fmt.positive_values
    midpoints = (values[1:] + values[:-1]) / 2
    beyond = np.array([fmt.max * 1.0001, fmt.max * 1.25, fmt.max * 2, 3.0e38])
    tiny = np.array([2.0**-149, 2.0**-127, 2.0**-126, fmt.min_positive / 4, fmt.min_positive / 2])
    base = np.concatenate([values, midpoints, beyond, tiny]).astype(np.float32)
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(0))
    points = np.concatenate([base, up, down])
    points = points[np.isfinite(points)]
    return np.concatenate([points, -points, [np.inf, -np.inf, np.nan]]).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality by float32 bit pattern, any NaN equal to any NaN."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return (a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))
