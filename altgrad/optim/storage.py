"""Weights on a format's grid (DESIGN §4): storage in the format, its scale, its geometry.

`FormatWeight` is one weight of a quantized layer that has a weight format, seen by an
optimizer. With ``stored=True`` (``weight_storage: format``) the parameter itself holds values
of the format divided by a per-tensor power-of-two scale ``s`` owned here; no FP32 master
exists. Every update is written as ``w <- Q(y s) / s`` with ``y = w + delta`` and

- ``s`` = the largest power of two with ``amax(y) s <= max`` (times ``2^-margin``): the rule
  current amax scaling uses for the forward cast, so the stored tensor is exactly what the
  forward cast of it would produce. A change of ``s`` is a *rescale*: it happens only by
  powers of two, the same single rounding of ``y`` lands on the new grid, and it is counted;
- ``Q`` = the update rounding (``nearest``: ties to even; ``stochastic``: unbiased, from the
  optimizer's seeded generator).

Compensated storage (``compensation: kahan``, Kahan summation as optimi does it for bfloat16
weights): a stored weight may keep a buffer ``c`` (``compensation_dtype``, bfloat16 by default)
of the part of ``w + delta`` its grid could not hold. After an optimizer step (`store`)
``y = w + delta + c`` is rounded, ``w <- Q(y s) / s``, and ``c <- y - w`` in the buffer's
dtype: the stored weight plus its compensation is the exact sum to the buffer's precision, and
many steps below half a grid step add up until they move the weight. The buffer starts at zero
(every arm starts from the same grid) and is part of the checkpoint.

With ``stored=False`` (FP32 master) the weight's scale is the one current scaling would give
it now, and only the geometry (`stiffness`) is used, by ManifoldAdamW. GridOptim keeps the
scale of a stored weight while it moves codes, and halves it (`rescale`) when the top end of
the grid stopped a move.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization import native
from ..quantization.formats import FloatFormat
from ..quantization.kernel import native_nearest_fits, use_native
from ..quantization.quantize import _params, draw_seed, float32_bits, quantize
from ..quantization.scaling import cast_to_grid, scale_from_amax

#: Compensated storage: none, or kahan (a buffer per stored weight, see the module doc).
COMPENSATIONS = ("none", "kahan")
#: The compensation buffer's dtype by config name.
COMPENSATION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FormatWeight:
    """One weight with a format: its grid, its scale, and (when stored) its projection."""

    def __init__(self, name: str, param: nn.Parameter, fmt: FloatFormat, stored: bool, update_rounding: str,
                 margin: int = 0, compensation: torch.dtype | None = None, sr_bits: int | None = None):
        if compensation is not None and not stored:
            raise ValueError(f"{name}: a compensation buffer keeps what the grid could not hold; "
                             "an FP32 master has no grid to lose it to")
        self.name = name
        self.param = param
        self.fmt = fmt
        self.stored = stored
        self.update_rounding = update_rounding
        self.margin = margin
        # the random bits of the stochastic update rounding (projection, landing, rescale, GridOptim's
        # rung move): 1..30, few-bit rounding (`quantize.quantize`); None: the exact rule
        self.sr_bits = sr_bits
        self.scale = torch.ones((), dtype=torch.float32, device=param.device)  # stored: the storage scale
        self.rescales = torch.zeros((), dtype=torch.int64, device=param.device)
        # On CPU the scale is also kept as a Python float: no tensor ops for a scalar every step.
        self._cpu = param.device.type == "cpu"
        self._scale_value = 1.0
        # Kahan's buffer: what the grid could not hold of the last step (None: no compensation)
        self.compensation = None if compensation is None else torch.zeros_like(param, dtype=compensation)
        if stored:
            self.project(None, "nearest", count=False)  # every arm starts from the same grid

    def _native(self, fits: bool = True) -> bool:
        return use_native("auto", fits and native.fits_step(self.param))

    # ---- the scale ----------------------------------------------------------------------
    def current_scale(self) -> torch.Tensor | float:
        """The tensor's scale now: the storage scale, or a master weight's current amax scale
        (a Python float on CPU, a 0-d tensor elsewhere)."""
        if self.stored:
            return self.forward_scale()
        if self._native():
            return native.amax_scale(self.param.data, float32_bits(self.fmt.max), self.margin)
        return scale_from_amax(self.param.detach().abs().amax(), self.fmt, self.margin).to(self.param.device)

    def forward_scale(self) -> torch.Tensor | float:
        """The storage scale as the forward cast uses it: a Python float on CPU (no tensor ops)."""
        return self._scale_value if self._cpu else self.scale

    def _set_scale(self, scale: torch.Tensor | float, count: bool) -> None:
        if isinstance(scale, float):  # from the native kernel: compare floats, touch tensors on change only
            if scale != self._scale_value:
                self.scale.fill_(scale)
                self.rescales += int(count)
        else:
            scale = scale.to(torch.float32)
            if count:
                self.rescales += (scale != self.scale).to(torch.int64)
            self.scale.copy_(scale)
        if self._cpu:
            self._scale_value = float(self.scale)

    # ---- geometry -----------------------------------------------------------------------
    def stiffness(self, max_stiffness: float | None = None) -> torch.Tensor:
        """S(w): the grid spacing at each element under the tensor's scale, ``ulp(w s) / s``.

        w = 0 gets the smallest spacing; ``max_stiffness`` (absolute) caps it.
        """
        scale = self.current_scale()
        spacing = self.fmt.ulp(self.param.detach() * scale) / scale
        return spacing if max_stiffness is None else torch.clamp(spacing, max=max_stiffness)

    # ---- storage ------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, generator: torch.Generator | None, rounding: str | None = None, count: bool = True) -> None:
        """The parameter, holding ``y = w + delta``, becomes ``Q(y s') / s'`` with s' the
        power-of-two amax scale of y (see the module doc). One cast: native in place on CPU,
        else `cast_to_grid` (bit-identical; the same single seed drawn from ``generator``)."""
        rounding = rounding or self.update_rounding
        fmt, param = self.fmt, self.param.data
        if self._native(rounding == "stochastic" or native_nearest_fits(fmt.mantissa_bits, fmt.emin, fmt.max)):
            seed = draw_seed(generator, param.device) if rounding == "stochastic" else None
            scale = native.project(param, _params(fmt, True, param.device, self.sr_bits), self.margin, seed)
        else:
            q, scale, _ = cast_to_grid(param, fmt, margin=self.margin, rounding=rounding, generator=generator,
                                       out_dtype=torch.float32, sr_bits=self.sr_bits)
            param.copy_(q * (1.0 / scale))  # 1/s is a power of two: exact
        self._set_scale(scale, count)

    @torch.no_grad()
    def store(self, generator: torch.Generator | None) -> None:
        """After an optimizer step the parameter holds ``w + delta``: store it on the grid (`project`
        with the update rounding). With compensation, the buffer is added first and keeps what the
        grid could not hold of the sum (module doc)."""
        if self.compensation is None:
            self.project(generator)
            return
        y = self.param.data.add_(self.compensation).clone()  # w + delta + c, one float32 rounding
        self.project(generator)
        self.compensation.copy_(y.sub_(self.param.data))  # y - Q(y) (exact in float32 below 2x the top), rounded once

    @torch.no_grad()
    def land(self, y: torch.Tensor, generator_state: torch.Tensor | None) -> torch.Tensor:
        """What the last `project` would have written for ``y`` instead: ``Q(y s) / s`` at the
        scale it chose, with its update rounding and, for stochastic rounding, its random bits
        (``generator_state``: the optimizer generator's state before that projection, which drew
        one seed from it: the same seed gives the same bits per element). For step records."""
        generator = None
        if self.update_rounding == "stochastic":
            generator = torch.Generator()  # the optimizers' generator is a CPU one (base.py)
            generator.set_state(generator_state)
        scale = self.forward_scale()
        q = quantize(y.detach().float() * scale, self.fmt, rounding=self.update_rounding, generator=generator,
                     sr_bits=self.sr_bits)
        return q * (1.0 / scale)

    @torch.no_grad()
    def _keep_residual(self, before: torch.Tensor) -> None:
        """After a re-rounding of the stored tensor (a rescale, a new format): with compensation the
        buffer also keeps what it lost, so ``w + c`` stays the sum of the steps."""
        if self.compensation is not None:
            self.compensation.copy_(self.compensation.float().add_(before.sub_(self.param.data)))

    @torch.no_grad()
    def rescale(self, factor: float, generator: torch.Generator | None) -> None:
        """Change the scale by a power of two ``factor`` and re-round the tensor onto the new grid."""
        scale = self.scale * factor
        before = self.param.detach().clone() if self.compensation is not None else None
        q = quantize(self.param.detach() * scale, self.fmt, rounding=self.update_rounding, generator=generator,
                     sr_bits=self.sr_bits)
        self.param.copy_(q * (1.0 / scale))
        self._set_scale(scale, count=True)
        if before is not None:
            self._keep_residual(before)

    @torch.no_grad()
    def reformat(self, fmt: FloatFormat, generator: torch.Generator | None, project: bool = True) -> None:
        """Move this weight to another format (an emergency shift): a stored weight is re-projected
        onto the new grid with its update rounding (``project=False``: its values and scale come
        from a checkpoint)."""
        self.fmt = fmt
        if self.stored and project:
            before = self.param.detach().clone() if self.compensation is not None else None
            self.project(generator, count=False)
            if before is not None:
                self._keep_residual(before)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"scale": self.scale.clone(), "rescales": self.rescales.clone()}
        if self.compensation is not None:
            state["compensation"] = self.compensation.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.rescales.copy_(state["rescales"])
        if self.compensation is not None:
            self.compensation.copy_(state["compensation"])
        if self._cpu:
            self._scale_value = float(self.scale)
