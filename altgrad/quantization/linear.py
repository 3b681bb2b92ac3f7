"""QuantizedLinear: a Linear layer whose GEMMs see simulated FP8 operands (DESIGN §2).

Forward ``y = Q_a(x) Q_w(W)^T + b``; backward quantizes the incoming gradient with the
gradient format and forms ``grad_x`` and ``grad_W`` from quantized operands (no extra
gradient through Q: straight-through). Each operand has its own per-tensor scale (current or
delayed amax scaling). Weights are FP32 masters whose quantized copy enters the GEMM, or, with
``weight_storage: format``, live on their grid at a storage scale that the optimizer owns
(`optim.FormatWeight`); their cast is then the identity.

The GEMM runs on the dequantized values ``q(x s) / s``. Every value of a format that `fits`
bfloat16, times a power of two, is a bfloat16 value, so with ``gemm_dtype="bf16"`` the cast
loses nothing and the product runs on bf16 kernels with fp32 accumulation, as fast as the BF16
baseline. On CPU the native cast writes the dequantized values directly; elsewhere (and for
scales so extreme that ``q / s`` would leave float32's normal range) the operands are the
scaled grid values and the product is unscaled by ``1 / (s_a s_w)``, exact for power-of-two
scales, the default.

The layer casts its operands here, in Python (the operand streams' state lives here); the GEMMs
and their backward run in a C++ autograd node (`linear_op`) where it can be built, else in
`_QuantizedLinearFunction`, which does the same arithmetic op for op. Streams in the common
configuration (nearest, current power-of-two scaling) carry a ``NativeStream`` and are cast in
that node too, with the same kernel call, except while they collect statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import linear_op, native
from .formats import FloatFormat, get_format
from .kernel import sr_bits_value, use_native
from .quantize import ROUNDINGS, quantize
from .scaling import AmaxTracker, QuantStats, ScalingConfig, cast_operand, dequantize_exact, measure_cast

GEMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPERANDS = ("activation", "weight", "gradient")
WEIGHT_STORAGES = ("master", "format")


@dataclass(frozen=True)
class LinearQuantConfig:
    """Formats of a layer's three GEMM operands (None keeps that operand in high precision)."""

    weight: FloatFormat | None
    activation: FloatFormat | None
    gradient: FloatFormat | None
    rounding: str = "nearest"  # weights and activations
    grad_rounding: str = "nearest"
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    gemm_dtype: str = "bf16"
    weight_storage: str = "master"  # master: FP32 weights, cast each forward; format: the weight lives on its grid
    update_rounding: str = "nearest"  # how an optimizer writes w + delta onto the grid (format storage)
    # the random bits of every stochastic rounding of the layer (operand casts, update rounding):
    # N in 1..30 (few-bit rounding, biased toward zero: `quantize.quantize`); None: the exact rule
    sr_bits: int | None = None

    def __post_init__(self) -> None:
        for name in OPERANDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, get_format(value))
        sr_bits_value(self.sr_bits)  # ValueError outside 1..30
        if self.rounding not in ROUNDINGS or self.grad_rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ValueError(f"gemm_dtype must be one of {', '.join(GEMM_DTYPES)}, got {self.gemm_dtype!r}")
        for name in OPERANDS:
            fmt = getattr(self, name)
            if fmt is not None and not fmt.fits(GEMM_DTYPES[self.gemm_dtype]):
                raise ValueError(f"{fmt.name} values are not all exact in {self.gemm_dtype}; use gemm_dtype fp32")
        if self.weight_storage not in WEIGHT_STORAGES:
            raise ValueError(f"weight_storage must be one of {', '.join(WEIGHT_STORAGES)}, got {self.weight_storage!r}")
        if self.update_rounding not in ROUNDINGS:
            raise ValueError(f"update_rounding must be one of {', '.join(ROUNDINGS)}, got {self.update_rounding!r}")
        if self.weight_storage == "format" and (self.weight is None or not self.scaling.power_of_two):
            raise ValueError("weight_storage: format needs a weight format and power-of-two scales")

    def format_name(self, operand: str) -> str:
        fmt = getattr(self, operand)
        return fmt.name if fmt is not None else "high precision"


def _nonzero_columns(q: torch.Tensor) -> torch.Tensor:
    """Per input feature (q's last dimension): whether any row of q is non-zero there."""
    if use_native("auto", native.supports(q, q.dtype)):
        return native.nonzero_columns(q)
    return (q != 0).reshape(-1, q.shape[-1]).any(0)


class OperandQuantizer:
    """Quantizes one operand stream of one layer (its scale history, its random stream, its stats)."""

    def __init__(self, fmt: FloatFormat | None, rounding: str, scaling: ScalingConfig, seed: int,
                 track_alive: bool = False, sr_bits: int | None = None):
        self.fmt = fmt
        self.track_alive = track_alive
        self.rounding = rounding
        self.sr_bits = sr_bits  # random bits of stochastic rounding (None: the exact rule)
        self.tracker = AmaxTracker(scaling, fmt) if fmt is not None else None
        self.generator = torch.Generator().manual_seed(seed) if rounding == "stochastic" else None
        # The C++ cast of this stream (`linear_op.native_stream`), or None. It holds the last scale
        # (the next cast's guess) for both routes, and stands aside while statistics are collected.
        self.native = self._native_stream()
        self._last_scale: torch.Tensor | float | None = None
        self.collecting = False
        self.stats: list[QuantStats] = []
        self.alive: torch.Tensor | None = None  # per input feature: non-zero anywhere while collecting
        # A format-stored weight (`optim.FormatWeight`): already on the grid at its scale, so the
        # cast is the identity (no re-rounding), as torchao skips a tensor already in FP8.
        self.stored = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype, record: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(values in ``dtype``, the scale they carry): x ≈ values / carried.

        On CPU the values are dequantized, ``q(x * scale) / scale``, wherever that is exact
        (`scaling.dequantize_exact`; the native kernel writes them in the same pass): they carry
        1.0 and the GEMM needs no unscale. Elsewhere they are the scaled grid values and carry the
        scale, a 0-d tensor on an accelerator (no host sync). The scale itself is kept in
        ``last_scale``. ``record=False`` (evaluation) leaves the delayed-scaling history untouched.
        """
        if self.fmt is None:
            return x.to(dtype), 1.0
        x = x.detach()
        scaling = self.tracker.config
        if self.stored is not None:
            scale = self.stored.forward_scale()
            if isinstance(scale, float) and dequantize_exact(self.fmt, scale):
                q, carried = x.to(dtype), 1.0  # on the grid: exact, nothing to round or scale
            else:
                q, carried = (x * scale).to(dtype), scale
        elif scaling.mode == "none":
            scale = carried = 1.0
            q = quantize(x, self.fmt, rounding=self.rounding, generator=self.generator, sr_bits=self.sr_bits).to(dtype)
        else:
            q, scale, amax, carried = cast_operand(x, self.fmt, self.tracker.reference_amax(), margin=scaling.margin,
                                                   power_of_two=scaling.power_of_two, rounding=self.rounding,
                                                   generator=self.generator, out_dtype=dtype, guess=self.last_scale,
                                                   sr_bits=self.sr_bits)
            if record:
                self.tracker.record_amax(amax)
        if self.collecting:
            self.stats.append(measure_cast(x, scale, q, self.fmt, carried=carried))
            if self.track_alive:
                alive = _nonzero_columns(q)
                self.alive = alive if self.alive is None else self.alive | alive
        self.last_scale = scale
        return q, carried

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the C++ stream out (it holds a kernel address of this process)
        and make their own on the way back (`__setstate__`)."""
        state = self.__dict__.copy()
        state["_last_scale"], state["native"] = self.last_scale, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"sr_bits": None, **state})  # a stream pickled before sr_bits: the exact rule
        self.native = self._native_stream()
        self.collecting, self.last_scale = self._collecting, self._last_scale

    def _native_stream(self):
        """`linear_op.native_stream` for this stream's configuration (None: Python casts it)."""
        if self.tracker is None:
            return None
        scaling = self.tracker.config
        return linear_op.native_stream(self.fmt, self.rounding, scaling.mode, scaling.power_of_two, scaling.margin)

    @property
    def collecting(self) -> bool:
        """Whether casts record `QuantStats` (Python casts the stream meanwhile)."""
        return self._collecting

    @collecting.setter
    def collecting(self, on: bool) -> None:
        self._collecting = on
        if self.native is not None:
            self.native.active = not on

    @property
    def last_scale(self) -> torch.Tensor | float | None:
        """The scale of the stream's last cast (None before the first), by either route."""
        if self.native is not None and self.native.scale > 0:
            return self.native.scale
        return self._last_scale

    @last_scale.setter
    def last_scale(self, scale: torch.Tensor | float | None) -> None:
        self._last_scale = scale
        if self.native is not None:
            self.native.scale = scale if isinstance(scale, float) else 0.0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.tracker is not None:
            state["amax"] = self.tracker.state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "amax" in state and self.tracker is not None:
            self.tracker.load_state_dict(state["amax"])
        if "generator" in state and self.generator is not None:
            self.generator.set_state(state["generator"])


def _unscale(t: torch.Tensor, inverse: torch.Tensor | float) -> torch.Tensor:
    """t * inverse, no pass at all where inverse is exactly 1.0 (dequantized operands)."""
    return t if isinstance(inverse, float) and inverse == 1.0 else t * inverse


class _QuantizedLinearFunction(torch.autograd.Function):
    """The GEMMs of a quantized Linear, on operands cast by the layer, each carrying a scale
    (1.0 when dequantized): the reference of the C++ function in ``linear_op.cpp``, which does
    the same arithmetic op for op, and its fallback.

    With power-of-two scales (``exact``) a carried scale is undone on the smaller operand (the
    weight side), exactly: no extra pass over activations, and the bias enters the GEMM as in
    nn.Linear; on CPU the operands arrive dequantized and no pass is needed at all. Otherwise the
    product is unscaled in fp32. ``wide``: fp32 GEMMs on the (exact) grid values. The backward
    casts the incoming gradient with ``cast_gradient`` (the layer's gradient stream).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, qx, qw, sx, sw, exact, wide, out_dtype, cast_gradient):  # noqa: D401
        inverse = (1.0 / sx) * (1.0 / sw)  # not 1/(sx sw): that product can overflow float32
        gx, gw = (qx.float(), qw.float()) if wide else (qx, qw)
        b = None if bias is None else bias.detach().to(gw.dtype)
        if exact:
            y = F.linear(gx, _unscale(gw, inverse), b)  # a power of two: exact, in the GEMM's dtype
        else:
            y = F.linear(gx, gw).float() * inverse
            y = (y if b is None else y + b).to(gw.dtype)
        ctx.save_for_backward(qx, qw)
        ctx.config = (sx, sw, exact, wide, cast_gradient)  # scales: floats, or 0-d tensors outside the graph
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        qx, qw = ctx.saved_tensors
        sx, sw, exact, wide, cast_gradient = ctx.config
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        qg, sg = cast_gradient(grad_y)
        if wide:  # fp32: float32 GEMMs on the exact grid values, as in the forward
            qx, qw, qg = qx.float(), qw.float(), qg.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            inverse = (1.0 / sg) * (1.0 / sw)
            if exact:
                grad_x = torch.matmul(qg, _unscale(qw, inverse))
            else:
                grad_x = torch.matmul(qg, qw).float() * inverse
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            g2, x2 = qg.reshape(-1, qg.shape[-1]).t(), qx.reshape(-1, qx.shape[-1])
            if exact:
                # The activation's unscale (a power of two: exact) goes in before the GEMM: the
                # product of two scaled operands can pass float32's range (E7M0 x E7M0: 2^128).
                grad_w = _unscale(torch.mm(g2, _unscale(x2, 1.0 / sx)), 1.0 / sg)
            else:
                grad_w = torch.mm(g2, x2).float() * ((1.0 / sg) * (1.0 / sx))
            grad_w = grad_w.to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` computing with quantized operands; parameters stay FP32 masters.

    Built from an existing Linear with `from_linear`, sharing its Parameter objects (so weight
    tying and optimizer state are untouched). Scale histories and stochastic-rounding streams
    are saved in the module's state dict, so a resumed run continues exactly.
    """

    def __init__(self, in_features: int, out_features: int, config: LinearQuantConfig, bias: bool = True,
                 seed: int = 0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        sr_bits = config.sr_bits
        self.quantizers = {
            "activation": OperandQuantizer(config.activation, config.rounding, config.scaling, seed, track_alive=True,
                                           sr_bits=sr_bits),
            "weight": OperandQuantizer(config.weight, config.rounding, config.scaling, seed + 1, sr_bits=sr_bits),
            "gradient": OperandQuantizer(config.gradient, config.grad_rounding, config.scaling, seed + 2,
                                         sr_bits=sr_bits),
        }
        self.exact_scales = config.scaling.power_of_two or config.scaling.mode == "none"
        linear_op.module()  # built (once, cached) with the first layer, not inside a run's first timed step

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LinearQuantConfig, name: str = "", seed: int = 0) -> QuantizedLinear:
        """A QuantizedLinear sharing ``linear``'s parameters; its random streams depend on (seed, name)."""
        layer = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None,
                    seed=(seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    # Under torch.compile the quantized GEMMs run eagerly, as a graph break: the casts keep their
    # native kernel and exactly the eager arithmetic, their statistics and random streams are
    # Python state dynamo need not guard, and the layers' many shapes and dtypes do not exhaust
    # dynamo's recompile limit. Everything between them (attention, LayerNorm, GELU, the loss)
    # is compiled.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        out_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        dtype = self.gemm_dtype
        # Under fp32 (no autocast) the GEMMs run in float32 on the (exact) grid values, so nothing
        # is rounded to bf16 on the way out: fp32 and FP8 runs differ only by the casts.
        wide = out_dtype == torch.float32 and dtype != torch.float32
        op = linear_op.module()
        activation, weight = self.quantizers["activation"], self.quantizers["weight"]
        native_streams = op is not None and use_native("auto", True)
        gradient = self.quantizers["gradient"].native if native_streams else None
        if (native_streams and activation.native is not None and weight.native is not None
                and weight.stored is None and activation.native.takes(x) and weight.native.takes(self.weight)):
            # Everything in C++, where autocast is off (its GEMMs take the dtypes given).
            return op.cast_linear(x, self.weight, self.bias, activation.native, weight.native, gradient, dtype,
                                  self.exact_scales, wide, out_dtype, self._cast_gradient)
        # Autocast would turn an fp32 GEMM into a bf16 one; bf16 operands it leaves alone.
        with torch.autocast(device, enabled=False) if autocast and dtype != torch.bfloat16 else contextlib.nullcontext():
            qx, sx = activation(x, dtype, self.training)
            qw, sw = weight(self.weight, dtype, self.training)
            if op is None:
                return _QuantizedLinearFunction.apply(x, self.weight, self.bias, qx, qw, sx, sw, self.exact_scales,
                                                      wide, out_dtype, self._cast_gradient)
            return op.quantized_linear(x, self.weight, self.bias, qx, qw, sx, sw, self.exact_scales, wide, out_dtype,
                                       self._cast_gradient, gradient)

    def _cast_gradient(self, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The backward's cast of the incoming gradient (the layer's gradient stream)."""
        return self.quantizers["gradient"](grad_y, self.gemm_dtype)

    @property
    def gemm_dtype(self) -> torch.dtype:
        return GEMM_DTYPES[self.config.gemm_dtype]

    @property
    def weight_format(self) -> FloatFormat | None:
        return self.config.weight

    @property
    def weight_scale(self) -> torch.Tensor | float | None:
        """The weight's scale: its storage scale when stored in the format, else that of its last cast."""
        quantizer = self.quantizers["weight"]
        return quantizer.stored.forward_scale() if quantizer.stored is not None else quantizer.last_scale

    def reformat(self, **formats: FloatFormat) -> None:
        """Move operands (``weight=``, ``activation=``, ``gradient=``) to other formats, in place.

        The layer's config and those operands' quantizers are re-created; each keeps its random
        stream, its amax history (absolute values, valid in any format) and its link to a
        format-stored weight, so a run goes on where it was. A stored weight itself is re-projected
        by its optimizer (`optim.FormatWeight.reformat`), not here.
        """
        unknown = set(formats) - set(OPERANDS)
        if unknown:
            raise ValueError(f"unknown operand(s) {', '.join(sorted(unknown))}; operands: {', '.join(OPERANDS)}")
        old_config = self.config
        self.config = dataclasses.replace(old_config, **formats)
        for operand in formats:
            old = self.quantizers[operand]
            rounding = old_config.grad_rounding if operand == "gradient" else old_config.rounding
            new = OperandQuantizer(getattr(self.config, operand), rounding, old_config.scaling, 0, old.track_alive,
                                   sr_bits=old_config.sr_bits)
            new.generator, new.stored = old.generator, old.stored
            if old.tracker is not None and new.tracker is not None:
                new.tracker.load_state_dict(old.tracker.state_dict())
            self.quantizers[operand] = new

    def get_extra_state(self) -> dict[str, Any]:
        return {name: quantizer.state_dict() for name, quantizer in self.quantizers.items()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name, quantizer in self.quantizers.items():
            quantizer.load_state_dict(state.get(name, {}))

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"{super().extra_repr()}, weight={cfg.format_name('weight')}, "
                f"activation={cfg.format_name('activation')}, gradient={cfg.format_name('gradient')}, "
                f"rounding={cfg.rounding}, gemm={cfg.gemm_dtype}, storage={cfg.weight_storage}"
                + ("" if cfg.sr_bits is None else f", sr_bits={cfg.sr_bits}"))
