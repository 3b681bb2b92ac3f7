"""The native C kernel against the oracles and the torch kernels, bit for bit."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from hypothesis import given
from hypothesis import strategies as st
from oracles import ALL_FORMATS, gfloat_info, probe_points, same_bits

from altgrad.quantization import get_format, native, quantize
from altgrad.quantization.kernel import native_nearest_fits, round_float32_bits
from altgrad.quantization.quantize import _params, draw_seed
from altgrad.quantization.scaling import cast_to_grid, pow2_scale

SR_BITS = (None, 1, 4, 8, 13, 30)  # the random bits of stochastic rounding (None: the exact rule)
NATIVE_FORMATS = [f for f in ALL_FORMATS if native_nearest_fits(f.mantissa_bits, f.emin, f.max)]
BF16_FORMATS = [f for f in NATIVE_FORMATS if f.fits(torch.bfloat16)]
CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(native.library() is None, reason="native kernel unavailable (no C compiler)")
ALL_BFLOAT16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_the_kernel_builds_where_there_is_a_c_compiler():
    """CI has gcc: the native path must not silently fall back there."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    assert native.library() is not None, native.unavailable_reason()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return (a.view(view) == b.view(view)) | (a.isnan() & b.isnan())


@needs_native
@pytest.mark.parametrize("fmt, saturate", [(f, True) for f in NATIVE_FORMATS] + [(f, False) for f in NATIVE_FORMATS
                                                                               if f.has_nan],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_native_nearest_matches_gfloat_exhaustively(fmt, saturate):
    points = probe_points(fmt)
    reference = round_ndarray(gfloat_info(fmt), points.astype(np.float64), RoundMode.TiesToEven, sat=saturate)
    mine = quantize(torch.from_numpy(points), fmt, saturate=saturate, kernel="native").numpy()
    bad = ~same_bits(mine, reference)
    assert not bad.any(), list(zip(points[bad][:5], mine[bad][:5], reference[bad][:5]))


@needs_native
@pytest.mark.parametrize("fmt", BF16_FORMATS, ids=lambda f: f.name)
def test_every_bfloat16_value_times_every_scale_rounds_like_the_integer_kernel(fmt):
    """All 65,536 bfloat16 inputs, scales across the whole float32 range, both output dtypes."""
    params = _params(fmt, True, CPU)
    for k in (-126, -60, -20, -7, -1, 0, 1, 5, 20, 60, 127):
        reference = round_float32_bits(ALL_BFLOAT16.float() * 2.0**k, params, None)
        for out_dtype in (torch.float32, torch.bfloat16):
            mine = native.round_to_grid(ALL_BFLOAT16, params, out_dtype, scale=2.0**k)
            assert _bits_equal(mine, reference.to(out_dtype)).all(), (k, out_dtype)


@needs_native
@pytest.mark.parametrize("fmt", NATIVE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("saturate", [True, False])
def test_float32_inputs_in_every_binade_round_like_the_integer_kernel(fmt, saturate):
    generator = torch.Generator().manual_seed(0)
    n = 100_003  # not a multiple of the vector width: the tail path too
    exponents = torch.randint(-149, 128, (n,), generator=generator).float()
    x = torch.randn(n, generator=generator).sign() * torch.exp2(exponents) * (1 + torch.rand(n, generator=generator))
    values = torch.tensor(fmt.positive_values, dtype=torch.float32)
    ties = (values[1:] + values[:-1]) / 2
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-40, 3.4e38]
    x = torch.cat([x, torch.tensor(specials), values, -ties, torch.nextafter(ties, torch.zeros_like(ties))])
    params = _params(fmt, saturate, CPU)
    assert _bits_equal(native.round_to_grid(x, params, torch.float32), round_float32_bits(x, params, None)).all()


finite_or_special = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@needs_native
@given(fmt=st.sampled_from(BF16_FORMATS), xs=st.lists(finite_or_special, min_size=1, max_size=100),
       reference_amax=st.one_of(st.none(), st.floats(0, 1e6, width=32)), margin=st.integers(0, 3),
       bf16_in=st.booleans())
def test_the_native_cast_equals_the_eager_cast(fmt, xs, reference_amax, margin, bf16_in):
    x = torch.tensor(xs, dtype=torch.float32).to(torch.bfloat16 if bf16_in else torch.float32)
    reference = None if reference_amax is None else torch.tensor(reference_amax)
    q, scale, amax = cast_to_grid(x, fmt, reference, margin=margin, out_dtype=torch.bfloat16, kernel="native")
    q_ref, scale_ref, amax_ref = cast_to_grid(x, fmt, reference, margin=margin, out_dtype=torch.bfloat16,
                                              kernel="eager")
    assert _bits_equal(q, q_ref).all()
    assert isinstance(scale, float) and isinstance(amax, float)  # no tensor ops for scalars on CPU
    assert _bits_equal(torch.tensor(scale), scale_ref) and _bits_equal(torch.tensor(amax), amax_ref)


@needs_native
@pytest.mark.parametrize("spec", ["E4M3", "E0M7", "E7M0", "E5M10", "E4M10", "E3M12"])
def test_bfloat16_outputs_of_whole_vectors_round_only_grids_finer_than_bfloat16(spec):
    """In range, a grid that fits bfloat16 is stored by truncation; a finer one (E5M10: 10 bits)
    is rounded to bfloat16 as the torch kernel's ``.to(bfloat16)`` does."""
    fmt = get_format(spec)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4099, generator=generator) * torch.exp2(torch.randint(-40, 10, (4099,), generator=generator))
    q, _, _ = cast_to_grid(x, fmt, None, out_dtype=torch.bfloat16, kernel="native")
    q_ref, _, _ = cast_to_grid(x, fmt, None, out_dtype=torch.bfloat16, kernel="eager")
    assert _bits_equal(q, q_ref).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 33, 1000, 70_001, 300_007])  # the last: threaded
def test_amax_and_scale_on_every_tail_length(dtype, n):
    generator = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=generator) * 3).to(dtype)
    params = _params(get_format("E4M3"), True, CPU)
    _, scale, amax, _ = native.cast(x, params, None, 0, torch.bfloat16)
    expected = x.float().abs().amax()
    assert amax == expected.item()
    assert scale == pow2_scale(expected, params[2], torch.tensor(0, dtype=torch.int32)).item()
    x[n // 2] = float("nan")
    assert native.amax(x).isnan()


@needs_native
def test_non_contiguous_inputs_and_shapes_are_kept():
    x = torch.randn(64, 48).t()
    q = quantize(x, "E4M3", kernel="native")
    assert q.shape == x.shape
    assert torch.equal(q, quantize(x.contiguous(), "E4M3", kernel="eager"))


def test_without_a_compiler_it_falls_back_once_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-altgrad")
    monkeypatch.setenv("ALTGRAD_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        x = torch.randn(1000)
        with caplog.at_level(logging.WARNING, logger="altgrad.quantization.native"):
            q = quantize(x, "E4M3")  # auto: falls back to the torch kernels
            quantize(x, "E4M3")
        assert torch.equal(q, quantize(x, "E4M3", kernel="eager"))
        assert len([r for r in caplog.records if "native quantize kernel unavailable" in r.message]) == 1
        with pytest.raises(RuntimeError, match="no-such-compiler-altgrad"):
            quantize(x, "E4M3", kernel="native")
    finally:
        native.reset()


@needs_native
def test_the_build_is_cached_by_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("ALTGRAD_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        assert native.library() is not None
        built = {path: path.stat().st_mtime_ns for path in tmp_path.glob("native-*.so")}
        assert built  # one library (two where an OpenMP build compiled but could not load)
        native.reset()
        assert native.library() is not None
        assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("native-*.so")} == built  # reused
    finally:
        native.reset()


# ---- stochastic rounding ------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("fmt, dtype", [(f, d) for f in ALL_FORMATS for d in (torch.float32, torch.bfloat16)
                                        if f.fits(d)], ids=lambda v: getattr(v, "name", str(v)))
def test_native_stochastic_equals_the_torch_kernel_given_the_same_generator(fmt, dtype):
    """The exact rule and few-bit rounding (sr_bits) alike."""
    generator = torch.Generator().manual_seed(1)
    n = 50_021
    x = torch.randn(n, generator=generator) * torch.exp2(torch.randint(-30, 30, (n,), generator=generator))
    x[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, fmt.max * 1.5, 1e-42])
    x = x.to(dtype)
    for saturate in (True, False):
        for sr_bits in SR_BITS:
            mine = quantize(x, fmt, rounding="stochastic", saturate=saturate, kernel="native",
                            generator=torch.Generator().manual_seed(7), sr_bits=sr_bits)
            reference = quantize(x, fmt, rounding="stochastic", saturate=saturate, kernel="eager",
                                 generator=torch.Generator().manual_seed(7), sr_bits=sr_bits)
            assert _bits_equal(mine, reference).all(), (fmt.name, saturate, sr_bits)


@needs_native
def test_random_bits_carry_into_the_high_word_like_the_reference():
    """Indices across 2^32 (tensors that large are rare; the carry must still be right)."""
    from altgrad.quantization.kernel import _MASK32, _RANDOM_BITS, _mix32

    seed = torch.tensor([0x12345678, 0x9ABCDEF0], dtype=torch.int64)
    start = 2**32 - 37
    index = torch.arange(start, start + 100, dtype=torch.int64)
    h = _mix32(_mix32((index & _MASK32) ^ seed[0]) ^ (index >> 32) ^ seed[1])
    assert torch.equal(native.random_bits(start, 100, seed), (h >> (32 - _RANDOM_BITS)).to(torch.int32))


@needs_native
@given(fmt=st.sampled_from(BF16_FORMATS), xs=st.lists(finite_or_special, min_size=1, max_size=100),
       reference_amax=st.one_of(st.none(), st.floats(0, 1e6, width=32)), seed=st.integers(0, 2**31),
       sr_bits=st.sampled_from(SR_BITS))
def test_the_native_stochastic_cast_equals_the_eager_cast(fmt, xs, reference_amax, seed, sr_bits):
    x = torch.tensor(xs, dtype=torch.float32)
    reference = None if reference_amax is None else torch.tensor(reference_amax)
    results = [cast_to_grid(x, fmt, reference, rounding="stochastic", generator=torch.Generator().manual_seed(seed),
                            out_dtype=torch.bfloat16, kernel=kernel, sr_bits=sr_bits) for kernel in ("native", "eager")]
    assert _bits_equal(results[0][0], results[1][0]).all()
    assert float(results[0][1]) == float(results[1][1])


# ---- dequantizing casts (the GEMM operands of QuantizedLinear) -----------------------------
FINITE_BFLOAT16 = ALL_BFLOAT16[torch.isfinite(ALL_BFLOAT16)]


def _dequantized_reference(x, fmt, reference, rounding, seed, out_dtype, sr_bits=None):
    """The eager cast's grid values and scale, and those values divided by the scale (float32, exact
    where dequantize_exact holds)."""
    generator = torch.Generator().manual_seed(seed) if rounding == "stochastic" else None
    q, scale, _ = cast_to_grid(x, fmt, reference, rounding=rounding, generator=generator, out_dtype=torch.float32,
                               kernel="eager", sr_bits=sr_bits)
    return q, float(scale), (q * (1.0 / float(scale))).to(out_dtype)


@needs_native
@pytest.mark.parametrize("fmt, rounding, sr_bits",
                         [(f, rounding, None) for rounding in ("nearest", "stochastic") for f in BF16_FORMATS]
                         + [(get_format(spec), "stochastic", bits) for spec, bits in (("E4M3", 4), ("E5M2", 1),
                                                                                      ("E3M4", 13), ("E0M7", 8))],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_a_dequantizing_cast_writes_q_over_scale_bit_for_bit(fmt, rounding, sr_bits):
    """Every finite bfloat16 value, in tensors whose amax gives scales across float32's whole range
    (current scaling: the in-range direct rounding, or the unscale multiply where its constant would
    overflow), and under a stale reference amax (overflow: the general path). Where
    `dequantize_exact` fails (tiny amax: scale 2^127), the values stay scaled and carry the scale."""
    from altgrad.quantization.scaling import cast_operand, dequantize_exact

    exponents = (FINITE_BFLOAT16.float().view(torch.int32) >> 23) & 0xFF
    seen_direct = seen_scaled = 0
    for top in (1, 8, 60, 117, 127, 140, 190, 254):  # the largest biased exponent in the tensor
        x = FINITE_BFLOAT16[exponents <= top]
        for reference in (None, torch.tensor(float(x.float().abs().amax()) / 64)):
            for out_dtype in (torch.float32, torch.bfloat16):
                generator = torch.Generator().manual_seed(top) if rounding == "stochastic" else None
                values, scale, _, carried = cast_operand(x, fmt, reference, rounding=rounding, generator=generator,
                                                         out_dtype=out_dtype, kernel="native", sr_bits=sr_bits)
                q, scale_ref, dequantized = _dequantized_reference(x, fmt, reference, rounding, top, out_dtype,
                                                                   sr_bits)
                assert scale == scale_ref
                if dequantize_exact(fmt, scale):
                    assert carried == 1.0 and _bits_equal(values, dequantized).all(), (top, reference, out_dtype)
                    seen_direct += 1
                else:
                    assert carried == scale and _bits_equal(values, q.to(out_dtype)).all(), (top, out_dtype)
                    seen_scaled += 1
    assert seen_direct and seen_scaled


@needs_native
@pytest.mark.parametrize("fmt", BF16_FORMATS, ids=lambda f: f.name)
def test_bfloat16_to_bfloat16_casts_in_16_bit_lanes_round_every_value_exactly(fmt):
    """The gradient cast's path (bfloat16 in and out, nearest, in range, dequantized: integer
    rounding on 16-bit lanes, five operations where every non-zero lane of a vector lies at or
    above the grid's floor binade, per-lane shifts where one lies below). Every finite bfloat16
    value, shuffled so that vectors mix both kinds of lane, zeros and subnormals, at scales that
    put the floor anywhere (its spacing down to 2^-126), with tail lengths; plus fixed ties below
    the floor: at 1.5 x 2^e where the spacing is 2^e (rounds up, to the even multiple 2), at 2^e
    where it is 2^(e+1) (to the even 0), and a subnormal exactly at half the smallest spacing."""
    from altgrad.quantization.scaling import cast_operand

    exponents = (FINITE_BFLOAT16.float().view(torch.int32) >> 23) & 0xFF
    order = torch.randperm(len(FINITE_BFLOAT16), generator=torch.Generator().manual_seed(fmt.mantissa_bits))
    shuffled, shuffled_exponents = FINITE_BFLOAT16[order], exponents[order]
    for top in (2, 5, 8, 20, 60, 127, 200, 254):
        x = shuffled[shuffled_exponents <= top]
        for n in (len(x), 31, 33, 4099):
            values, scale, _, carried = cast_operand(x[:n], fmt, None, out_dtype=torch.bfloat16, kernel="native")
            _, _, expected = _dequantized_reference(x[:n], fmt, None, "nearest", 0, torch.bfloat16)
            if carried == 1.0:
                assert _bits_equal(values, expected).all(), (top, n)
    # ties below the floor, at a scale where the floor's spacing is 2^(E0 - M): amax = max pins it
    spacing = 2.0 ** (fmt.emin - fmt.mantissa_bits)
    ties = [1.5 * spacing / 2, spacing / 2, 3 * spacing / 2, spacing / 4, 2.0 ** -127, 2.0 ** -126]
    for shift in (0, 40, 100, 120):
        unit = 2.0 ** -shift
        x = torch.tensor([fmt.max * unit] + [t * unit for t in ties] + [-t * unit for t in ties] + [0.0, -0.0])
        x = x.to(torch.bfloat16)
        values, scale, _, carried = cast_operand(x, fmt, None, out_dtype=torch.bfloat16, kernel="native")
        _, _, expected = _dequantized_reference(x, fmt, None, "nearest", 0, torch.bfloat16)
        if carried == 1.0:
            assert _bits_equal(values, expected).all(), (shift, values, expected)


@needs_native
@pytest.mark.parametrize("fmt", NATIVE_FORMATS + [get_format("E7M0")], ids=lambda f: f.name)
def test_the_kernel_dequantizes_exactly_where_dequantize_exact_says(fmt):
    """The C rule and the Python rule agree for every power-of-two scale (picked with a reference
    amax); the values then equal the eager cast over the scale, and are never subnormal."""
    from altgrad.quantization.scaling import cast_operand, dequantize_exact

    generator = torch.Generator().manual_seed(0)
    for k in range(-126, 128):
        reference = torch.tensor(fmt.max * 2.0**-k, dtype=torch.float32)
        if not torch.isfinite(reference) or reference == 0:
            continue
        x = (torch.rand(257, generator=generator) * 2 - 1) * reference  # in range: the direct rounding
        x[:3] = torch.tensor([0.0, -0.0, float(reference)])
        for rounding in ("nearest", "stochastic"):
            generator_seed = torch.Generator().manual_seed(k) if rounding == "stochastic" else None
            values, scale, _, carried = cast_operand(x, fmt, reference, rounding=rounding, generator=generator_seed,
                                                     out_dtype=torch.float32)
            q, scale_ref, dequantized = _dequantized_reference(x, fmt, reference, rounding, k, torch.float32)
            assert scale == scale_ref
            expected = 1.0 if dequantize_exact(fmt, scale) else scale
            assert carried == expected, (k, scale)
            assert _bits_equal(values, dequantized if carried == 1.0 else q).all(), (k, rounding)
            if carried == 1.0:
                nonzero = values[values != 0].abs()
                assert (nonzero >= 2.0**-126).all()
            assert _bits_equal(values[:2], torch.tensor([0.0, -0.0])).all()  # signed zeros kept


def _cast_results(x, fmt, rounding, guess, dequantize=True):
    params = _params(fmt, True, CPU, 5 if rounding == "stochastic-5" else None)
    seed = torch.tensor([12345, 678], dtype=torch.int64) if rounding.startswith("stochastic") else None
    return native.cast(x, params, None, 0, torch.bfloat16, seed, dequantize, guess)


@needs_native
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "stochastic-5"])
@pytest.mark.parametrize("fmt", [get_format(spec) for spec in ("E4M3", "E5M2", "E0M7", "E3M4")], ids=lambda f: f.name)
def test_a_guessed_scale_never_changes_the_cast(fmt, rounding):
    """The one-pass cast with the stream's last scale: right, too large (values out of range while
    it runs), too small, and for tensors whose own mode differs (inf, NaN, an amax so large that
    the scale clamps and saturates): every output equals the two-pass cast's, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(4099, generator=generator)
    cases = [base, base * 1e-30, base * 1e30, base.clone().index_fill_(0, torch.tensor([7]), float("inf")),
             base.clone().index_fill_(0, torch.tensor([9]), float("nan")), torch.full((33,), 3e38), torch.zeros(40),
             torch.tensor([-0.0, 0.0, 1e-45])]
    for x in cases:
        for dtype in (torch.float32, torch.bfloat16):
            x_in = x.to(dtype)
            expected = _cast_results(x_in, fmt, rounding, 0.0)
            right = expected[1]
            for guess in (right, right * 2.0, right * 0.5, right * 2.0**40, 2.0**-126, 1.0):
                got = _cast_results(x_in, fmt, rounding, guess)
                assert _bits_equal(got[0], expected[0]).all(), (x[:3], dtype, guess)
                assert (got[1], got[3]) == (expected[1], expected[3])  # scale, dequantized
                assert _bits_equal(torch.tensor(got[2]), torch.tensor(expected[2]))  # amax (NaN too)


@needs_native
@pytest.mark.parametrize("fmt", [get_format(spec) for spec in ("E4M3", "E5M2", "E0M7", "E7M0", "E3M4")],
                         ids=lambda f: f.name)
def test_the_native_projection_equals_the_eager_cast_over_its_scale(fmt):
    """native.project (a stored weight's projection, in place) is cast_to_grid's q(w s) / s at the
    amax scale, nearest and stochastic with every sr_bits, margins and a tail length."""
    generator = torch.Generator().manual_seed(fmt.bits)
    w = torch.randn(4099, generator=generator) * torch.exp2(torch.randint(-20, 4, (4099,), generator=generator))
    w[:3] = torch.tensor([0.0, -0.0, 1e-30])
    for rounding, sr_bits in [("nearest", None)] + [("stochastic", bits) for bits in SR_BITS]:
        for margin in (0, 2):
            mine = w.clone()
            seed = draw_seed(torch.Generator().manual_seed(margin), CPU) if rounding == "stochastic" else None
            scale = native.project(mine, _params(fmt, True, CPU, sr_bits), margin, seed)
            generator = torch.Generator().manual_seed(margin) if rounding == "stochastic" else None  # the same seed
            q, scale_ref, _ = cast_to_grid(w, fmt, margin=margin, rounding=rounding, generator=generator,
                                           out_dtype=torch.float32, kernel="eager", sr_bits=sr_bits)
            assert scale == float(scale_ref)
            assert _bits_equal(mine, q * (1.0 / scale)).all(), (rounding, sr_bits, margin)


@needs_native
def test_statistics_of_a_dequantized_cast_equal_those_of_the_scaled_one():
    from altgrad.quantization.scaling import cast_operand, measure_cast

    fmt = get_format("E4M3")
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(5000, generator=generator) * torch.exp2(torch.randint(-25, 5, (5000,), generator=generator)))
    for reference in (None, torch.tensor(0.05)):
        values, scale, _, carried = cast_operand(x, fmt, reference, out_dtype=torch.bfloat16)
        assert carried == 1.0
        q, _, _ = cast_to_grid(x, fmt, reference, out_dtype=torch.bfloat16)
        for kernel in ("native", "eager"):
            mine = measure_cast(x, scale, values, fmt, kernel=kernel, carried=carried)
            scaled = measure_cast(x, scale, q, fmt, kernel=kernel)
            assert mine == scaled
        assert mine.underflow > 0 and (reference is None or mine.overflow > 0)


# ---- cast statistics ----------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, spec", [(1, "E4M3"), (17, "E4M3"), (5_000, "E4M3"), (100_003, "E4M3"), (5_000, "E5M2"),
                                     (5_000, "E6M1"), (5_000, "E7M0"), (5_000, "E0M7"), (100_003, "E3M4")])
def test_native_cast_statistics_equal_the_torch_ones(x_dtype, n, spec):
    """Counts, energies and the binades in use, for formats whose binades span one float32
    exponent word (E4M3) up to four (E7M0)."""
    from altgrad.quantization.scaling import measure_cast

    fmt = get_format(spec)
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=generator) * torch.exp2(torch.randint(-90, 5, (n,), generator=generator))
    x[: min(n, 5)] = torch.tensor([float("nan"), float("inf"), 1e30, -0.0, 1e-30])[: min(n, 5)]
    x = x.to(x_dtype)
    for reference in (None, torch.tensor(0.05)):  # own amax; a stale one: overflow, saturation
        q, scale, _ = cast_to_grid(x, fmt, reference, out_dtype=torch.bfloat16, kernel="auto")
        mine = measure_cast(x, scale, q, fmt, kernel="native")
        torch_stats = measure_cast(x, scale, q, fmt, kernel="eager")
        assert (mine.numel, mine.overflow, mine.underflow, mine.binades_used, mine.scale) == (
            torch_stats.numel, torch_stats.overflow, torch_stats.underflow, torch_stats.binades_used, torch_stats.scale)
        assert mine.signal == pytest.approx(torch_stats.signal, rel=1e-12)
        assert mine.noise == pytest.approx(torch_stats.noise, rel=1e-12)
    assert mine.overflow > 0 or n < 5


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (768, 128), (2, 5, 33)])
def test_nonzero_columns_equal_the_torch_reduction(dtype, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    q = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.01)
    q.view(-1)[: q.shape[-1] // 2] = -0.0  # a signed zero is zero
    q = q.to(dtype)
    assert torch.equal(native.nonzero_columns(q), (q != 0).reshape(-1, q.shape[-1]).any(0))


# ---- edges found in review ----------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("spec", ["E7M1:bias=0", "E7M2:bias=2", "E6M3:bias=-50"])
def test_formats_with_a_huge_max_round_exactly(spec):
    """max >= 2^(105+M) would overflow the magic constant: such formats take the torch kernel."""
    fmt = get_format(spec)
    assert not native_nearest_fits(fmt.mantissa_bits, fmt.emin, fmt.max)
    x = torch.tensor([1.3 * 2.0**110, -1.7 * 2.0**120, 3.0, fmt.max * 0.9, 1e-30])
    assert _bits_equal(quantize(x, fmt, kernel="native"), quantize(x, fmt, kernel="eager")).all()
    for kernel in ("native", "eager"):
        assert cast_to_grid(x, fmt, kernel=kernel)[0].isfinite().all()


@needs_native
def test_quantize_without_a_scale_keeps_signalling_nan_payloads():
    x = torch.tensor([0x7F800001, -0x7FBFFFFF, 0x7FC00123], dtype=torch.int32).view(torch.float32)
    for rounding in ("nearest", "stochastic"):
        mine = quantize(x, "E4M3", rounding=rounding, kernel="native", generator=torch.Generator().manual_seed(0))
        reference = quantize(x, "E4M3", rounding=rounding, kernel="eager", generator=torch.Generator().manual_seed(0))
        assert torch.equal(mine.view(torch.int32), reference.view(torch.int32))


@needs_native
def test_outputs_stay_on_cpu_under_another_default_device():
    x = torch.randn(1000)
    torch.set_default_device("meta")
    try:
        q = quantize(x, "E4M3", kernel="native")
        cast = cast_to_grid(x, get_format("E4M3"), out_dtype=torch.bfloat16, kernel="native")[0]
    finally:
        torch.set_default_device(None)
    assert q.device.type == cast.device.type == "cpu"
    assert torch.equal(q, quantize(x, "E4M3", kernel="eager"))


@needs_native
def test_amax_of_a_non_contiguous_view():
    x = torch.rand(512, 384).t()
    assert native.amax(x) == x.abs().amax()


@needs_native
def test_concurrent_first_use_builds_once_and_nobody_sees_it_missing(monkeypatch, tmp_path):
    import threading

    monkeypatch.setenv("ALTGRAD_CACHE_DIR", str(tmp_path))
    native.reset()
    errors, results = [], []

    def work():
        try:
            results.append(quantize(torch.ones(100), "E4M3", kernel="native"))
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        native.reset()
    assert not errors and len(results) == 4


@needs_native
def test_cc_may_carry_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("ALTGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{os.environ.get('CC', 'cc')} -DALTGRAD_UNUSED=1")
    native.reset()
    try:
        assert native.library() is not None, native.unavailable_reason()
    finally:
        native.reset()


@needs_native
def test_quantized_linear_agrees_across_kernels_at_extreme_scales(monkeypatch):
    """Tiny weights and inputs give scales near 2^68 whose product overflows float32 while its
    inverse is still a float32 (subnormal): the unscale factors are products of inverses on
    every path, so the kernels agree, and the output is not flushed to zero."""
    from altgrad.quantization.linear import LinearQuantConfig, QuantizedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight.mul_(1e-18)
    inputs = torch.randn(8, 32) * 1e-18
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")
    results = []
    for kernel in ("native", "eager"):
        monkeypatch.setenv("ALTGRAD_KERNEL", kernel)
        layer = QuantizedLinear.from_linear(linear, config)
        x = inputs.clone().requires_grad_()
        y = layer(x)
        y.sum().backward()
        results.append((y.detach(), x.grad, linear.weight.grad))
        linear.weight.grad = None
    for mine, reference in zip(*results):
        assert _bits_equal(mine, reference).all()
    assert results[0][0].abs().sum() > 0  # the output survives
