"""Rounding against gfloat and ml_dtypes by bit pattern, plus hypothesis properties."""

import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from hypothesis import given
from hypothesis import strategies as st
from oracles import ALL_FORMATS, EIGHT_BIT_FORMATS, gfloat_info, probe_points, same_bits

from altgrad.quantization import REGISTRY, get_format, quantize, quantize_ste
from altgrad.quantization.kernel import (
    random_bits,
    round_float32_bits,
    round_nearest_by_scaling,
    scaling_kernel_fits,
)
from altgrad.quantization.quantize import _params, draw_seed


def _quantize_np(points, fmt, **kwargs):
    return quantize(torch.from_numpy(points), fmt, kernel="eager", **kwargs).numpy()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_nearest_even_matches_gfloat_exhaustively(fmt):
    points = probe_points(fmt)
    reference = round_ndarray(gfloat_info(fmt), points.astype(np.float64), RoundMode.TiesToEven, sat=True)
    mine = _quantize_np(points, fmt)
    bad = ~same_bits(mine, reference)
    assert not bad.any(), list(zip(points[bad][:5], mine[bad][:5], reference[bad][:5]))


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if f.has_nan], ids=lambda f: f.name)
def test_unsaturated_overflow_matches_gfloat(fmt):
    points = probe_points(fmt)
    reference = round_ndarray(gfloat_info(fmt), points.astype(np.float64), RoundMode.TiesToEven, sat=False)
    assert same_bits(_quantize_np(points, fmt, saturate=False), reference).all()


@pytest.mark.parametrize("name, dtype", [("E4M3", ml_dtypes.float8_e4m3fn), ("E5M2", ml_dtypes.float8_e5m2)])
def test_ocp_formats_match_ml_dtypes_in_range(name, dtype):
    fmt = get_format(name)
    points = probe_points(fmt)
    points = points[np.isnan(points) | (np.abs(points) <= fmt.max)]  # ml_dtypes does not saturate
    reference = points.astype(dtype).astype(np.float32)
    assert same_bits(_quantize_np(points, fmt), reference).all()


@pytest.mark.parametrize(
    "name, dtype", [("E5M2", ml_dtypes.float8_e5m2), ("E3M4:bias=3,special=ieee", ml_dtypes.float8_e3m4),
                    ("E5M10:special=ieee", np.float16)]
)
def test_formats_with_inf_match_ieee_casts_without_saturation(name, dtype):
    fmt = get_format(name)
    points = probe_points(fmt)
    with np.errstate(over="ignore"):
        reference = points.astype(dtype).astype(np.float32)
    assert same_bits(_quantize_np(points, fmt, saturate=False), reference).all()


def test_e4m3_matches_torch_native_saturating_cast():
    fmt = get_format("E4M3")
    points = probe_points(fmt)
    points = points[np.isfinite(points)]
    native = torch.from_numpy(points).to(torch.float8_e4m3fn).float().numpy()
    assert same_bits(_quantize_np(points, fmt), native).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", EIGHT_BIT_FORMATS, ids=lambda f: f.name)
def test_half_precision_inputs_round_like_float32(fmt, dtype):
    if not fmt.fits(dtype):
        with pytest.raises(ValueError, match="cannot hold exactly"):
            quantize(torch.zeros(2, dtype=dtype), fmt)
        return
    x = torch.from_numpy(probe_points(fmt)).to(dtype)  # exact copies of representable points
    mine = quantize(x, fmt, kernel="eager")
    assert mine.dtype == dtype
    expected = quantize(x.float(), fmt, kernel="eager").to(dtype)
    assert same_bits(mine.float().numpy(), expected.float().numpy()).all()


def test_specials_and_signed_zero():
    x = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), -1e-30])
    e4m3 = quantize(x, "E4M3").numpy()
    assert np.isnan(e4m3[0])
    assert same_bits(e4m3[1:], np.array([-0.0, 0.0, 448.0, -448.0, -0.0], dtype=np.float32)).all()
    e5m2 = quantize(x, "E5M2", saturate=False).numpy()
    assert np.isinf(e5m2[3]) and e5m2[4] < 0 and np.isinf(e5m2[4])
    assert torch.isnan(quantize(torch.tensor([1000.0]), "E4M3", saturate=False)).all()


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        quantize(torch.zeros(2, dtype=torch.float64), "E4M3")
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize(torch.zeros(2), "E4M3", rounding="up")


# ---- stochastic rounding ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", EIGHT_BIT_FORMATS, ids=lambda f: f.name)
def test_stochastic_matches_gfloat_given_the_same_random_bits(fmt):
    """In each binade the kernel draws `shift` random bits; gfloat's stochastic mode with
    those bits must make the same decision for every element."""
    generator = torch.Generator().manual_seed(7)
    for exponent in sorted(set(fmt.exponents.tolist()) | {int(fmt.exponents[0]) - 3}):
        if exponent >= 127 or exponent < -126:
            continue
        x = torch.ldexp(1 + torch.rand(4096, generator=generator), torch.tensor(exponent))
        x = torch.where(torch.rand(4096, generator=generator) < 0.5, x, -x)
        emin_biased = fmt.emin + 127
        shift = 23 - fmt.mantissa_bits + max(emin_biased - (exponent + 127), 0)
        if shift > 30:
            continue
        seed = draw_seed(torch.Generator().manual_seed(exponent + 1000), torch.device("cpu"))
        mine = round_float32_bits(x, _params(fmt, True, torch.device("cpu")), seed).numpy()
        bits = random_bits(seed, x.shape, x.device).numpy().astype(np.int64) & ((1 << shift) - 1)
        reference = round_ndarray(gfloat_info(fmt), x.double().numpy(), RoundMode.Stochastic, sat=True,
                                  srbits=bits, srnumbits=shift)
        assert same_bits(mine, reference).all(), (fmt.name, exponent)


@given(
    fmt=st.sampled_from(EIGHT_BIT_FORMATS),
    index=st.integers(min_value=0, max_value=10**6),
    fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    negative=st.booleans(),
)
def test_stochastic_rounds_up_with_the_right_frequency(fmt, index, fraction, negative):
    values = fmt.positive_values
    lower_index = index % (len(values) - 1)
    lower, upper = values[lower_index], values[lower_index + 1]
    x = np.float32(lower + fraction * (upper - lower))
    p_up = (float(x) - lower) / (upper - lower)  # after float32 rounding of x
    n = 4000
    sign = -1.0 if negative else 1.0
    q = quantize(torch.full((n,), sign * float(x)), fmt, rounding="stochastic").double().abs().numpy()
    assert np.all((q == lower) | (q == upper))
    ups = int((q == upper).sum())
    tolerance = 6 * np.sqrt(n * p_up * (1 - p_up)) + 1
    assert abs(ups - n * p_up) <= tolerance


@pytest.mark.parametrize("name", ["E0M7", "E4M3", "E7M0"])
def test_stochastic_is_unbiased_far_below_the_smallest_value(name):
    """Deep underflow needs more random bits than a grid step has: P(up) must stay x / step."""
    fmt = get_format(name)
    n = 400_000
    for depth in (1, 5, 9, 12):
        x = fmt.min_positive * 1.5 * 2.0**-depth
        q = quantize(torch.full((n,), x), fmt, rounding="stochastic", kernel="eager")
        p_up = x / fmt.min_positive
        ups = int((q == fmt.min_positive).sum())
        assert abs(ups - n * p_up) <= 6 * np.sqrt(n * p_up) + 1, (depth, ups, n * p_up)


def test_stochastic_is_unbiased_on_average():
    x = torch.rand(200_000) * 3.0
    q = quantize(x, "E3M4", rounding="stochastic", generator=torch.Generator().manual_seed(0), kernel="eager")
    ulp = get_format("E3M4").ulp(x)
    # mean error in ULPs: std of one element's error is <= 1/2 ULP, so the mean is ~1e-3
    assert abs(float(((q - x) / ulp).mean())) < 5e-3


def test_stochastic_is_reproducible_from_a_generator():
    x = torch.randn(1000)
    first = quantize(x, "E5M2", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    again = quantize(x, "E5M2", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    other = quantize(x, "E5M2", rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    assert not torch.equal(first, other)
    torch.manual_seed(11)
    a = quantize(x, "E5M2", rounding="stochastic")
    torch.manual_seed(11)
    assert torch.equal(a, quantize(x, "E5M2", rounding="stochastic"))


def test_random_bits_are_uniform():
    bits = random_bits(torch.tensor([123, 456]), torch.Size([1 << 18]), torch.device("cpu"))
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**30
    for bit in (0, 7, 15, 29):
        ones = float(((bits >> bit) & 1).float().mean())
        assert abs(ones - 0.5) < 0.01


# ---- properties ------------------------------------------------------------------------------
finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(fmt=st.sampled_from(ALL_FORMATS), xs=st.lists(finite_floats, min_size=1, max_size=64))
def test_nearest_is_idempotent_monotone_and_on_the_grid(fmt, xs):
    x = torch.tensor(sorted(xs), dtype=torch.float32)
    q = quantize(x, fmt, kernel="eager")
    assert torch.equal(quantize(q, fmt, kernel="eager").view(torch.int32), q.view(torch.int32))
    assert bool((q[1:] >= q[:-1]).all())
    grid = fmt.grid().double()
    assert bool(torch.isin(q.double(), grid).all())


@given(fmt=st.sampled_from(EIGHT_BIT_FORMATS), xs=st.lists(finite_floats, min_size=1, max_size=64))
def test_stochastic_lands_on_a_neighbour(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float32)
    q = quantize(x, fmt, rounding="stochastic", kernel="eager")
    clamped = x.clamp(-fmt.max, fmt.max)
    down = torch.minimum(quantize(clamped, fmt), clamped)
    assert bool((q.abs() <= fmt.max).all())
    assert bool(((q - clamped).abs() <= fmt.ulp(clamped) * 1.0000001 + 0 * down).all())
    assert bool(torch.isin(q.double(), fmt.grid().double()).all())


def test_straight_through_gradient():
    x = torch.randn(64, requires_grad=True)
    upstream = torch.randn(64)
    quantize_ste(x * 1000, "E4M3").mul(upstream).sum().backward()  # some values saturate
    assert torch.equal(x.grad, upstream * 1000)


# ---- compiled kernel --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_is_bit_identical_to_eager(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(70_000, generator=generator) * torch.exp2(torch.randint(-40, 40, (70_000,), generator=generator))
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40])
    x = x.to(dtype)
    for fmt in REGISTRY.values():
        for rounding, sr_bits in (("nearest", None), ("stochastic", None), ("stochastic", 4)):  # sr_bits: data
            for saturate in (True, False):
                eager = quantize(x, fmt, rounding=rounding, saturate=saturate, kernel="eager",
                                 generator=torch.Generator().manual_seed(5), sr_bits=sr_bits)
                compiled = quantize(x, fmt, rounding=rounding, saturate=saturate, kernel="compiled",
                                    generator=torch.Generator().manual_seed(5), sr_bits=sr_bits)
                assert same_bits(eager.float().numpy(), compiled.float().numpy()).all(), (fmt.name, rounding, sr_bits)


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if scaling_kernel_fits(f.mantissa_bits, f.emin)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("saturate", [True, False])
def test_the_fast_nearest_kernel_equals_the_integer_kernel(fmt, saturate):
    """`quantize` uses round_nearest_by_scaling where it fits; the oracle tests above check it
    against gfloat; here it is checked against the integer kernel on every float32 exponent."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-149, 128, (200_000,), generator=generator).float()
    x = torch.randn(200_000, generator=generator).sign() * torch.exp2(exponents) * (
        1 + torch.rand(200_000, generator=generator))
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-40, 3.4e38, fmt.max, fmt.min_positive]
    x = torch.cat([x, torch.tensor(specials), torch.tensor(fmt.positive_values, dtype=torch.float32)])
    params = _params(fmt, saturate, torch.device("cpu"))
    assert same_bits(round_nearest_by_scaling(x, params).numpy(), round_float32_bits(x, params, None).numpy()).all()
