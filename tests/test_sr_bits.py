"""Few-bit stochastic rounding (``sr_bits``): the rule against Fitzgibbon and Felix's reference
(gfloat's StochasticFastest), its bias against the closed form by exact enumeration of the
noise, its edge cases, and the default unchanged bit for bit.

The rule (`kernel` module doc): ``kept = min(shift, N)`` random bits, the fraction of a grid
step truncated to N bits. For |x| = (k + f) d, d the spacing at x, the number of the 2^N noise
values that round up is floor(2^N f), so

    E[q(x)] - x = -sign(x) d 2^-N frac(2^N f)        (0 <= bias magnitude < d 2^-N)

and GridOptim's stochastic move of v rungs is the same rule on the integer grid (d = 1).
"""

import hashlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from oracles import EIGHT_BIT_FORMATS, gfloat_info, same_bits
from torch import nn

from altgrad.model.surgery import build_policy, quantize_model
from altgrad.optim import OptimizerSpec, build_optimizer
from altgrad.optim.grid import random_rungs
from altgrad.quantization import get_format, native, quantize
from altgrad.quantization.kernel import random_bits, round_float32_bits, sr_bits_value
from altgrad.quantization.quantize import _params, draw_seed
from altgrad.quantization.scaling import cast_to_grid

CPU = torch.device("cpu")
SR_BITS = (1, 4, 8, 13, 30)
ENUMERATED_BITS = (1, 4, 8, 13)  # 2^N noise values, each seen once
KERNELS = ["eager"] + (["native"] if native.library() is not None else [])
needs_native = pytest.mark.skipif(native.library() is None, reason="native kernel unavailable (no C compiler)")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


def exact_shift(x: torch.Tensor, fmt) -> torch.Tensor:
    """The bits below the grid step of each float32 x (kernel.round_float32_bits' exact_shift)."""
    exponent = (x.float().view(torch.int32) >> 23) & 0xFF
    effective = exponent.clamp(min=1)
    return 23 - fmt.mantissa_bits + torch.clamp(effective, min=fmt.emin + 127) - effective


# ---- the closed form -------------------------------------------------------------------------
def step_and_fraction(x: float, fmt) -> tuple[Fraction, int, Fraction]:
    """(d, k, f) with |x| = (k + f) d exactly: d the grid spacing at |x| (binade floored at emin)."""
    magnitude = Fraction(abs(x))
    binade = max(math.frexp(abs(x))[1] - 1, fmt.emin) if x != 0 else fmt.emin
    spacing = Fraction(2) ** (binade - fmt.mantissa_bits)
    k = math.floor(magnitude / spacing)
    return spacing, k, magnitude / spacing - k


def closed_form_bias(x: float, fmt, n_bits: int) -> Fraction:
    """E[q(x)] - x = -sign(x) d 2^-N frac(2^N f), exactly."""
    spacing, _, f = step_and_fraction(x, fmt)
    scaled = f * 2**n_bits
    return -math.copysign(1, x) * spacing * (scaled - math.floor(scaled)) / 2**n_bits


def noise_layout(count: int, n_bits: int, seed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(indices [2^N, count], length): row r holds ``count`` flat indices of a tensor of that length
    whose low N random bits (the noise the kernel adds there) are r. A tensor holding x_j at column
    j's indices, rounded once, shows each x_j with every noise value exactly once."""
    length = 2**n_bits * (2 * count + 40)  # Poisson(2 count + 40) per value: never fewer than count
    noise = random_bits(seed, torch.Size([length]), CPU).long() & (2**n_bits - 1)
    counts = torch.bincount(noise, minlength=2**n_bits)
    assert int(counts.min()) >= count, "too short to see every noise value"
    starts = torch.cumsum(counts, 0) - counts
    return torch.argsort(noise, stable=True)[starts[:, None] + torch.arange(count)], length


def enumerated(xs: list[float], n_bits: int, rounding) -> torch.Tensor:
    """[2^N, len(xs)]: ``rounding(tensor, seed)`` of each x under every one of the 2^N noise values."""
    seed = draw_seed(torch.Generator().manual_seed(n_bits), CPU)
    layout, length = noise_layout(len(xs), n_bits, seed)
    x = torch.zeros(length, dtype=torch.float32)
    x[layout] = torch.tensor(xs, dtype=torch.float32).expand(2**n_bits, -1)
    return rounding(x, seed)[layout]


def enumerated_ups(xs: list[float], fmt, n_bits: int, kernel: str) -> list[int]:
    """For each x, how many of the 2^N noise values round |x| up (`quantize` with ``kernel``; the
    generator below draws the seed `enumerated` lays the noise out by)."""
    def rounding(x, seed):
        return quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(n_bits),
                        kernel=kernel, sr_bits=n_bits)

    q = enumerated(xs, n_bits, rounding).double().abs()
    ups = []
    for column, value in zip(q.T, xs):
        spacing, k, _ = step_and_fraction(value, fmt)
        lower, upper = float(k * spacing), float((k + 1) * spacing)
        assert bool(((column == lower) | (column == upper)).all()), value
        ups.append(int((column == upper).sum()))
    return ups


def constructed_values(fmt, n_bits: int) -> list[float]:
    """Values with chosen fractions of a grid step: 0, 1/2, multiples of 2^-N (unbiased), just below
    them, below 2^-N (never up), a float32 tail; in a normal binade, the top binade (below max), the
    subnormals, below the smallest subnormal, and negated."""
    spacing_bits = 23 - fmt.mantissa_bits  # below a normal grid step in float32
    fractions = {Fraction(0), Fraction(1, 2), Fraction(1, 2**n_bits), Fraction(3, 2 ** (n_bits + 1)),
                 Fraction(1, 2**n_bits) - Fraction(1, 2**spacing_bits), Fraction(2**spacing_bits - 1, 2**spacing_bits),
                 Fraction(1, 2 ** (n_bits + 1)), Fraction(5, 16), Fraction(0.3)}
    fractions = {f for f in fractions if 0 <= f < 1}
    anchors = []  # (spacing, k): grid points x = (k + f) d
    top = int(fmt.exponents[-1])
    for binade in sorted({0, top, fmt.emin} & set(range(fmt.emin, top + 1))):
        anchors.append((Fraction(2) ** (binade - fmt.mantissa_bits), 2**fmt.mantissa_bits))  # 2^binade + f d
    smallest = Fraction(2) ** (fmt.emin - fmt.mantissa_bits)
    anchors += [(smallest, 1), (smallest, 0)]  # a subnormal (M > 0) or the first normal; below the smallest
    if fmt.mantissa_bits > 1:
        anchors.append((smallest, 2**fmt.mantissa_bits - 2))  # a high subnormal
    values = []
    for spacing, k in anchors:
        for f in fractions:
            x = float((k + f) * spacing)
            if np.float32(x) == x and x <= fmt.max:
                values += [x, -x]
    return values


@pytest.mark.parametrize("n_bits", ENUMERATED_BITS)
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E3M4", "E0M7", "E7M0"])
def test_the_bias_is_the_closed_form_by_exact_enumeration_of_the_noise(name, n_bits):
    """Over all 2^N noise values, floor(2^N f) round up: the exact expectation is x plus the closed
    form, on both kernels, and it is biased (toward zero) exactly where 2^N f is no integer."""
    fmt = get_format(name)
    xs = constructed_values(fmt, n_bits)
    for kernel in KERNELS:
        ups = enumerated_ups(xs, fmt, n_bits, kernel)
        for x, up in zip(xs, ups):
            spacing, k, f = step_and_fraction(x, fmt)
            assert up == math.floor(f * 2**n_bits), (kernel, x, f)
            expectation = math.copysign(1, x) * (k + Fraction(up, 2**n_bits)) * spacing
            assert expectation - Fraction(x) == closed_form_bias(x, fmt, n_bits), (kernel, x)
    biased = [x for x in xs if closed_form_bias(x, fmt, n_bits) != 0]
    assert biased and all(closed_form_bias(x, fmt, n_bits) * x < 0 for x in biased)  # toward zero


@pytest.mark.parametrize("n_bits", ENUMERATED_BITS)
def test_the_closed_form_is_fitzgibbon_and_felix_few_bit_rounding(n_bits):
    """The formula against the reference implementation of the paper's authors (gfloat's
    StochasticFastest: round away iff f + r 2^-N >= 1), averaged over every r in 0 .. 2^N - 1."""
    for name in ("E4M3", "E5M2"):
        fmt = get_format(name)
        xs = constructed_values(fmt, n_bits)
        noise = np.tile(np.arange(2**n_bits, dtype=np.int64), len(xs))
        rounded = round_ndarray(gfloat_info(fmt), np.repeat(np.array(xs), 2**n_bits), RoundMode.StochasticFastest,
                                sat=True, srbits=noise, srnumbits=n_bits).reshape(len(xs), 2**n_bits)
        for x, row in zip(xs, rounded):
            mean = Fraction(float(row.sum())) / 2**n_bits  # grid values with few bits: the sum is exact
            assert mean - Fraction(x) == closed_form_bias(x, fmt, n_bits), (name, x)


def test_the_closed_form_by_hand():
    """E4M3 at 1 + 0.75/8 (d = 1/8, f = 3/4) with one bit: up half the time, bias -d/4 = -1/32; with
    two bits it is unbiased; f = 0.3 (float32) with 4 bits: up 4/16, bias -(0.3 - 1/4) d."""
    fmt = get_format("E4M3")
    assert closed_form_bias(1 + 0.75 / 8, fmt, 1) == Fraction(-1, 32)
    assert closed_form_bias(-(1 + 0.75 / 8), fmt, 1) == Fraction(1, 32)
    assert closed_form_bias(1 + 0.75 / 8, fmt, 2) == 0
    x = float(np.float32(1 + 0.3 / 8))
    assert closed_form_bias(x, fmt, 4) == -(Fraction(x) - 1 - Fraction(1, 4) / 8)
    assert enumerated_ups([1 + 0.75 / 8], fmt, 1, "eager") == [1]


# ---- the rule, element by element --------------------------------------------------------------
@pytest.mark.parametrize("fmt", EIGHT_BIT_FORMATS, ids=lambda f: f.name)
def test_few_bit_rounding_is_gfloats_stochastic_fastest_given_the_same_bits(fmt):
    """Each element with shift bits below its grid step takes kept = min(shift, N) noise bits, the
    low ones of the hash; gfloat's StochasticFastest with those bits (srnumbits = kept) makes the
    same decision: every binade of the format, the subnormals, far below (shift > 30), float32
    subnormals, and beyond max (saturation)."""
    generator = torch.Generator().manual_seed(7)
    exponents = torch.randint(fmt.emin - 40, int(fmt.exponents[-1]) + 2, (20_000,), generator=generator)
    x = torch.ldexp(1 + torch.rand(20_000, generator=generator), exponents.float())
    x = torch.where(torch.rand(20_000, generator=generator) < 0.5, x, -x)
    x = torch.cat([x, torch.tensor([1e-45, -3e-42, 2.0**-127, fmt.max * 1.01, -fmt.max * 1.2])])
    seed = draw_seed(torch.Generator().manual_seed(fmt.bits), CPU)
    noise = random_bits(seed, x.shape, CPU).numpy().astype(np.int64)
    shift = exact_shift(x, fmt).numpy()
    for n_bits in SR_BITS:
        mine = round_float32_bits(x, _params(fmt, True, CPU, n_bits), seed).numpy()
        kept = np.minimum(shift, n_bits)
        for bits in np.unique(kept):
            at = kept == bits
            reference = round_ndarray(gfloat_info(fmt), x.double().numpy()[at], RoundMode.StochasticFastest, sat=True,
                                      srbits=noise[at] & ((1 << bits) - 1), srnumbits=int(bits))
            assert same_bits(mine[at], reference).all(), (fmt.name, n_bits, bits)


@pytest.mark.parametrize("kernel", KERNELS)
def test_where_a_step_needs_at_most_n_bits_the_rounding_is_the_exact_one(kernel):
    """exact_shift <= N: kept = shift, the same noise bits: the same bits as without sr_bits; where
    it needs more, some element differs."""
    fmt = get_format("E4M3")  # float32 inputs: shift 20 in the normal binades, more below
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50_000, generator=generator) * torch.exp2(torch.randint(-14, 9, (50_000,), generator=generator))
    shift = exact_shift(x, fmt)
    exact = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1), kernel=kernel)
    for n_bits in (1, 8, 20, 21, 25, 29, 30):
        few = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1), kernel=kernel,
                       sr_bits=n_bits)
        fits = shift <= n_bits
        assert torch.equal(bits_of(few)[fits], bits_of(exact)[fits]), n_bits
        if (~fits).sum() > 1000:
            assert not torch.equal(bits_of(few)[~fits], bits_of(exact)[~fits]), n_bits


@pytest.mark.parametrize("kernel", KERNELS)
def test_edge_cases_of_few_bit_rounding(kernel):
    """E4M3 (d = 2^-9 below 2^-6, max 448, NaN but no inf), by rule:
    one bit: a fraction below 1/2 never rounds up, 1/2 and above half the time;
    subnormals: min_positive (1 + 2^-9) with 8 bits is always min_positive (the exact rule moves it);
    below the smallest subnormal: under d 2^-N always 0, at d 2^-N up in one draw of 2^N;
    saturation: 448 + 0.4 d_top rounds down with one bit, so even without saturation it never
    becomes NaN (the exact rule does 40% of the time); NaN, inf and signed zeros pass as ever."""
    fmt = get_format("E4M3")
    n = 20_000

    def draws(value, n_bits, saturate=True, seed=0):
        x = torch.full((n,), value, dtype=torch.float32)
        return quantize(x, fmt, rounding="stochastic", saturate=saturate, kernel=kernel, sr_bits=n_bits,
                        generator=torch.Generator().manual_seed(seed))

    step = 1 / 8  # the spacing in [1, 2)
    assert set(draws(1 + 0.49 * step, 1).tolist()) == {1.0}
    assert set(draws(-(1 + 0.49 * step), 1).tolist()) == {-1.0}
    half = draws(1 + 0.5 * step, 1)
    assert set(half.tolist()) == {1.0, 1.125} and abs(float((half == 1.125).float().mean()) - 0.5) < 0.02
    assert set(draws(1 + 0.99 * step, 1).tolist()) == {1.0, 1.125}

    small = fmt.min_positive  # 2^-9, the spacing of the subnormals
    assert set(draws(small * (1 + 2**-9), 8).tolist()) == {small}
    assert (draws(small * (1 + 2**-9), None) > small).any()  # the exact rule sees the 2^-9
    assert set(draws(small * 2**-9, 8).tolist()) == {0.0}
    assert set(draws(-small * (2**-8 - 2**-20), 8).tolist()) == {-0.0}
    assert bits_of(draws(-small * 2**-9, 8)).eq(bits_of(torch.tensor(-0.0))).all()  # the sign of zero kept
    up = float((draws(small * 2**-8, 8) == small).float().mean())
    assert 0 < up < 4 * 2**-8
    assert (draws(small * 2**-9, None) == small).any()  # the exact rule: P = 2^-9

    top_step = 32.0  # the spacing of [256, 512)
    assert set(draws(448 + 0.4 * top_step, 1, saturate=False).tolist()) == {448.0}
    assert draws(448 + 0.4 * top_step, None, saturate=False).isnan().any()
    assert set(draws(448 + 0.4 * top_step, 1).tolist()) == {448.0}
    assert set(draws(448 + 0.6 * top_step, 1).tolist()) == {448.0}  # saturated either way

    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -3e38])
    for n_bits in SR_BITS:
        q = quantize(specials, fmt, rounding="stochastic", kernel=kernel, sr_bits=n_bits,
                     generator=torch.Generator().manual_seed(2))
        assert q[0].isnan() and q[1:3].tolist() == [448.0, -448.0] and q[5] == -448.0
        assert bits_of(q[3:5]).tolist() == bits_of(torch.tensor([0.0, -0.0])).tolist()
        unsaturated = quantize(specials, fmt, rounding="stochastic", saturate=False, kernel=kernel, sr_bits=n_bits,
                               generator=torch.Generator().manual_seed(2))
        assert unsaturated[[0, 1, 2, 5]].isnan().all()  # E4M3 has no inf: overflow is NaN
    payload = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)
    assert bits_of(quantize(payload, fmt, rounding="stochastic", kernel=kernel, sr_bits=3)).item() == 0x7FC01234


def test_sr_bits_outside_one_to_thirty_is_an_error():
    x = torch.ones(4)
    for bad in (0, 31, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="sr_bits"):
            quantize(x, "E4M3", rounding="stochastic", sr_bits=bad)
    assert sr_bits_value(None) == 30 and sr_bits_value(13) == 13


# ---- GridOptim's rung moves ---------------------------------------------------------------------
def rung_ups(vs: list[float], n_bits: int) -> tuple[list[int], list[set]]:
    """For each v, how many of the 2^N noise values move one rung more than floor|v| (and the moves seen)."""
    moves = enumerated(vs, n_bits, lambda v, seed: random_rungs(v, seed, n_bits))
    ups = [int((column.abs() > math.floor(abs(value))).sum()) for column, value in zip(moves.T, vs)]
    return ups, [set(column.tolist()) for column in moves.T]


@pytest.mark.parametrize("n_bits", ENUMERATED_BITS)
def test_rung_moves_with_few_bits_follow_the_casts_rule(n_bits):
    """sign(v) (floor|v| + carry): floor(2^N frac|v|) of the 2^N noise values carry, so E[move] - v
    is the closed form with d = 1 (toward zero: small moves of either sign are lost alike)."""
    fractions = [0.0, 0.5, 2.0**-n_bits, 3 * 2.0 ** -(n_bits + 1), 2.0 ** -(n_bits + 1), 0.3, 0.999, 2.0**-20]
    vs = [sign * (whole + f) for sign in (1, -1) for whole in (0, 1, 3) for f in fractions]
    ups, seen = rung_ups(vs, n_bits)
    for v, up, moves in zip(vs, ups, seen):
        f = Fraction(abs(v)) - math.floor(abs(v))
        assert up == math.floor(f * 2**n_bits), (v, n_bits)
        whole = math.floor(abs(v))
        assert moves <= {math.copysign(whole, v), math.copysign(whole + 1, v)}
        expectation = math.copysign(1, v) * (whole + Fraction(up, 2**n_bits))
        scaled = f * 2**n_bits
        assert expectation - Fraction(v) == -math.copysign(1, v) * (scaled - math.floor(scaled)) / 2**n_bits


def test_rung_moves_without_sr_bits_are_todays():
    """None keeps the rule floor(v) + [bits < ceil(frac(v) 2^30)]; 30 bits are the truncation rule,
    equal in distribution to 2^-30 but not bit for bit (other noise values carry)."""
    v = torch.randn(10007, generator=torch.Generator().manual_seed(9)) * 3
    seed = torch.tensor([321, 654], dtype=torch.int64)
    bits = random_bits(seed, v.shape, CPU)
    whole = torch.floor(v)
    expected = whole + (bits < torch.ceil((v - whole) * 2.0**30).to(torch.int32)).float()
    assert torch.equal(random_rungs(v, seed), expected)
    assert torch.equal(random_rungs(v, seed, None), expected)
    assert not torch.equal(random_rungs(v, seed, 30), expected)


# ---- the default, bit for bit --------------------------------------------------------------------
def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().view(torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


def recorded_inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2024)
    x = torch.randn(10007, generator=generator)
    x = x * torch.exp2(torch.randint(-40, 20, (10007,), generator=generator).float())
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-44])
    return x


#: Digests of stochastic rounding before sr_bits existed (commit 5bdb028), on every path.
RECORDED = {"quantize E4M3 float32": "f68c5faf5cf6b198", "quantize E4M3 bfloat16": "2aeeaa89b7501a53",
            "cast E4M3": "20c6add3c5156f9f", "quantize E5M2 float32": "04cf82268db3013f",
            "quantize E5M2 bfloat16": "1b3e72593886cbd2", "cast E5M2": "6f12f9bad627e724",
            "quantize E0M7 float32": "a876b5e1f8c1c2db", "quantize E0M7 bfloat16": "e3e5df6a8499147c",
            "cast E0M7": "1dc835ba1a53c700", "quantize E7M0 float32": "8e5f384ea56e1c93",
            "quantize E7M0 bfloat16": "aa46d49783befc49", "cast E7M0": "822c07cc93f1e7d1",
            "rungs": "e233332e63dbe981"}


def recorded(kernel: str, **sr) -> dict[str, str]:
    out = {}
    x = recorded_inputs()
    finite = torch.nan_to_num(x, nan=0.0, posinf=3.0, neginf=-3.0)
    for name in ("E4M3", "E5M2", "E0M7", "E7M0"):
        fmt = get_format(name)
        for dtype in (torch.float32, torch.bfloat16):
            q = quantize(x.to(dtype), fmt, rounding="stochastic", generator=torch.Generator().manual_seed(5),
                         kernel=kernel, **sr)
            out[f"quantize {name} {str(dtype).removeprefix('torch.')}"] = digest(q)
        q, scale, _ = cast_to_grid(finite, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(6),
                                   out_dtype=torch.float32, kernel=kernel, **sr)
        out[f"cast {name}"] = digest(q, torch.tensor(float(scale)))
    v = torch.randn(10007, generator=torch.Generator().manual_seed(9)) * 3
    v[:4] = torch.tensor([0.0, -0.0, 1e-3, -1e-3])
    out["rungs"] = digest(random_rungs(v, torch.tensor([321, 654], dtype=torch.int64)))
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_without_sr_bits_every_rounding_is_todays_bit_for_bit(kernel):
    assert recorded(kernel) == RECORDED
    assert recorded(kernel, sr_bits=None) == RECORDED
    thirty = recorded(kernel, sr_bits=30)
    assert {k: v for k, v in thirty.items() if k != "rungs"} == {k: v for k, v in RECORDED.items() if k != "rungs"}
    eight = recorded(kernel, sr_bits=8)
    assert all(eight[key] != RECORDED[key] for key in RECORDED if key != "rungs")


# ---- carried through the configuration to every rounding of a run ---------------------------------
ARMS = {"adamw-sr": OptimizerSpec("adamw"), "manifold-sr": OptimizerSpec("manifold", grid_lr=1.5),
        "grid-sr": OptimizerSpec("grid", grid_lr=0.7, rung_clip=2)}
#: `trained` before sr_bits existed (commit 5bdb028), on both paths.
RECORDED_TRAINING = {"adamw-sr": "b9c233ed577a697c", "manifold-sr": "ede17e402d5b05f5", "grid-sr": "a0255ff4c68719fe"}


def trained(arm: str, fmt: str = "E4M3", steps: int = 3, record: bool = False, **sr) -> str:
    """A Linear whose operands and update all round stochastically, a few steps of ``arm``: the
    digest of its outputs, input gradients and weights (ALTGRAD_KERNEL picks the path)."""
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 8))
    defaults = dict(rounding="stochastic", grad_rounding="stochastic", scaling="current", amax_history_len=4,
                    scale_margin=0, power_of_two_scales=True, gemm_dtype="bf16", gradient="E5M2",
                    weight_storage="format", update_rounding="stochastic", **sr)
    quantize_model(model, build_policy([{"layers": "fc", "format": fmt}], defaults), seed=11)
    with torch.no_grad():
        model.fc.weight.mul_(torch.linspace(0.01, 3.0, 128).reshape(8, 16))
    optimizer = build_optimizer(model, ARMS[arm], seed=7)
    optimizer.recording = record  # the torch code, landing each step twice (with and without decay)
    generator = torch.Generator().manual_seed(5)
    seen = []
    for _ in range(steps):
        x = torch.randn(4, 16, generator=generator, requires_grad=True)
        y = model(x)
        (y.float() * torch.linspace(-1, 1, 8)).sum().backward()
        seen += [y, x.grad]
        optimizer.step()
        optimizer.zero_grad()
    return digest(*seen, model.fc.weight)


@pytest.mark.parametrize("kernel", ["auto", "eager"])
def test_a_run_without_sr_bits_is_todays_bit_for_bit(monkeypatch, kernel):
    monkeypatch.setenv("ALTGRAD_KERNEL", kernel)
    assert {arm: trained(arm) for arm in ARMS} == RECORDED_TRAINING
    assert {arm: trained(arm, sr_bits=None) for arm in ARMS} == RECORDED_TRAINING
    thirty = {arm: trained(arm, sr_bits=30) for arm in ARMS}
    assert thirty["adamw-sr"] == RECORDED_TRAINING["adamw-sr"]  # casts and projections: 30 bits are the default
    assert thirty["manifold-sr"] == RECORDED_TRAINING["manifold-sr"]
    assert thirty["grid-sr"] != RECORDED_TRAINING["grid-sr"]  # the rung move: the truncation rule (random_rungs)


@pytest.mark.parametrize("arm", list(ARMS))
def test_few_bit_runs_are_bit_identical_on_the_native_and_torch_paths(monkeypatch, arm):
    """Casts, projections and rung moves with N bits: native kernels == torch code, and a recorded
    step (the torch code, landing twice) == an unrecorded one; fewer bits change the run."""
    digests = set()
    for sr_bits in (1, 4, 8, 13, 30):
        runs = set()
        for kernel, record in (("auto", False), ("eager", False), ("auto", True)):
            monkeypatch.setenv("ALTGRAD_KERNEL", kernel)
            runs.add(trained(arm, sr_bits=sr_bits, record=record))
        assert len(runs) == 1, (arm, sr_bits)
        digests |= runs
    assert len(digests) == 5


def test_train_config_validates_sr_bits_and_carries_it_into_every_layer():
    from altgrad.errors import UserError
    from altgrad.training.config import TrainConfig

    config = TrainConfig(format="E4M3", rounding="stochastic", sr_bits=8)
    assert [rule.config.sr_bits for rule in config.quant_policy().rules] == [8]
    assert config.arm == TrainConfig(format="E4M3", rounding="stochastic").arm  # recorded in the config, not the tag
    assert TrainConfig(format="E4M3").quant_policy().rules[0].config.sr_bits is None
    for bad in (0, 31, -3, True, 2.5, "8"):
        with pytest.raises(UserError, match="sr_bits"):
            TrainConfig(format="E4M3", sr_bits=bad)
    mixed = TrainConfig(sr_bits=12, policy=({"layers": "lm_head", "format": "E5M2", "sr_bits": 4},
                                            {"layers": "*", "format": "E4M3"}))
    assert [rule.config.sr_bits for rule in mixed.quant_policy().rules] == [4, 12]
    with pytest.raises(UserError, match="sr_bits"):
        TrainConfig(policy=({"layers": "*", "format": "E4M3", "sr_bits": 40},))


def test_sr_bits_from_a_yaml_file(tmp_path):
    from altgrad.errors import UserError
    from altgrad.training.config import resolve_config

    path = tmp_path / "run.yaml"
    path.write_text("format: E4M3\nrounding: stochastic\nsr_bits: 8\n")
    assert resolve_config(path).quant_policy().rules[0].config.sr_bits == 8
    assert resolve_config(path, {"sr_bits": 13}).sr_bits == 13
    path.write_text("format: E4M3\nsr_bits: eight\n")
    with pytest.raises(UserError, match="sr_bits"):
        resolve_config(path)


def test_the_layer_casts_every_operand_with_its_sr_bits():
    """Each operand stream rounds as cast_operand with the layer's sr_bits (current scaling) or as
    quantize (no scaling), the gradient too; a new format keeps them; LinearQuantConfig checks them."""
    from altgrad.quantization import ScalingConfig
    from altgrad.quantization.linear import LinearQuantConfig, QuantizedLinear
    from altgrad.quantization.scaling import cast_operand

    with pytest.raises(ValueError, match="sr_bits"):
        LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2", sr_bits=0)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    for mode in ("current", "none"):
        config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2", rounding="stochastic",
                                   grad_rounding="stochastic", scaling=ScalingConfig(mode=mode), sr_bits=2)
        layer = QuantizedLinear.from_linear(nn.Linear(16, 8), config, name="fc")
        for name in ("activation", "weight", "gradient"):
            stream = layer.quantizers[name]
            assert stream.sr_bits == 2
            state = stream.generator.get_state()

            def cast(sr_bits):
                generator = torch.Generator()
                generator.set_state(state)
                if mode == "current":
                    return cast_operand(x, stream.fmt, None, rounding="stochastic", generator=generator,
                                        out_dtype=torch.float32, sr_bits=sr_bits)[0]
                return quantize(x, stream.fmt, rounding="stochastic", generator=generator, sr_bits=sr_bits)

            q, _ = stream(x, torch.float32)
            assert torch.equal(bits_of(q), bits_of(cast(2))), (mode, name)
            assert not torch.equal(bits_of(q), bits_of(cast(None))), (mode, name)
        layer.reformat(weight=get_format("E5M2"))
        assert layer.quantizers["weight"].sr_bits == 2 and "sr_bits=2" in repr(layer)


@pytest.mark.parametrize("kernel", ["auto", "eager"])
def test_a_stored_weight_lands_and_rescales_with_its_sr_bits(monkeypatch, kernel):
    """The factory gives every FormatWeight its layer's sr_bits; `land` (the step records) equals
    what `project` wrote on either path, and `rescale` re-rounds with the same bits."""
    from altgrad.optim import FormatWeight

    monkeypatch.setenv("ALTGRAD_KERNEL", kernel)
    values = torch.randn(257, generator=torch.Generator().manual_seed(1))
    weight = FormatWeight("w", nn.Parameter(values.clone()), get_format("E4M3"), stored=True,
                          update_rounding="stochastic", sr_bits=3)
    y = weight.param.detach() + 0.01 * torch.randn(257, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    with torch.no_grad():
        weight.param.copy_(y)
    weight.project(generator)
    assert torch.equal(bits_of(weight.land(y, state)), bits_of(weight.param))
    scale = float(weight.scale) * 0.5
    state = generator.get_state()
    before = weight.param.detach().clone()
    weight.rescale(0.5, generator)
    generator.set_state(state)
    expected = quantize(before * scale, weight.fmt, rounding="stochastic", generator=generator, sr_bits=3) / scale
    assert torch.equal(bits_of(weight.param), bits_of(expected))

    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 8))
    defaults = dict(rounding="nearest", grad_rounding="nearest", scaling="current", amax_history_len=4,
                    scale_margin=0, power_of_two_scales=True, gemm_dtype="bf16", gradient="E5M2",
                    weight_storage="format", update_rounding="stochastic", sr_bits=9)
    quantize_model(model, build_policy([{"layers": "fc", "format": "E4M3"}], defaults))
    assert [w.sr_bits for w in build_optimizer(model, OptimizerSpec("grid")).weights] == [9]
