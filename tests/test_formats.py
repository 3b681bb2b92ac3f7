"""Format registry and transfer functions against DESIGN.md's table, gfloat and ml_dtypes."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import decode_ndarray
from oracles import ALL_FORMATS, gfloat_info

from altgrad.quantization import REGISTRY, FormatError, get_format

# name: (E, M, bias, has_inf, max finite, smallest > 0), copied from DESIGN.md section 1.
DESIGN_TABLE = {
    "E0M7": (0, 7, 1, False, 127 / 128, 1 / 128),
    "E1M6": (1, 6, 0, False, 127 / 32, 1 / 32),
    "E2M5": (2, 5, 1, False, 7.875, 1 / 32),
    "E3M4": (3, 4, 1, False, 124, 1 / 16),
    "E4M3": (4, 3, 7, False, 448, 2.0**-9),
    "E5M2": (5, 2, 15, True, 57344, 2.0**-16),
    "E6M1": (6, 1, 31, False, 1.5 * 2.0**32, 2.0**-31),
    "E7M0": (7, 0, 63, False, 2.0**64, 2.0**-62),
}


def test_registry_is_exactly_the_design_table():
    assert list(REGISTRY) == list(DESIGN_TABLE)
    for name, (E, M, bias, has_inf, largest, smallest) in DESIGN_TABLE.items():
        fmt = get_format(name)
        assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.has_inf) == (E, M, bias, has_inf)
        assert fmt.max == largest and fmt.min_positive == smallest


def test_nan_codes_follow_the_design_table():
    nan_codes = {name: int(np.isnan(get_format(name).decode(get_format(name).codes())).sum()) for name in REGISTRY}
    assert nan_codes == {"E0M7": 0, "E1M6": 0, "E2M5": 0, "E3M4": 0, "E4M3": 2, "E5M2": 6, "E6M1": 0, "E7M0": 0}


def test_uniform_formats_have_uniform_steps():
    for name, step in (("E0M7", 1 / 128), ("E1M6", 1 / 32)):
        assert np.all(np.diff(get_format(name).positive_values) == step)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_decode_matches_gfloat_for_every_code(fmt):
    codes = fmt.codes()
    mine = fmt.decode(codes)
    reference = decode_ndarray(gfloat_info(fmt), codes)
    nan = np.isnan(reference)
    assert np.array_equal(np.isnan(mine), nan)
    assert np.array_equal(mine[~nan].view(np.int64), reference[~nan].view(np.int64))  # -0 included


@pytest.mark.parametrize(
    "name, dtype", [("E4M3", ml_dtypes.float8_e4m3fn), ("E5M2", ml_dtypes.float8_e5m2),
                    ("E5M10:special=ieee", np.float16), ("E3M4:bias=3,special=ieee", ml_dtypes.float8_e3m4)]
)
def test_decode_matches_ml_dtypes(name, dtype):
    fmt = get_format(name)
    raw = fmt.codes().astype(np.uint16 if fmt.bits > 8 else np.uint8)
    reference = raw.view(dtype).astype(np.float64)
    mine = fmt.decode(fmt.codes())
    assert np.array_equal(mine, reference, equal_nan=True)
    assert np.array_equal(np.signbit(mine[~np.isnan(mine)]), np.signbit(reference[~np.isnan(reference)]))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_encode_inverts_decode(fmt):
    codes = fmt.codes()
    values = fmt.decode(codes)
    finite = np.isfinite(values)
    assert np.array_equal(fmt.encode(values[finite]), codes[finite])


def test_encode_rejects_values_off_the_grid():
    with pytest.raises(FormatError, match="quantize it first"):
        get_format("E4M3").encode(0.3)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_grid_and_ulp_agree(fmt):
    values = fmt.positive_values
    assert values[0] == 0 and np.all(np.diff(values) > 0)
    grid = fmt.grid().double().numpy()
    assert np.array_equal(grid, np.concatenate([-values[:0:-1], values]))
    assert fmt.num_finite == len(grid)
    # ULP at a value is the gap to the next value above it (for every value below max) ...
    ulp = fmt.ulp(torch.tensor(values[:-1], dtype=torch.float32)).double().numpy()
    assert np.array_equal(ulp, np.diff(values))
    # ... is the same anywhere inside a binade, is symmetric, and floors at the smallest step.
    inside = torch.tensor((values[1:-1] + values[2:]) / 2, dtype=torch.float32)
    assert torch.equal(fmt.ulp(inside), fmt.ulp(-inside))
    assert float(fmt.ulp(0.0)) == values[1] - values[0] or fmt.mantissa_bits == 0


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_range_properties(fmt):
    assert fmt.binades == pytest.approx(math.log2(fmt.max / fmt.min_positive))
    if fmt.min_subnormal is not None:
        assert fmt.min_subnormal == fmt.min_positive
    if fmt.min_normal is not None:
        assert fmt.min_normal in set(fmt.positive_values)


def test_spec_strings():
    assert get_format("e4m3") is REGISTRY["E4M3"]
    assert get_format("E4M3:bias=7,special=fn") is REGISTRY["E4M3"]
    fp6 = get_format("E2M3")
    assert (fp6.bias, fp6.max, fp6.special) == (1, 7.5, "none")
    assert get_format("E2M1").max == 6.0
    assert get_format("E3M2").max == 28.0
    custom = get_format("E3M4:bias=3")
    assert custom.bias == 3 and custom.max == 31.0 and custom.name == "E3M4:bias=3,special=none"
    assert get_format(custom.spec) == custom
    assert get_format("E4M3:special=ieee").max == 240.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("E9M9", "at most 16"),
        ("FP8", "unknown format"),
        ("E4M3:bias=x", "integer"),
        ("E4M3:color=red", "options are bias, special"),
        ("E4M3:special=odd", "special must be one of"),
        ("E1M2:special=ieee", "E >= 2"),
        ("E8M7:special=ieee", "float32's normal range"),
    ],
)
def test_invalid_specs_raise_clear_errors(spec, message):
    with pytest.raises(FormatError, match=message):
        get_format(spec)


def test_fits_dtypes():
    assert get_format("E4M3").fits(torch.float16) and get_format("E4M3").fits(torch.bfloat16)
    assert not get_format("E7M0").fits(torch.float16)
    assert all(fmt.fits(torch.bfloat16) for fmt in REGISTRY.values())
