"""grid_lr_unit (ulp | binade) and GridOptim on FP32 masters (arm grid-master), on constructed tensors."""

import math

import pytest
import torch
from torch import nn

from altgrad.optim import FormatWeight, GridOptim, ManifoldAdamW, OptimizerSpec, build_optimizer, lr_unit_factor
from altgrad.optim.grid import positions, values_at
from altgrad.quantization import get_format, native, quantize
from altgrad.quantization.codes import rungs, top_code, values_of_rungs
from altgrad.training import resolve_config
from test_optim import layer_model


@pytest.fixture(autouse=True, params=["auto", "eager"])
def kernel(request, monkeypatch):
    """Both paths: the native kernels (auto, on CPU) and the torch code."""
    monkeypatch.setenv("ALTGRAD_KERNEL", request.param)
    return request.param


def weight_of(values, fmt, stored=False, rounding="nearest"):
    param = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())
    return FormatWeight("w", param, get_format(fmt), stored=stored, update_rounding=rounding)


def sign_optimizer(cls, weights, lr, wd=0.0, seed=0, **kwargs):
    """betas (0, 0) and eps 0: Adam's direction is exactly sign(g) on every step, so the proposed
    move is v = -lr * (sign(g) + wd * w) by hand."""
    group = {"params": [w.param for w in weights], "lr": lr, "weight_decay": wd, "geometry": True}
    return cls([group], weights, seed, betas=(0.0, 0.0), eps=0.0, **kwargs)


# ---- grid_lr_unit ------------------------------------------------------------------------------------
def test_the_unit_factor_is_two_to_the_mantissa_bits_of_the_current_format():
    weight = weight_of([0.5], "E5M2")
    assert lr_unit_factor("ulp", weight) == 1.0 and lr_unit_factor("binade", weight) == 4.0
    weight.reformat(get_format("E3M4"), None)  # an emergency shift: the factor follows the format
    assert lr_unit_factor("binade", weight) == 16.0
    assert lr_unit_factor("binade", weight_of([0.5], "E7M0")) == 1.0  # one value per binade: ulp = binade
    with pytest.raises(ValueError, match="grid_lr_unit"):
        lr_unit_factor("octave", weight)
    with pytest.raises(ValueError, match="grid_lr_unit"):
        GridOptim([{"params": [weight.param], "lr": 1.0, "geometry": True}], [weight], 0, lr_unit="octave")


W = [1.0, 0.3, -0.05, 0.7, -0.0234, 0.5, 0.125, -0.99]  # |w s| normal in E5M2 (s 2^15) and E3M4 (s 64)


def manifold_steps(fmt, unit, lr=0.5, steps=3):
    """ManifoldAdamW on an FP32 master: the change of each weight over ``steps`` steps from W."""
    weight = weight_of(W, fmt)
    optimizer = ManifoldAdamW([{"params": [weight.param], "lr": lr, "weight_decay": 0.1, "geometry": True}],
                              [weight], 0, lr_unit=unit, betas=(0.9, 0.99), foreach=True)
    generator = torch.Generator().manual_seed(2)
    changes = []
    for _ in range(steps):
        before = weight.param.detach().clone()
        weight.param.grad = torch.randn(len(W), generator=generator)
        optimizer.step()
        changes.append(weight.param.detach() - before)
        with torch.no_grad():
            weight.param.copy_(torch.tensor(W))  # the same w before each step: steps compare element by element
    return changes


def test_binade_unit_gives_every_mantissa_width_the_same_manifold_step():
    """E5M2 (M 2) and E3M4 (M 4) at the same |w| in the same binade: bit for bit the same step,
    lr * 2^floor(log2 |w|) times Adam's direction (S = 2^(b - M) / s, times 2^M; s a power of two)."""
    e5m2, e3m4 = manifold_steps("E5M2", "binade"), manifold_steps("E3M4", "binade")
    for a, b in zip(e5m2, e3m4):
        assert torch.equal(a, b)
    # the default ulp unit is unchanged: E5M2's grid is 2^(4-2) = 4 times coarser, so is its step
    ulp5, ulp3 = manifold_steps("E5M2", "ulp"), manifold_steps("E3M4", "ulp")
    for a, b in zip(ulp5, ulp3):  # (up to the rounding of w - step: 2^-24 |w| on a step of |w| / 100 or more)
        assert torch.allclose(a, 4 * b, rtol=1e-4, atol=0) and not torch.allclose(a, b, rtol=0.5)
    # binade with lr is ulp with lr * 2^M (the factor enters the learning rate, nothing else)
    for a, b in zip(manifold_steps("E5M2", "ulp", lr=0.5 * 4), e5m2):
        assert torch.equal(a, b)
    # the size by hand: |step| = lr 2^floor(log2|w|) |m_hat / (sqrt(v_hat) + eps) + wd w|, first step |d| ~ 1
    binade = torch.exp2(torch.floor(torch.log2(torch.tensor(W).abs())))
    first = e5m2[0].abs() / (0.5 * binade)
    assert torch.all((first > 0.8) & (first < 1.2))


def test_binade_unit_moves_grid_weights_2_to_the_m_times_grid_lr_rungs():
    """One parameter group with an E5M2 and an E3M4 weight: lr 0.25 binade is 1 rung for E5M2,
    4 rungs for E3M4; both at 1.0 moving down land on 1 - 1/8 (a quarter of the binade below)."""
    e5m2 = weight_of([1.0, 1.0], "E5M2", stored=True)
    e3m4 = weight_of([1.0, 1.0], "E3M4", stored=True)
    for w in (e5m2, e3m4):
        w.param.grad = torch.tensor([0.0, 1.0])  # element 0: 0/0 direction, no move
    optimizer = sign_optimizer(GridOptim, [e5m2, e3m4], lr=0.25, rung_clip=8, lr_unit="binade")
    before = [rungs(w.param * w.scale, w.fmt) for w in (e5m2, e3m4)]
    optimizer.step()
    moves = [int((rungs(w.param * w.scale, w.fmt) - b)[1]) for w, b in zip((e5m2, e3m4), before)]
    assert moves == [-1, -4]
    assert e5m2.param.tolist() == e3m4.param.tolist() == [1.0, 0.875]
    w = weight_of([1.0, 1.0], "E3M4", stored=True)
    ulp = sign_optimizer(GridOptim, [w], lr=1.0, rung_clip=8)
    w.param.grad = torch.tensor([0.0, 1.0])
    ulp.step()
    assert w.param.tolist() == [1.0, 1.0 - 1 / 32]  # ulp (the default): one rung, spacing 2^-5 below 1


@pytest.mark.parametrize("arm", ["manifold-sr", "grid-sr", "grid-rtn", "manifold-master", "grid-master"])
@pytest.mark.parametrize("fmt", ["E5M2", "E3M4"])
def test_binade_steps_are_bit_identical_on_both_paths(monkeypatch, arm, fmt):
    if native.library() is None:
        pytest.skip(f"no native kernel here: {native.unavailable_reason()}")
    name, storage = arm.split("-")[0], "master" if arm.endswith("master") else "format"
    rounding = "nearest" if arm.endswith("rtn") else "stochastic"
    results = []
    for path in ("auto", "eager"):
        monkeypatch.setenv("ALTGRAD_KERNEL", path)
        model = layer_model(fmt, storage=storage, rounding=rounding, seed=4)
        optimizer = build_optimizer(model, OptimizerSpec(name, grid_lr=0.2, grid_lr_unit="binade"), seed=7)
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            optimizer.step()
        results.append(model.fc.weight.detach().clone())
    assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32))


# ---- code positions -----------------------------------------------------------------------------------
def test_code_positions_interpolate_between_codes_and_cross_zero():
    fmt = get_format("E4M3")
    small = fmt.min_positive  # 2^-9
    x = torch.tensor([0.0, -0.0, small, -small, 0.5 * small, 1.0, 1.0 + 1 / 32, 1.0 - 1 / 32, 448.0, 500.0, -448.0])
    p = positions(x, fmt)
    one = int(rungs(torch.tensor([1.0]), fmt))
    top = top_code(fmt)
    expected = [0.0, 0.0, 1.0, -1.0, 0.5, one, one + 0.25, one - 0.5, top, top, -top]  # spacing 1/8 above 1, 1/16 below
    assert p.tolist() == expected
    assert values_at(p, fmt).float().tolist() == [0.0, 0.0, small, -small, 0.5 * small, 1.0, 1.0 + 1 / 32,
                                                  1.0 - 1 / 32, 448.0, 448.0, -448.0]
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(10_000, generator=generator) * 30  # the round trip is exact for every float32 on the grid's range
    assert torch.equal(values_at(positions(w, fmt), fmt).float(), w.clamp(-448, 448))
    assert torch.equal(values_at(positions(fmt.grid(), fmt), fmt).float(), fmt.grid())  # codes at integers
    assert torch.equal(positions(fmt.grid(), fmt), rungs(fmt.grid(), fmt).double())


# ---- GridOptim on FP32 masters --------------------------------------------------------------------------
def master_grid(values, grads, lr, wd=0.0, rung_clip=4):
    weight = weight_of(values, "E4M3")
    weight.param.grad = torch.as_tensor(grads, dtype=torch.float32)
    return weight, sign_optimizer(GridOptim, [weight], lr=lr, wd=wd, rung_clip=rung_clip)


def test_grid_master_moves_the_code_position_exactly_across_binades_and_zero():
    """E4M3, scale 1 (amax 300): spacing 1/8 above 1, 1/16 below, 2^-9 at zero. Moves of 1.5 or
    1.25 rungs land between codes (no rounding), partly in each binade."""
    small = get_format("E4M3").min_positive
    values = [300.0, 1.0, 1.0, 1.0 + 1 / 32, 0.5 * small, -1.0]
    weight, optimizer = master_grid(values, [0.0, 1.0, -1.0, 1.0, 1.0, -1.0], lr=1.5)
    assert weight.current_scale() == 1.0 and optimizer.master_scale(weight) == 1.0
    before = weight.param.detach().clone()
    counts = optimizer.step()
    expected = [300.0,  # 0/0 direction: no move, exactly
                1.0 - 1 / 16 - 0.5 / 16,  # -1.5 rungs: one rung below 1, then half of the next
                1.0 + 1 / 8 + 0.5 / 8,  # +1.5 rungs above 1
                1.0 - 1.25 / 16,  # off the grid: a quarter rung above 1 (1/32), -1.5: 1.25 rungs below 1
                -small,  # crosses zero: position 0.5 -> -1.0, i.e. -min_positive
                -(1.0 - 1.5 / 16)]  # +1.5 rungs from -1: towards zero
    assert weight.param.tolist() == expected
    # flips: the nearest code on the step's grid changed (the nearest cast, ties to even)
    fmt = get_format("E4M3")
    assert counts.flips == int((quantize(before, fmt) != quantize(weight.param.detach(), fmt)).sum())
    assert counts.updates == 5
    weight, optimizer = master_grid([300.0, 0.5 * small], [0.0, 1.0], lr=0.75)
    optimizer.step()
    assert weight.param.tolist() == [300.0, -0.25 * small]  # through zero in the code order


def test_grid_master_clips_clamps_at_the_top_and_then_grows_like_the_stored_arm():
    weight, optimizer = master_grid([440.0, 1.0], [-1.0, 1.0], lr=10.0, rung_clip=3)
    optimizer.step()
    assert weight.param.tolist() == [448.0, 1.0 - 3 / 16]  # 440 = 416 + 0.75 rung, +3 clamped at max; -10 clipped to -3
    # the top code is occupied: this step's grid is under half the scale, so the weight grows
    assert optimizer.master_scale(weight) == 0.5
    weight.param.grad = torch.tensor([-1.0, 0.0])
    optimizer.param_groups[0]["lr"] = 1.0
    optimizer.step()
    assert weight.param.tolist() == [480.0, 1.0 - 3 / 16]  # 224 -> 240 under scale 1/2
    stored = weight_of([448.0, 1.0], "E4M3", stored=True)  # the stored arm: stopped, rescaled, then grows alike
    stored.param.grad = torch.tensor([-1.0, 0.0])
    grid = sign_optimizer(GridOptim, [stored], lr=1.0)
    grid.step()
    assert float(stored.scale) == 0.5 and stored.param.tolist() == [448.0, 1.0]
    grid.step()
    assert stored.param.tolist() == [480.0, 1.0]


def test_grid_master_with_decay_and_huge_gradients_stays_finite():
    fmt = get_format("E4M3")
    weight, optimizer = master_grid([300.0, 1.0, -2.0, 0.0], [0.0, 1.0, -1.0, 1.0], lr=1.0, wd=0.5)
    optimizer.step()
    # v = -(sign(g) + wd w) rungs: 1.0 -> -1.5 rungs; -2.0 -> +1 + 1 = 2 rungs; 0 -> -1 rung; a 0/0
    # direction (zero gradient, eps 0) moves nothing, its decay included (as the stored arm's kernel)
    assert weight.param.tolist() == [300.0, 1.0 - 1 / 16 - 0.5 / 16, -(2.0 - 2 / 8), -fmt.min_positive]  # below 2 the spacing is 1/8
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        weight.param.grad = torch.randn(4, generator=generator) * 1e30
        optimizer.step()
        assert torch.isfinite(weight.param).all()


def test_stored_stochastic_moves_are_the_master_move_in_expectation():
    """From an on-grid start, E over seeds of stored GridOptim with stochastic rounding equals the
    master's exact move, element by element, within 5 standard errors of a two-point landing
    (sd <= spacing / 2 / sqrt(seeds)). Adam's direction, weight decay, moves across binades, zero
    and the clip: everything but the grid's ends."""
    fmt = get_format("E4M3")
    generator = torch.Generator().manual_seed(11)
    start = torch.randn(48, generator=generator) * 0.02
    start[0] = 0.1  # the amax (zero gradient: only its decay moves it): the same scale for both arms
    grads = torch.randn(48, generator=generator)
    grads[0] = 0.0
    scale = float(weight_of(start, "E4M3", stored=True).scale)
    start = quantize(start * scale, fmt) / scale  # on the grid, as a stored weight is

    def arm(stored, seed):
        weight = weight_of(start, "E4M3", stored=stored, rounding="stochastic")
        weight.param.grad = grads.clone()
        optimizer = GridOptim([{"params": [weight.param], "lr": 2.7, "weight_decay": 0.1, "geometry": True}],
                              [weight], seed, rung_clip=4, betas=(0.9, 0.99))
        optimizer.step()
        return weight, weight.param.detach().clone()

    master, exact = arm(False, 0)
    assert float(master.current_scale()) == scale
    seeds = 2000
    mean = sum(arm(True, seed)[1].double() for seed in range(seeds)) / seeds
    position = positions(exact * scale, fmt)
    low, high = values_at(torch.floor(position), fmt), values_at(torch.ceil(position), fmt)
    spacing = (high - low).abs() / scale
    moved = (exact != start)
    assert int(moved.sum()) >= 40 and bool((spacing[moved] > 0).all())
    assert bool(((mean - exact.double()).abs() <= 5 * spacing / 2 / math.sqrt(seeds) + 1e-12).all())
    # and the stored arm really is random: the master is not simply one of its draws
    assert not torch.equal(arm(True, 1)[1], exact)


def test_grid_master_is_an_arm_of_the_config_and_the_factory():
    config = resolve_config(None, dict(preset="tiny", optimizer="grid", weight_storage="master", format="E5M2"))
    assert config.arm == "grid-master" and config.name == "tiny-e5m2-grid-master-seed1337"
    momentum = resolve_config(None, dict(preset="tiny", optimizer="grid", weight_storage="master", format="E5M2",
                                         grid_direction="momentum"))
    assert momentum.arm == "grid-momentum-master"
    assert resolve_config(None, dict(preset="tiny", optimizer="grid", format="E5M2")).arm == "grid-sr"  # default: E
    model = layer_model("E4M3", storage="master")
    optimizer = build_optimizer(model, config.optimizer_spec())
    assert isinstance(optimizer, GridOptim) and not optimizer.weights[0].stored
    model(torch.randn(3, 16)).square().sum().backward()
    before = model.fc.weight.detach().clone()
    counts = optimizer.step()
    changed = model.fc.weight.detach() != before
    assert counts.updates == int((model.fc.weight.grad != 0).sum()) and bool(changed.any())
    # masters hold values between codes: the fractions accumulate in FP32
    scale = optimizer.master_scale(optimizer.weights[0])
    off_grid = model.fc.weight.detach() * scale != quantize(model.fc.weight.detach() * scale, get_format("E4M3"))
    assert bool(off_grid.any())


def test_rung_values_and_positions_agree_on_signed_codes():
    fmt = get_format("E5M2")
    codes = torch.arange(-top_code(fmt), top_code(fmt) + 1)
    assert torch.equal(values_at(codes.double(), fmt).float(), values_of_rungs(codes, fmt))
