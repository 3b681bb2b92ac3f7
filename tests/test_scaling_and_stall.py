"""Per-tensor scaling, scaled-quantize statistics and bit-stall detection."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracles import EIGHT_BIT_FORMATS

from altgrad.quantization import (
    AmaxTracker,
    ScalingConfig,
    bit_stall_mask,
    count_flips,
    get_format,
    quantize,
    scale_from_amax,
    scaled_quantize,
)


def test_scale_maps_amax_onto_max():
    fmt = get_format("E4M3")
    amax = torch.tensor(3.7)
    exact = scale_from_amax(amax, fmt, power_of_two=False)
    assert float(exact * amax) == pytest.approx(448.0)
    pow2 = scale_from_amax(amax, fmt)
    assert float(torch.log2(pow2)) == int(torch.log2(pow2))  # a power of two
    assert float(pow2 * amax) <= 448.0 < float(2 * pow2 * amax)
    assert float(scale_from_amax(amax, fmt, margin=2)) == float(pow2) / 4
    for bad in (0.0, float("inf"), float("nan")):
        assert float(scale_from_amax(torch.tensor(bad), fmt)) == 1.0


def test_power_of_two_scaling_is_exact():
    x = torch.randn(4096) * 37.0
    fmt = get_format("E5M2")
    scale = scale_from_amax(x.abs().amax(), fmt)
    dequantized, stats = scaled_quantize(x, fmt, scale)
    assert torch.equal(dequantized * scale, quantize(x * scale, fmt))
    assert stats.overflow == 0 and stats.scale == float(scale)


def test_statistics_count_overflow_underflow_and_binades():
    fmt = get_format("E4M3")
    x = torch.tensor([1000.0, -500.0, 1e-4, -1e-5, 0.0, 1.0, 2.0, 3.0])
    q, stats = scaled_quantize(x, fmt, 1.0)
    assert stats.overflow == 2  # 1000 and -500 saturate
    assert stats.underflow == 2  # 1e-4 and -1e-5 are below half of 2^-9
    assert stats.binades_used == 3  # 448 (2^8), 1 (2^0), 2 and 3 (2^1)
    assert stats.binades_total == 18
    assert stats.dynamic_range_used == pytest.approx(3 / 18)
    assert stats.overflow_rate == 2 / 8
    assert q[0] == 448 and q[1] == -448


def test_delayed_scaling_uses_history_of_earlier_steps():
    fmt = get_format("E4M3")
    tracker = AmaxTracker(ScalingConfig(mode="delayed", history_len=2, power_of_two=False), fmt)
    first = torch.full((4,), 2.0)
    assert float(tracker.scale(first)) == pytest.approx(224.0)  # no history: current amax
    tracker.record(first)
    big = torch.full((4,), 8.0)
    assert float(tracker.scale(big)) == pytest.approx(224.0)  # still the history's amax 2
    tracker.record(big)
    tracker.record(torch.full((4,), 1.0))  # window of 2 now holds 8 and 1
    assert float(tracker.scale(big)) == pytest.approx(56.0)
    recent = AmaxTracker(ScalingConfig(mode="delayed", amax_reduce="most_recent", power_of_two=False), fmt)
    for value in (8.0, 1.0):
        recent.record(torch.full((2,), value))
    assert float(recent.scale(big)) == pytest.approx(448.0)
    state = recent.state_dict()
    restored = AmaxTracker(recent.config, fmt)
    restored.load_state_dict(state)
    assert float(restored.scale(big)) == float(recent.scale(big))


def test_current_scaling_ignores_history_and_config_is_validated():
    tracker = AmaxTracker(ScalingConfig(mode="current", power_of_two=False), get_format("E4M3"))
    tracker.record(torch.full((4,), 100.0))
    assert float(tracker.scale(torch.full((4,), 4.0))) == pytest.approx(112.0)
    with pytest.raises(ValueError, match="scaling mode"):
        ScalingConfig(mode="sometimes")
    with pytest.raises(ValueError, match="amax_reduce"):
        ScalingConfig(amax_reduce="mean")


@given(
    fmt=st.sampled_from(EIGHT_BIT_FORMATS),
    code_index=st.integers(min_value=0, max_value=10**6),
    sixty_fourths=st.integers(min_value=-130, max_value=130).filter(lambda k: k != 0),
)
def test_bit_stall_is_exactly_the_half_gap_rule(fmt, code_index, sixty_fourths):
    """On-grid w stalls iff |delta| < half the gap in delta's direction (ties: w's code even)."""
    values = fmt.grid().double().numpy()
    i = code_index % len(values)
    w = values[i]
    up = values[i + 1] - w if i + 1 < len(values) else np.inf
    down = w - values[i - 1] if i > 0 else np.inf
    gap = up if sixty_fourths > 0 else down
    step = (up if np.isfinite(up) else down) / 64  # delta a multiple of 1/64 gap: w + delta exact
    delta = sixty_fourths * step
    if not np.isfinite(gap):
        expected = True  # beyond the end of the grid the weight saturates back to w
    elif abs(delta) < gap / 2:
        expected = True
    elif abs(delta) > gap / 2:
        expected = False
    else:
        code = int(fmt.encode(np.float64(w))) if w != 0 else 0
        expected = (code & 1) == 0  # the code's last bit: mantissa's, or exponent's when M = 0
    mask = bit_stall_mask(torch.tensor([w], dtype=torch.float32), torch.tensor([delta], dtype=torch.float32), fmt)
    assert bool(mask[0]) == expected


def test_zero_updates_never_stall_and_scale_is_respected():
    fmt = get_format("E4M3")
    w = torch.tensor([1.0, 1.0, 1.0, 2.0**-8])
    delta = torch.tensor([0.0, 0.01, 0.1, 2.0**-10])
    # 2^-8 + 2^-10 is a tie between subnormals 2^-8 (even code) and 3 * 2^-9: it stays.
    assert bit_stall_mask(w, delta, fmt).tolist() == [False, True, False, True]
    # scaled by 2^8 the small weight sits at 1.0 (ULP 1/8) and its update of 1/4 moves it
    assert bit_stall_mask(w, delta, fmt, scale=256.0).tolist() == [False, True, False, False]


def test_count_flips_and_stall_ratio():
    fmt = get_format("E4M3")
    before = torch.tensor([1.0, 1.0, 1.0, 1.0])
    after = torch.tensor([1.0, 1.01, 1.2, 0.8])
    counts = count_flips(before, after, fmt)
    assert (counts.updates, counts.flips) == (3, 2)
    assert counts.stall_ratio == pytest.approx(1 / 3)
    assert math.isnan(count_flips(before, before, fmt).stall_ratio)  # no updates: undefined, not 0
    # a flip is counted over all elements: one that moved without a gradient still flips
    moved = count_flips(before, after, fmt, updated=torch.tensor([True, False, False, False]))
    assert (moved.updates, moved.flips) == (1, 2) and moved.stall_ratio == -1.0
