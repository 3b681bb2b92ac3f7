"""Per-tensor amax scaling, current or delayed, and a scaled quantize that reports statistics.

The scale maps a tensor's amax onto the format's max: ``scale = max / amax * 2^-margin``.
The quantized tensor is ``q(x * scale) / scale``. Power-of-two scales keep both
multiplications exact, so the result is exactly a format value times a power of two.
Delayed scaling (TransformerEngine style) uses the amax of earlier steps, kept in a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import native
from .formats import FloatFormat, get_format
from .kernel import (
    P_MAX_BITS,
    round_float32_bits,
    round_nearest_by_scaling,
    native_nearest_fits,
    run_compiled,
    scaling_kernel_fits,
    use_native,
)
from .quantize import Rounding, _params, draw_seed, float32_bits, quantize

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


def pow2_scale(amax: torch.Tensor, max_bits: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """The largest ``2^k`` with ``amax * 2^k <= max``, times ``2^-margin``; 1 where amax is 0 or not finite.

    Exact integer arithmetic on the float32 fields of amax and max (``max_bits``, int32): a
    float quotient ``max / amax`` can round up to a power of two and overflow by one step.
    Traceable, so it fuses into the compiled cast. k is kept within float32's normal range.
    """
    amax = amax.float()
    bits = amax.view(torch.int32)
    exponent = torch.clamp(bits >> 23, min=1)  # a subnormal amax is treated as 2^-126 (scale a little low)
    k = (max_bits >> 23) - exponent - ((bits & 0x7FFFFF) > (max_bits & 0x7FFFFF)).to(torch.int32) - margin
    scale = (torch.clamp(k, -126, 127) + 127).mul(1 << 23).view(torch.float32)
    return torch.where(torch.isfinite(amax) & (amax > 0), scale, torch.ones_like(scale))


def _scale(amax: torch.Tensor, max_bits: torch.Tensor, margin: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """``max / amax * 2^-margin`` (as `pow2_scale` if asked); 1 where amax is 0 or the scale not
    finite. Traceable: also the scale step of the compiled cast."""
    if power_of_two:
        return pow2_scale(amax, max_bits, margin)
    usable = torch.isfinite(amax) & (amax > 0)
    scale = max_bits.view(torch.float32) / torch.where(usable, amax, torch.ones_like(amax)) * torch.exp2(-margin.float())
    return torch.where(usable & torch.isfinite(scale), scale, torch.ones_like(scale))


def scale_from_amax(amax: torch.Tensor, fmt: FloatFormat, margin: int = 0, power_of_two: bool = True) -> torch.Tensor:
    """``max / amax * 2^-margin`` (as `pow2_scale` if asked); 1 where amax is 0 or not finite."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    max_bits = torch.tensor(float32_bits(fmt.max), dtype=torch.int32, device=amax.device)
    return _scale(amax, max_bits, torch.tensor(margin, dtype=torch.int32, device=amax.device), power_of_two)


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

    def reference_amax(self) -> torch.Tensor | None:
        """The amax of earlier steps the scale comes from (delayed), or None: use the current tensor's."""
        cfg = self.config
        if cfg.mode != "delayed" or self.count == 0:
            return None
        if cfg.amax_reduce == "max":
            return self.history[: min(self.count, cfg.history_len)].amax()
        return self.history[(self.count - 1) % cfg.history_len]

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "none":
            return torch.ones((), device=x.device)
        amax = self.reference_amax()
        amax = x.detach().abs().amax().float() if amax is None else amax
        return scale_from_amax(amax, self.fmt, self.config.margin, self.config.power_of_two)

    def record_amax(self, amax: torch.Tensor | float) -> None:
        if self.config.mode != "delayed":
            return
        if self.history is None:
            device = amax.device if isinstance(amax, torch.Tensor) else "cpu"
            self.history = torch.zeros(self.config.history_len, device=device)
        self.history[self.count % self.config.history_len] = amax
        self.count += 1

    def record(self, x: torch.Tensor) -> None:
        self.record_amax(x.detach().abs().amax())

    def state_dict(self) -> dict:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.count = state["history"], int(state["count"])


def _cast_kernel(x, reference_amax, params, margin, power_of_two: bool, use_reference: bool, seed, by_scaling: bool):
    """amax, scale, rounding of ``x * scale``: one compiled graph (two loops: reduce, map)."""
    x = x.float()
    amax = x.abs().amax()
    scale = _scale(reference_amax if use_reference else amax, params[P_MAX_BITS], margin, power_of_two)
    if by_scaling:
        return round_nearest_by_scaling(x * scale, params), scale, amax
    return round_float32_bits(x * scale, params, seed), scale, amax


def cast_to_grid(
    x: torch.Tensor,
    fmt: FloatFormat,
    reference_amax: torch.Tensor | None = None,
    *,
    margin: int = 0,
    power_of_two: bool = True,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    kernel: str = "auto",
    sr_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    """``(q(x * scale), scale, amax(x))``: the GEMM operand cast.

    The scale comes from ``reference_amax`` (delayed scaling) or, when None, from x's own
    amax. The values are the scaled grid values (``x ≈ q / scale``), in ``out_dtype``
    (default x's dtype). amax, scale and rounding run in the native C kernel on CPU
    (power-of-two scales), else as one compiled graph, also for small
    tensors; all bit-identical. Equals ``quantize(x * scale_from_amax(amax, ...), ...)``.
    scale and amax are Python floats from the native kernel (no tensor ops for scalars), else
    0-d tensors on x's device (no host sync on an accelerator). ``sr_bits``: the random bits of
    stochastic rounding (`quantize.quantize`; None: the exact rule).
    """
    q, scale, amax, _ = cast_operand(x, fmt, reference_amax, margin=margin, power_of_two=power_of_two,
                                     rounding=rounding, generator=generator, out_dtype=out_dtype, kernel=kernel,
                                     dequantize=False, sr_bits=sr_bits)
    return q, scale, amax


def dequantize_exact(fmt: FloatFormat, scale: float) -> bool:
    """Whether ``q / scale`` is exact for every value q of fmt's grid, for a power-of-two scale:
    the smallest non-zero value and the largest stay float32 and bfloat16 normal numbers. Holds
    for every scale a tensor of ordinary magnitude gets (E4M3: amax from 2.7e-33 up)."""
    return fmt.min_positive / scale >= 2.0**-126 and math.frexp(fmt.max / scale)[1] - 1 <= 127


def cast_operand(
    x: torch.Tensor,
    fmt: FloatFormat,
    reference_amax: torch.Tensor | None = None,
    *,
    margin: int = 0,
    power_of_two: bool = True,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    kernel: str = "auto",
    dequantize: bool = True,
    guess: torch.Tensor | float | None = None,
    sr_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float, torch.Tensor | float]:
    """`cast_to_grid` for a GEMM operand: ``(values, scale, amax(x), carried)``, values ≈ x * carried.

    With ``dequantize``, on CPU, the values are ``q(x * scale) / scale`` where `dequantize_exact`
    holds (a power of two applied to grid values: exact), written by the native kernel in the
    same pass, and ``carried`` is 1.0: the GEMM needs no unscale. Otherwise (an accelerator,
    where reading the scale would wait for the device, or a scale beyond that range) the values
    are the scaled grid values and ``carried`` is ``scale``. ``guess``: the scale this stream
    had last time; the native kernel then casts in one pass where it is still right (the result
    never depends on it). ``sr_bits``: as `cast_to_grid`.
    """
    params = _params(fmt, True, x.device, sr_bits)
    out_dtype = out_dtype or x.dtype
    seed = draw_seed(generator, x.device) if rounding == "stochastic" else None
    by_scaling = seed is None and scaling_kernel_fits(fmt.mantissa_bits, fmt.emin)
    native_fits = seed is not None or native_nearest_fits(fmt.mantissa_bits, fmt.emin, fmt.max)
    if use_native(kernel, native_fits and power_of_two and native.supports(x, out_dtype)):
        guess = guess if isinstance(guess, float) else 0.0
        values, scale, amax, dequantized = native.cast(x, params, reference_amax, margin, out_dtype, seed, dequantize,
                                                       guess)
        return values, scale, amax, 1.0 if dequantized else scale
    use_reference = reference_amax is not None
    reference = reference_amax.float() if use_reference else params  # any tensor: unused
    # float32 out, cast after: inductor's CPU loop for this kernel with a bfloat16 store runs
    # 3-4x slower than float32 out + an eager cast (measured, torch 2.13). The grid values are
    # exact in bfloat16. Loading bfloat16 inside the graph costs nothing extra.
    q, scale, amax = run_compiled(_cast_kernel, kernel, x.numel(), x, reference, params,
                                  _margin(margin, x.device), power_of_two, use_reference, seed, by_scaling,
                                  min_numel=0)
    if dequantize and power_of_two and x.device.type == "cpu" and dequantize_exact(fmt, float(scale)):
        return (q * (1.0 / float(scale))).to(out_dtype), scale, amax, 1.0  # exact: a power of two
    return q.to(out_dtype), scale, amax, scale


@lru_cache(maxsize=None)
def _margin(margin: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(margin, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class QuantStats:
    """What one scaled quantize did to a tensor (counts are over its elements)."""

    numel: int
    overflow: int  # scaled finite values beyond ±max (saturated)
    underflow: int  # non-zero values that became zero
    binades_used: int  # distinct binades hit by non-zero quantized values
    binades_total: int  # binades of the format
    scale: float
    signal: float = 0.0  # sum of squares of the scaled input
    noise: float = 0.0  # sum of squares of the rounding error (saturation included)

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

    @property
    def snr_db(self) -> float:
        """Signal-to-quantization-noise ratio, 10 log10(|x|^2 / |x - q(x)|^2); inf when exact."""
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


def _measure_kernel(scaled: torch.Tensor, q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """[overflow count, underflow count, signal energy, noise energy] in one fused pass (float64 sums)."""
    fmt_max = params[P_MAX_BITS].view(torch.float32)
    finite = torch.isfinite(scaled)
    clean = torch.where(finite, scaled, torch.zeros_like(scaled))
    error = torch.where(finite & torch.isfinite(q), clean - q, torch.zeros_like(q)).double()
    return torch.stack([(clean.abs() > fmt_max).sum().double(), ((scaled != 0) & (q == 0)).sum().double(),
                        clean.double().square().sum(), error.square().sum()])


def measure_quantization(scaled: torch.Tensor, q: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | float,
                         kernel: str = "auto") -> QuantStats:
    """The statistics of rounding ``scaled`` (already multiplied by its scale) to ``q``."""
    scaled, q = scaled.float().reshape(-1), q.float().reshape(-1)
    # The float32 exponent field of each value is its binade: 0 holds the zeros (format values
    # are float32 normals), 255 inf and NaN; a histogram is one pass, unlike unique().
    fields = torch.bincount((q.view(torch.int32) >> 23) & 0xFF, minlength=256)
    sums = run_compiled(_measure_kernel, kernel, scaled.numel(), scaled, q,
                        _params(fmt, True, scaled.device))
    overflow, underflow, signal, noise = sums.tolist()
    return QuantStats(
        numel=scaled.numel(),
        overflow=int(overflow),
        underflow=int(underflow),
        binades_used=int((fields[1:255] > 0).sum()),
        binades_total=len(fmt.exponents),
        scale=float(scale),
        signal=signal,
        noise=noise,
    )


def measure_cast(x: torch.Tensor, scale: torch.Tensor | float, q: torch.Tensor, fmt: FloatFormat,
                 kernel: str = "auto", carried: torch.Tensor | float | None = None) -> QuantStats:
    """`measure_quantization` of a cast ``q = q(x * scale)`` (`cast_to_grid`'s output): on CPU
    one native pass that forms ``x * scale`` on the fly, else the torch version. The counts
    are identical; the energies agree to float64 rounding (the summation order differs).
    ``carried``: the scale q still carries (`cast_operand`); 1.0 for dequantized values."""
    rescale = 1.0 if carried is None else float(scale) / float(carried)  # both powers of two: exact
    if use_native(kernel, native.supports(x, q.dtype) and q.shape == x.shape):
        overflow, underflow, signal, noise, binades = native.measure(x, float(scale), q, fmt.min_positive, fmt.max,
                                                                     rescale)
        return QuantStats(numel=x.numel(), overflow=overflow, underflow=underflow, binades_used=binades,
                          binades_total=len(fmt.exponents), scale=float(scale), signal=signal, noise=noise)
    return measure_quantization(x.float() * scale, q.float() * rescale if rescale != 1.0 else q, fmt, scale, kernel)


def scaled_quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    scale: torch.Tensor | float,
    *,
    rounding: Rounding = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    sr_bits: int | None = None,
) -> tuple[torch.Tensor, QuantStats]:
    """``q(x * scale) / scale`` and the statistics of that rounding."""
    fmt = get_format(fmt)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    scaled = x.float() * scale_t
    q = quantize(scaled, fmt, rounding=rounding, saturate=saturate, generator=generator, sr_bits=sr_bits)
    return (q / scale_t).to(x.dtype), measure_quantization(scaled, q, fmt, scale_t)
