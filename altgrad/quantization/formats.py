"""Minifloat format specifications: the exact value set of every format AltGrad simulates.

A format is sign + E exponent bits + M mantissa bits with an exponent bias. A code with
exponent field ``e`` and mantissa field ``m`` means ``(-1)^s 2^(e-bias) (1 + m/2^M)`` when
``e > 0`` and ``(-1)^s 2^(1-bias) (m/2^M)`` when ``e == 0`` (subnormals). The ``special``
field says which codes are not finite numbers:

- ``none``: every code is a finite number (E0M7, E1M6, E2M5, E3M4, E6M1, E7M0, FP6, FP4);
- ``ieee``: the top exponent field is reserved, ``m == 0`` is ±inf and ``m > 0`` is NaN (E5M2);
- ``fn``: no infinities, only the all-ones code ``S.11..1.11..1`` is NaN (OCP E4M3).

Everything here is computed by enumerating codes, so properties cannot drift from the decoder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..errors import UserError

SPECIALS = ("none", "ieee", "fn")
SPEC_SYNTAX = "E<exp bits>M<mantissa bits>[:bias=<int>][,special=none|ieee|fn]"
MAX_BITS = 16  # codes are enumerated, so keep formats small enough to list


class FormatError(UserError, ValueError):
    """An unknown format name or an invalid format spec (a user error, not a bug)."""


@dataclass(frozen=True)
class FloatFormat:
    """An immutable signed minifloat format; see the module docstring for the semantics."""

    exponent_bits: int
    mantissa_bits: int
    bias: int
    special: str = "none"
    name: str = field(default="", compare=False)
    note: str = field(default="", compare=False)  # what the format is for (registry formats; TEST_MATRIX.md)

    def __post_init__(self) -> None:
        E, M = self.exponent_bits, self.mantissa_bits
        if E < 0 or M < 0 or E + M < 1:
            raise FormatError(f"need E >= 0, M >= 0 and E + M >= 1, got E{E}M{M}")
        if 1 + E + M > MAX_BITS:
            raise FormatError(f"E{E}M{M} has {1 + E + M} bits; AltGrad handles at most {MAX_BITS}")
        if self.special not in SPECIALS:
            raise FormatError(f"special must be one of {', '.join(SPECIALS)}, got {self.special!r}")
        if self.special == "ieee" and E < 2:
            raise FormatError("special=ieee reserves the top exponent, so it needs E >= 2")
        if self.special == "fn" and E < 1:
            raise FormatError("special=fn needs at least one exponent bit")
        if not self.name:
            object.__setattr__(self, "name", self.spec)
        smallest, largest = self.min_positive, self.max
        if smallest < 2.0**-126 or largest >= 2.0**128:
            raise FormatError(
                f"{self.name} has values outside float32's normal range "
                f"({smallest:.3g} .. {largest:.3g}); AltGrad simulates formats whose values "
                "are float32 normal numbers (choose a larger bias or fewer exponent bits)"
            )

    # ---- identity -------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string that `get_format` parses back to this format."""
        return f"E{self.exponent_bits}M{self.mantissa_bits}:bias={self.bias},special={self.special}"

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special != "none"

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade, which is also the subnormals' scale."""
        return 1 - self.bias

    # ---- code <-> value ----------------------------------------------------------------
    def codes(self) -> np.ndarray:
        """Every code of the format, 0 .. 2^bits - 1."""
        return np.arange(2**self.bits, dtype=np.int64)

    def decode(self, codes: np.ndarray | int) -> np.ndarray:
        """Code -> value (float64, exact: every value has at most 16 significant bits)."""
        c = np.asarray(codes, dtype=np.int64)
        E, M = self.exponent_bits, self.mantissa_bits
        if np.any((c < 0) | (c >= 2**self.bits)):
            raise FormatError(f"{self.name} codes are 0 .. {2**self.bits - 1}")
        negative = (c >> (E + M)) & 1 == 1
        e = (c >> M) & ((1 << E) - 1)
        m = (c & ((1 << M) - 1)).astype(np.float64)
        frac = m / 2.0**M
        magnitude = np.where(
            e == 0,
            np.ldexp(frac, self.emin),
            np.ldexp(1.0 + frac, e - self.bias),
        )
        top = e == (1 << E) - 1
        if self.special == "ieee":
            magnitude = np.where(top, np.where(m == 0, np.inf, np.nan), magnitude)
        elif self.special == "fn":
            magnitude = np.where(top & (m == 2**M - 1), np.nan, magnitude)
        return np.where(negative, -magnitude, magnitude)

    def encode(self, values: np.ndarray | float) -> np.ndarray:
        """Value -> code for values of the format (e.g. the output of `quantize`).

        NaN maps to the positive NaN code with the largest mantissa; a value that is not in the
        format raises `FormatError` (round it with `quantize` first).
        """
        v = np.asarray(values, dtype=np.float64)
        table = self.decode(self.codes())
        positive = np.signbit(table) == 0
        lookup = {}
        for code, value in zip(self.codes()[positive], table[positive]):
            if not np.isnan(value):
                lookup.setdefault(float(value), int(code))
        sign_bit = 1 << (self.bits - 1)
        out = np.empty(v.shape, dtype=np.int64)
        for index, value in np.ndenumerate(v):
            if np.isnan(value):
                if not self.has_nan:
                    raise FormatError(f"{self.name} has no NaN")
                out[index] = int(np.flatnonzero(positive & np.isnan(table))[-1])
                continue
            code = lookup.get(abs(float(value)))
            if code is None:
                raise FormatError(f"{value!r} is not a value of {self.name}; quantize it first")
            out[index] = code | (sign_bit if np.signbit(value) else 0)
        return out

    # ---- the grid ------------------------------------------------------------------------
    @cached_property
    def positive_values(self) -> np.ndarray:
        """Every finite non-negative value, ascending, zero first (float64)."""
        table = self.decode(self.codes())
        finite = table[np.isfinite(table)]
        return np.unique(np.abs(finite))

    def grid(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every finite value, ascending, zero once."""
        positive = self.positive_values
        full = np.concatenate([-positive[:0:-1], positive])
        return torch.tensor(full, dtype=dtype)

    @property
    def num_finite(self) -> int:
        """Number of distinct finite values (±0 counted once)."""
        return 2 * len(self.positive_values) - 1

    @cached_property
    def max(self) -> float:
        return float(self.positive_values[-1])

    @cached_property
    def min_positive(self) -> float:
        return float(self.positive_values[1])

    @property
    def min_normal(self) -> float | None:
        """2^emin, or None for formats without normal numbers (E = 0)."""
        return math.ldexp(1.0, self.emin) if self.exponent_bits > 0 else None

    @property
    def min_subnormal(self) -> float | None:
        """2^(emin - M), or None when M = 0 (the only subnormal is zero)."""
        return math.ldexp(1.0, self.emin - self.mantissa_bits) if self.mantissa_bits > 0 else None

    @property
    def binades(self) -> float:
        """Dynamic range log2(max / min_positive)."""
        return math.log2(self.max / self.min_positive)

    @cached_property
    def exponents(self) -> np.ndarray:
        """The distinct binades floor(log2 v) of the positive values, ascending."""
        return np.unique(np.floor(np.log2(self.positive_values[1:])).astype(np.int64))

    def ulp(self, x: torch.Tensor | float) -> torch.Tensor:
        """Grid spacing at x: 2^(max(floor(log2|x|), emin) - M), the stiffness S(x).

        x = 0 gets the smallest spacing (the floor); |x| beyond max gets the top binade's.
        Returned in x's dtype (float32 for Python numbers).
        """
        t = torch.as_tensor(x, dtype=torch.float32) if not torch.is_tensor(x) else x
        top = max(int(self.exponents[-1]), self.emin)
        _, exponent = torch.frexp(t.float())
        binade = torch.clamp(exponent - 1, min=self.emin, max=top)
        binade = torch.where(t == 0, torch.full_like(binade, self.emin), binade)
        spacing = torch.ldexp(torch.ones_like(t, dtype=torch.float32), binade - self.mantissa_bits)
        return spacing.to(t.dtype)

    def fits(self, dtype: torch.dtype) -> bool:
        """Whether every value of the format is exactly representable in ``dtype``."""
        if dtype == torch.float32:
            return True
        values = torch.tensor(self.positive_values, dtype=torch.float64)
        return bool(torch.equal(values.to(dtype).double(), values))

    def summary(self) -> dict:
        """Machine-readable description (what `altgrad inspect-format --json` prints)."""
        return {
            "name": self.name,
            "spec": self.spec,
            "bits": self.bits,
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "bias": self.bias,
            "special": self.special,
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "min_positive": self.min_positive,
            "has_inf": self.has_inf,
            "has_nan": self.has_nan,
            "num_finite": self.num_finite,
            "binades": self.binades,
            "values": [float(v) for v in self.positive_values],
        }


def _registered(name: str, E: int, M: int, bias: int, special: str = "none", note: str = "") -> FloatFormat:
    return FloatFormat(E, M, bias, special, name=name, note=note)


#: The formats of the research question, exactly as DESIGN.md section 1 defines them.
REGISTRY: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        _registered("E0M7", 0, 7, 1, note="fixed point, uniform step 1/128"),
        _registered("E1M6", 1, 6, 0, note="uniform step 1/32"),
        _registered("E2M5", 2, 5, 1),
        _registered("E3M4", 3, 4, 1),
        _registered("E4M3", 4, 3, 7, "fn", note="OCP E4M3 (fn): forward operands"),
        _registered("E5M2", 5, 2, 15, "ieee", note="OCP E5M2: gradients"),
        _registered("E6M1", 6, 1, 31),
        _registered("E7M0", 7, 0, 63, note="powers of two only"),
    )
}

_SPEC = re.compile(r"^E(\d+)M(\d+)(?::(.*))?$", re.IGNORECASE)
_OPTIONS = ("bias", "special")


def _default_bias(E: int) -> int:
    """IEEE-style bias 2^(E-1) - 1; E0 gets 1 so that values are m / 2^M in [0, 1)."""
    return 2 ** (E - 1) - 1 if E >= 1 else 1


def get_format(name_or_spec: str | FloatFormat) -> FloatFormat:
    """Look up a registered format by name or build one from a spec string.

    ``E4M3`` is the registry's format; ``E3M4:bias=3``, ``E2M3`` (FP6), ``E2M1`` (FP4) and
    ``E4M3:special=ieee`` build custom ones. Unregistered names default to an IEEE-style bias
    and no special codes.
    """
    if isinstance(name_or_spec, FloatFormat):
        return name_or_spec
    text = str(name_or_spec).strip()
    match = _SPEC.match(text)
    if not match:
        raise FormatError(
            f"unknown format {text!r}; registered: {', '.join(REGISTRY)}; or a spec {SPEC_SYNTAX}"
        )
    E, M, options = int(match.group(1)), int(match.group(2)), match.group(3)
    base_name = f"E{E}M{M}"
    base = REGISTRY.get(base_name)
    if options is None:
        if base is not None:
            return base
        return FloatFormat(E, M, _default_bias(E), "none", name=base_name)
    settings = {"bias": base.bias if base else _default_bias(E),
                "special": base.special if base else "none"}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _OPTIONS:
            raise FormatError(f"bad option {item!r} in {text!r}; options are {', '.join(_OPTIONS)}")
        if key == "bias":
            try:
                settings["bias"] = int(value)
            except ValueError:
                raise FormatError(f"bias must be an integer, got {value!r}") from None
        else:
            settings["special"] = value.strip().lower()
    fmt = FloatFormat(E, M, settings["bias"], settings["special"])
    if base is not None and fmt == base:
        return base
    return fmt
