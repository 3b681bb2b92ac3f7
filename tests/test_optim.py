"""Weights on the grid and the optimizers, against their definitions on constructed tensors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from altgrad.model.surgery import build_policy, quantize_model
from altgrad.optim import FormatWeight, GridOptim, ManifoldAdamW, OptimizerSpec, StoredAdamW, build_optimizer
from altgrad.quantization import REGISTRY, get_format, quantize
from altgrad.quantization.codes import magnitude_codes, rungs, top_code, values_of_rungs
from altgrad.quantization.scaling import scale_from_amax

FORMATS = list(REGISTRY.values())


@pytest.fixture(autouse=True, params=["auto", "eager"])
def kernel(request, monkeypatch):
    """Every definition is checked on both paths: the native kernels (auto, on CPU) and the torch code."""
    monkeypatch.setenv("ALTGRAD_KERNEL", request.param)
    return request.param


def on_grid(values: torch.Tensor, fmt, scale) -> bool:
    """Every value is a format value divided by ``scale``."""
    scaled = values.detach().double() * float(scale)
    grid = torch.tensor(fmt.grid(torch.float64).numpy())
    return bool(torch.isin(scaled, grid).all())


# ---- codes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS + [get_format("E2M1"), get_format("E3M4:bias=3,special=ieee")],
                         ids=lambda f: f.spec)
def test_codes_match_the_python_encoder_on_every_value(fmt):
    values = torch.tensor(fmt.positive_values, dtype=torch.float32)
    assert np.array_equal(magnitude_codes(values, fmt).numpy(), fmt.encode(fmt.positive_values))
    assert np.array_equal(magnitude_codes(-values, fmt).numpy(), fmt.encode(fmt.positive_values))
    full = fmt.grid()
    signed = rungs(full, fmt)
    assert torch.equal(signed, torch.arange(-top_code(fmt), top_code(fmt) + 1, dtype=torch.int32))
    assert torch.equal(values_of_rungs(signed, fmt), full)  # rung order is value order, through zero
    assert int(rungs(torch.tensor([-0.0]), fmt)) == 0


# ---- format storage --------------------------------------------------------------------------
def stored(values, fmt, rounding="nearest", margin=0):
    param = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())
    return FormatWeight("w", param, get_format(fmt), stored=True, update_rounding=rounding, margin=margin)


def write(weight, y):
    """Put y = w + delta into the parameter, as an optimizer does before projecting."""
    with torch.no_grad():
        weight.param.copy_(torch.as_tensor(y, dtype=torch.float32))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_storage_is_exactly_on_its_grid_after_every_projection(fmt):
    torch.manual_seed(0)
    weight = stored(torch.randn(64, 32) * 0.02, fmt)
    scale = float(weight.scale)
    assert math.log2(scale) == int(math.log2(scale))  # a power of two
    assert float(weight.param.detach().abs().amax()) * scale <= fmt.max  # amax scaling: nothing saturates
    assert on_grid(weight.param, fmt, scale)
    assert int(weight.rescales) == 0  # the initial projection is not a rescale
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        grow = 1.0 + (3.0 if step == 2 else 0.0)  # one step makes the tensor 4x larger: the scale must follow
        y = weight.param.detach() * grow + torch.randn(64, 32, generator=generator) * 1e-3
        write(weight, y)
        weight.project(generator, "stochastic" if step % 2 else "nearest")
        assert on_grid(weight.param, fmt, weight.scale), step
    assert int(weight.rescales) >= 1 and float(weight.scale) < scale


def test_the_storage_scale_is_the_current_amax_scale_and_changes_are_counted():
    weight = stored([0.5, -0.25, 0.125], "E4M3")
    assert float(weight.scale) == float(scale_from_amax(torch.tensor(0.5), get_format("E4M3")))  # 2^9 * 0.5 = 256
    write(weight, [0.5, -0.25, 0.126])
    weight.project(None)
    assert int(weight.rescales) == 0
    write(weight, [1.5, -0.25, 0.125])
    weight.project(None)  # amax grew a binade: the scale halves
    assert float(weight.scale) == 256.0 and int(weight.rescales) == 1
    assert weight.param.tolist() == [1.5, -0.25, 0.125]


def test_nearest_updates_freeze_small_steps_and_stochastic_ones_move_them_on_average():
    """Arm B loses steps below half a grid step; arm C moves by them in expectation."""
    fmt = get_format("E5M2")
    start = torch.full((20000,), 0.75)  # on the grid of E5M2 at the scale below, spacing 0.125 (here 2^-3)
    start[0] = 1.0  # amax: scale 2^15, so 0.75 * 2^15 sits in E5M2's top binade spacing 2^13
    step = 0.02  # 16% of the spacing 0.125: below half
    nearest = stored(start, fmt, "nearest")
    spacing = float(fmt.ulp(torch.tensor(0.75 * float(nearest.scale)))) / float(nearest.scale)
    assert spacing == 0.125
    write(nearest, nearest.param + step)
    nearest.project(None)
    assert torch.equal(nearest.param[1:], start[1:])  # frozen
    stochastic = stored(start, fmt, "stochastic")
    generator = torch.Generator().manual_seed(3)
    write(stochastic, stochastic.param + step)
    stochastic.project(generator)
    moved = stochastic.param[1:]
    assert set(moved.unique().tolist()) <= {0.75, 0.875}
    p = step / spacing
    frac = float((moved == 0.875).float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / moved.numel())  # E[move] = step, within binomial bounds


def layer_model(fmt="E5M2", storage="format", rounding="nearest", seed=0, scaling="current"):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 8))
    model.add_module("norm", nn.LayerNorm(8))
    defaults = dict(rounding="nearest", grad_rounding="nearest", scaling=scaling, amax_history_len=4, scale_margin=0,
                    power_of_two_scales=True, gemm_dtype="bf16", gradient="E5M2", weight_storage=storage,
                    update_rounding=rounding)
    quantize_model(model, build_policy([{"layers": "fc", "format": fmt}], defaults))
    with torch.no_grad():
        model.fc.weight.mul_(torch.linspace(0.01, 3.0, 128).reshape(8, 16))  # many binades
        model.fc.weight[0, :4] = 0.0  # zeros: the smallest spacing
    return model


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_forward_cast_of_a_stored_weight_is_the_identity(monkeypatch, scaling):
    model = layer_model(scaling=scaling)
    optimizer = build_optimizer(model, OptimizerSpec("adamw"))
    assert isinstance(optimizer, StoredAdamW)
    layer = model.fc
    weight_scale = layer.quantizers["weight"].stored.forward_scale()
    x = torch.randn(5, 16)
    import altgrad.quantization.linear as linear

    casts = []
    real = linear.cast_operand
    monkeypatch.setattr(linear, "cast_operand", lambda t, *a, **k: casts.append(t.shape) or real(t, *a, **k))
    qw, carried = layer.quantizers["weight"](layer.weight, torch.bfloat16)
    assert layer.quantizers["weight"].last_scale == weight_scale
    assert (5, 16) not in casts and (8, 16) not in casts  # no rounding of the weight
    expected, expected_scale, _, expected_carried = real(layer.weight.detach(), get_format("E5M2"),
                                                         out_dtype=torch.bfloat16)
    assert float(expected_scale) == weight_scale
    # bit for bit what a cast would give (each may carry its scale or be dequantized: exact either way)
    assert torch.equal(qw.float() / carried, expected.float() / expected_carried)
    layer(x)
    assert casts == [(5, 16)]  # only the activation is cast


def test_optimizer_state_holds_no_fp32_copy_of_a_stored_weight():
    model = layer_model()
    for spec in (OptimizerSpec("adamw"), OptimizerSpec("manifold"), OptimizerSpec("grid")):
        optimizer = build_optimizer(model, spec)
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        shape = model.fc.weight.shape
        state = optimizer.state_dict()
        tensors = [(key, t) for s in state["state"].values() for key, t in s.items() if torch.is_tensor(t)]
        tensors += [(key, t) for w in state["altgrad"]["weights"].values() for key, t in w.items()]
        same_shape = sorted({key for key, t in tensors if t.shape == shape})
        assert same_shape == ["exp_avg", "exp_avg_sq"], spec.name
        model.zero_grad()


# ---- ManifoldAdamW -----------------------------------------------------------------------------
LR = 0.3


def _adamw_and_manifold_steps(fmt):
    """Three steps from the same state: (AdamW's last step, ManifoldAdamW's, S(w), scale), master weights."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 16) * torch.logspace(-3, 0, 16)  # weights over three decades
    w0[0] = 0.0
    grads = [torch.randn(64, 16) * 1e-2 for _ in range(3)]
    lr, wd = LR, 0.1
    reference = nn.Parameter(w0.clone())
    adamw = torch.optim.AdamW([reference], lr=lr, weight_decay=wd, betas=(0.9, 0.99))
    ours = nn.Parameter(w0.clone())
    weight = FormatWeight("w", ours, get_format(fmt), stored=False, update_rounding="nearest")
    manifold = ManifoldAdamW([{"params": [ours], "lr": lr, "weight_decay": wd, "geometry": True}], [weight], 0,
                             betas=(0.9, 0.99), foreach=True)
    for grad in grads:
        with torch.no_grad():
            ours.copy_(reference)  # the same w before each step, so the steps are comparable
        stiffness, scale = weight.stiffness(), float(weight.current_scale())
        before = reference.detach().clone()
        reference.grad, ours.grad = grad.clone(), grad.clone()
        adamw.step()
        manifold.step()
    return reference.detach() - before, ours.detach() - before, stiffness, scale, before


def close_steps(ours, expected, stiffness, w):
    """Equal up to float32 rounding: torch's fp32 moments put up to ~1e-4 of lr of error on its
    own step (measured against a float64 AdamW; more relative error where m nearly cancels),
    and the step read off as w_new - w carries the rounding of w_new (|w| 2^-24); both are
    scaled by S like the step."""
    bound = 1e-4 * expected.abs() + stiffness * (1e-4 * LR + w.abs() * 2.0**-22)
    return bool(torch.all((ours - expected).abs() <= bound))


@pytest.mark.parametrize("fmt", ["E5M2", "E3M4", "E7M0"])
def test_manifold_step_is_stiffness_times_the_adamw_step(fmt):
    adamw_step, manifold_step, stiffness, _, w = _adamw_and_manifold_steps(fmt)
    fmt = get_format(fmt)
    assert close_steps(manifold_step, stiffness * adamw_step, stiffness, w)
    assert not close_steps(manifold_step, 1.01 * stiffness * adamw_step, stiffness, w)  # the check has teeth
    # S is the grid spacing under the scale: ulp(w s) / s, and the smallest spacing at w = 0
    w = torch.tensor([0.013, -0.2, 0.0, -0.0])
    scale = scale_from_amax(torch.tensor(0.2), fmt)
    spacing = FormatWeight("v", nn.Parameter(w), fmt, False, "nearest").stiffness()
    assert torch.equal(spacing[:2], fmt.ulp(w[:2] * scale) / scale)
    assert spacing[2:].tolist() == [2.0 ** (fmt.emin - fmt.mantissa_bits) / float(scale)] * 2


def test_a_gradient_scaled_variant_would_fail_the_definition():
    """S(w) on the *gradient* before Adam is cancelled by Adam's normalisation: that step is
    not S(w) times AdamW's step, so the definition test tells the two apart."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 16) * torch.logspace(-3, 0, 16))
    weight = FormatWeight("w", w, get_format("E5M2"), stored=False, update_rounding="nearest")
    stiffness = weight.stiffness()
    reference = nn.Parameter(w.detach().clone())
    wrong = nn.Parameter(w.detach().clone())
    adamw = torch.optim.AdamW([reference], lr=0.3, weight_decay=0.0)
    gradient_scaled = torch.optim.AdamW([wrong], lr=0.3, weight_decay=0.0)  # AdamW on S(w) * g
    grad = torch.randn(64, 16) * 1e-2
    reference.grad, wrong.grad = grad.clone(), grad * stiffness
    before = w.detach().clone()
    adamw.step()
    gradient_scaled.step()
    expected = stiffness * (reference.detach() - before)
    assert not close_steps(wrong.detach() - before, expected, stiffness, before)
    assert float(((wrong.detach() - before) / expected).abs().max()) > 100  # Adam undid the scaling


def test_manifold_on_a_uniform_grid_is_adamw_with_a_rescaled_lr():
    """E0M7's spacing is constant (1/128 under the scale), so S is one number for the tensor."""
    adamw_step, manifold_step, stiffness, _, w = _adamw_and_manifold_steps("E0M7")
    assert stiffness.unique().numel() == 1
    assert close_steps(manifold_step, float(stiffness.flatten()[0]) * adamw_step, stiffness, w)


@pytest.mark.parametrize("recording", [False, True], ids=["step", "recorded-step"])
def test_max_stiffness_bounds_the_step_itself_not_only_the_reported_stiffness(recording):
    """delta = -min(S(w), max_stiffness) * lr * (Adam's direction + wd w), element by element, on
    every path (native kernel, torch code, the monitor's recorded step): a cap that only clipped
    what stiffness() reports would leave the large-|w| steps S(w)/cap times too large."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 16) * torch.logspace(-3, 0, 16)
    grad = torch.randn(64, 16) * 1e-2
    lr, wd, cap = LR, 0.1, 1e-3
    reference = nn.Parameter(w0.clone())
    adamw = torch.optim.AdamW([reference], lr=lr, weight_decay=wd, betas=(0.9, 0.99))
    ours = nn.Parameter(w0.clone())
    weight = FormatWeight("w", ours, get_format("E5M2"), stored=False, update_rounding="nearest")
    manifold = ManifoldAdamW([{"params": [ours], "lr": lr, "weight_decay": wd, "geometry": True}], [weight], 0,
                             betas=(0.9, 0.99), foreach=True, max_stiffness=cap)
    uncapped = weight.stiffness()
    assert float((uncapped > cap).float().mean()) > 0.2  # the cap binds on many elements
    capped = torch.clamp(uncapped, max=cap)
    reference.grad, ours.grad = grad.clone(), grad.clone()
    adamw.step()
    manifold.recording = recording
    manifold.step()
    expected = capped * (reference.detach() - w0)  # Adam's step (decay included) at S = min(S(w), cap)
    step = ours.detach() - w0

    def close(a, b):  # float32: Adam's own rounding (1e-4 relative) and that of w + delta read back (|w| 2^-23)
        return bool(torch.all((a - b).abs() <= 1e-4 * b.abs() + w0.abs() * 2.0**-23 + 1e-12))
    assert close(step, expected)
    assert not close(step, uncapped * (reference.detach() - w0))  # the uncapped rule is another step


@pytest.mark.parametrize("recording", [False, True], ids=["step", "recorded-step"])
@pytest.mark.parametrize("storage", ["master", "stored"])
@pytest.mark.parametrize("unit", ["ulp", "binade"])
def test_max_stiffness_bounds_the_step_by_hand(monkeypatch, unit, storage, recording):
    """The first step by hand, from the equation: Adam's direction is g / (|g| + eps) there
    (m_hat = g, v_hat = g^2), so delta = -lr * u * min(S(w), cap) * (g / (|g| + eps) + wd w) with
    u = 1 (grid_lr_unit ulp) or 2^M (binade) and S(w) = 2^(max(floor(log2 |w s|), emin) - M) / s.
    On a master the change of w is delta; a stored weight's w + delta before it is rounded onto
    the grid is (project is intercepted), and the monitor's recorded delta is that step too. An
    optimizer that capped only what stiffness() reports would take steps S(w) / cap times larger."""
    from altgrad.optim.storage import FormatWeight as Weight

    fmt = get_format("E5M2")
    torch.manual_seed(1)
    w0 = torch.randn(32, 16) * torch.logspace(-4, 0, 16)
    if storage == "stored":  # on the grid before the step, as a stored weight always is
        s0 = scale_from_amax(w0.abs().amax(), fmt)
        w0 = quantize(w0 * s0, fmt) / s0
    grad = torch.randn(32, 16) * 1e-2
    lr, wd, cap, eps = 0.05, 0.1, 2e-3, 1e-8
    param = nn.Parameter(w0.clone())
    weight = Weight("w", param, fmt, stored=storage == "stored", update_rounding="nearest")
    before_rounding = []
    monkeypatch.setattr(Weight, "project", lambda self, generator, rounding=None, count=True:
                        before_rounding.append(self.param.detach().clone()))
    optimizer = ManifoldAdamW([{"params": [param], "lr": lr, "weight_decay": wd, "geometry": True}], [weight], 0,
                              betas=(0.9, 0.99), eps=eps, max_stiffness=cap, lr_unit=unit)
    optimizer.recording = recording
    w, g = w0.double(), grad.double()
    s = float(weight.current_scale())
    binade = torch.clamp(torch.floor(torch.log2((w * s).abs())), min=fmt.emin)
    S = torch.exp2(binade - fmt.mantissa_bits) / s
    assert torch.equal(S.float(), weight.stiffness())  # the hand S is the code's, before the cap
    assert float((S > cap).double().mean()) > 0.3  # the cap binds on many elements
    u = 2.0 ** fmt.mantissa_bits if unit == "binade" else 1.0
    expected = -lr * u * torch.clamp(S, max=cap) * (g / (g.abs() + eps) + wd * w)
    param.grad = grad.clone()
    optimizer.step()
    after = before_rounding[-1] if storage == "stored" else param.detach()
    step = (after.double() - w)
    tolerance = 1e-5 * expected.abs() + w.abs() * 2.0**-23  # float32 arithmetic and the read-back of w + delta
    assert torch.all((step - expected).abs() <= tolerance)
    assert torch.all(step.abs() <= lr * u * cap * (1 + wd * w.abs()) * (1 + 1e-5) + w.abs() * 2.0**-23)
    if recording:
        assert torch.all((optimizer.records[id(param)].delta.double() - expected).abs() <= tolerance)


def test_manifold_caps_stiffness_and_leaves_plain_parameters_to_adamw():
    model = layer_model(storage="master")
    spec = OptimizerSpec("manifold", lr=1e-3, grid_lr=0.5, max_stiffness=1e-3)
    optimizer = build_optimizer(model, spec)
    assert float(optimizer.weights[0].stiffness(spec.max_stiffness).max()) == pytest.approx(1e-3)
    reference_model = layer_model(storage="master")
    reference = torch.optim.AdamW([{"params": [reference_model.fc.bias, reference_model.norm.weight,
                                               reference_model.norm.bias], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99), foreach=True)
    x = torch.randn(4, 16)
    for m in (model, reference_model):
        m(x).square().sum().backward()
    optimizer.step()
    reference.step()
    for ours, theirs in ((model.fc.bias, reference_model.fc.bias), (model.norm.weight, reference_model.norm.weight)):
        assert torch.equal(ours, theirs)  # bit for bit torch's AdamW


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_manifold_with_format_storage_stays_on_the_grid(fmt):
    model = layer_model(fmt.name, rounding="stochastic")
    optimizer = build_optimizer(model, OptimizerSpec("manifold", grid_lr=2.0))
    for _ in range(5):
        model(torch.randn(4, 16)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        weight = optimizer.weights[0]
        assert on_grid(weight.param, fmt, weight.scale)


# ---- GridOptim -----------------------------------------------------------------------------------
def grid_optimizer(values, fmt, direction, lr=1.0, rung_clip=4, rounding="stochastic", wd=0.0, seed=0):
    """GridOptim on one stored weight whose Adam direction on the first step is sign(grad) = ``direction``."""
    weight = stored(values, fmt, rounding)
    weight.param.grad = torch.as_tensor(direction, dtype=torch.float32).expand_as(weight.param).clone()
    optimizer = GridOptim([{"params": [weight.param], "lr": lr, "weight_decay": wd, "geometry": True}], [weight],
                          seed, rung_clip=rung_clip, eps=0.0)
    return weight, optimizer


def test_grid_mean_move_equals_v_within_binomial_bounds():
    # Adam's first step is sign(g) (eps 0), so v = -lr * sign(g): lr 0.3 -> move -1 rung w.p. 0.3
    values = torch.full((20000,), 0.75)
    values[0] = 1.0
    weight, optimizer = grid_optimizer(values, "E4M3", 1.0, lr=0.3)
    before = rungs(weight.param * weight.scale, weight.fmt)
    counts = optimizer.step()
    moves = (rungs(weight.param * weight.scale, weight.fmt) - before)[1:]
    assert set(moves.unique().tolist()) <= {-1, 0}
    frac = float((moves == -1).float().mean())
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / moves.numel())
    assert counts.updates == 20000 and counts.flips == int((moves != 0).sum()) + int(before[0] != rungs(
        weight.param[:1] * weight.scale, weight.fmt)[0])


def test_grid_rung_clip_zero_crossing_and_nearest_moves():
    fmt = get_format("E4M3")
    # w = 2 min_positive (under the scale of amax 448 -> 1): a move of -4 rungs crosses zero
    small = fmt.min_positive
    weight, optimizer = grid_optimizer([448.0, 2 * small, 2 * small, 1.0], fmt, [0.0, 1.0, 1.0, -1.0], lr=10.0,
                                       rung_clip=4, rounding="nearest")
    assert float(weight.scale) == 1.0
    optimizer.step()
    # -10 rungs clipped to -4: 2, 1, 0, -1, -2 (through zero); +10 clipped to +4: 1.0 -> 1.5 (spacing 1/8)
    assert weight.param.tolist() == [448.0, -2 * small, -2 * small, 1.5]
    weight, optimizer = grid_optimizer([448.0, 1.0], fmt, [0.0, 1.0], lr=0.5, rounding="nearest")
    optimizer.step()
    assert weight.param.tolist() == [448.0, 1.0]  # round(-0.5) = -0: ties to even, no move


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_grid_never_leaves_the_grid_and_stops_at_its_ends(fmt):
    top, small = fmt.max, fmt.min_positive
    values = torch.tensor([top, -top, small, -small, 0.0, top / 2, -0.0, 1e-30])
    direction = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 0.0])  # push the ends outwards, cross zero
    weight, optimizer = grid_optimizer(values, fmt, direction, lr=7.0, rung_clip=3)
    assert float(weight.scale) == 1.0
    counts = optimizer.step()
    after = weight.param.detach()
    assert torch.isfinite(after).all() and on_grid(after, fmt, weight.scale)
    assert int(weight.rescales) == 1 and float(weight.scale) == 0.5  # the top end stopped a move: room is made
    # stopped at the ends (then re-rounded onto the coarser grid, which may round up past the old max)
    near_top = top - 2 * float(fmt.ulp(torch.tensor(top)))
    assert float(after[0]) >= near_top and float(after[1]) <= -near_top
    assert float(after[2]) < 0 < float(after[3])  # crossed zero through the code order
    assert counts.updates == 7 and counts.flips >= 4
    for _ in range(20):  # huge and zero gradients, many steps: never NaN, never off the grid
        weight.param.grad = torch.randn(8) * 1e30
        weight.param.grad[0] = 0.0
        optimizer.step()
        assert torch.isfinite(weight.param).all() and on_grid(weight.param, fmt, weight.scale)


def test_grid_momentum_direction_and_state():
    weight, optimizer = grid_optimizer(torch.linspace(-1, 1, 64), "E3M4", torch.linspace(-1, 1, 64), lr=1.0)
    optimizer.grid_direction = "momentum"
    optimizer.step()
    state = optimizer.state[weight.param]
    assert "exp_avg" in state and "exp_avg_sq" not in state
    with pytest.raises(ValueError, match="grid_direction"):
        GridOptim([{"params": [weight.param], "lr": 1.0, "geometry": True}], [weight], 0, grid_direction="sideways")


def test_factory_rejects_impossible_arms():
    assert isinstance(build_optimizer(layer_model(storage="master"), OptimizerSpec("grid")), GridOptim)  # grid-master
    for name in ("manifold", "grid"):
        with pytest.raises(ValueError, match="needs layers with a weight format"):
            build_optimizer(nn.Sequential(nn.Linear(4, 4)), OptimizerSpec(name))
    with pytest.raises(ValueError, match="grid_lr_unit"):
        OptimizerSpec("grid", grid_lr_unit="octave")
    plain = build_optimizer(layer_model(storage="master"), OptimizerSpec("adamw"))
    assert type(plain) is torch.optim.AdamW  # arm A: exactly torch's AdamW
    assert [g["weight_decay"] for g in plain.param_groups] == [0.1, 0.0]


def test_checkpoint_round_trip_restores_scales_and_random_stream():
    model = layer_model(rounding="stochastic")
    optimizer = build_optimizer(model, OptimizerSpec("grid"))
    x = torch.randn(4, 16)
    model(x).sum().backward()
    optimizer.step()
    saved_state = {k: v for k, v in optimizer.state_dict().items()}
    saved_weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    optimizer.step()
    expected = model.fc.weight.detach().clone()
    model.load_state_dict(saved_weights, strict=False)
    optimizer.load_state_dict(saved_state)
    optimizer.step()
    assert torch.equal(model.fc.weight, expected)


# ---- the update monitor on hand-built steps ---------------------------------------------------------
@pytest.mark.parametrize("spec", ["E0M7", "E1M6", "E3M4", "E4M3", "E5M2", "E7M0"])
@pytest.mark.parametrize("n", [5, 70_001])  # the second: threaded
def test_step_counts_are_the_definitions_in_both_kernels(monkeypatch, spec, n):
    """updates = grad != 0, flips = before != after (weight units, -0 == +0), stalled = updated and
    not flipped, and the exact integer sums of the codes after the step: native and torch alike."""
    from altgrad.training.monitors.updates import code_moments, step_counts

    fmt = get_format(spec)
    generator = torch.Generator().manual_seed(3)
    scale = 2.0 ** 5
    after_scaled = quantize(torch.randn(n, generator=generator) * fmt.max / 4, fmt)
    after_scaled[:3] = torch.tensor([0.0, -0.0, fmt.max])  # zeros and the top code
    before = after_scaled / scale
    moved = torch.rand(n, generator=generator) < 0.3
    before[moved] = before[moved] * 2 + 1  # somewhere else
    before[1] = 0.0  # +0 before, -0 after: not a flip
    grad = torch.where(torch.rand(n, generator=generator) < 0.6, torch.randn(n, generator=generator), 0.0)
    updated, changed = grad != 0, before != after_scaled / scale
    codes = magnitude_codes(after_scaled, fmt).long()
    expected = (int(updated.sum()), int(changed.sum()), int((updated & ~changed).sum()), int(codes.sum()),
                int((codes * codes).sum()))
    assert step_counts(before, after_scaled, scale, grad, fmt) == expected
    monkeypatch.setenv("ALTGRAD_KERNEL", "eager")
    assert step_counts(before, after_scaled, scale, grad, fmt) == expected
    mean, std = code_moments(expected[3], expected[4], n)
    assert mean == pytest.approx(float(codes.double().mean()), rel=1e-12)
    assert std == pytest.approx(float(codes.double().std()), rel=1e-9)


def test_code_moments_of_one_element_have_no_spread():
    from altgrad.training.monitors.updates import code_moments

    mean, std = code_moments(7, 49, 1)
    assert mean == 7 and math.isnan(std)
    assert code_moments(6, 18, 2) == (3.0, 0.0)  # codes 3 and 3
@pytest.mark.parametrize("storage", ["format", "master"])
def test_update_monitor_counts_exactly_on_a_hand_built_step(storage):
    from altgrad.training.monitors import StepContext, UpdateMonitor

    model = layer_model("E4M3", storage=storage)
    build_optimizer(model, OptimizerSpec("adamw"))
    model(torch.randn(2, 16))  # the forward cast sets a master weight's scale
    layer = model.fc
    monitor = UpdateMonitor(model, interval=1)
    scale = float(layer.weight_scale)
    with torch.no_grad():
        layer.weight.copy_(quantize(layer.weight * scale, get_format("E4M3")) / scale)  # on the grid, both storages
    weight = layer.weight.detach()
    layer.weight.grad = torch.zeros_like(weight)
    layer.weight.grad.view(-1)[:10] = 1.0  # 10 updates
    ctx = StepContext(step=1, batches=[], grad_accum=1)
    monitor.before_update(ctx)
    rungs_before = rungs(weight * scale, get_format("E4M3"))
    with torch.no_grad():
        flat = layer.weight.view(-1)
        for i in (2, 4, 6, 20, 21):  # 3 updated and 2 not-updated elements move one code up
            flat[i] = float(values_of_rungs(rungs(flat[i:i + 1] * scale, get_format("E4M3")) + 1,
                                            get_format("E4M3"))) / scale
        flat[8] = flat[8] + 1e-3 * float(get_format("E4M3").ulp(torch.tensor(float(flat[8]) * scale))) / scale \
            if storage == "master" else flat[8]  # a master moved by a thousandth of a step: no flip
    metrics = monitor.after_update(ctx)
    name = "fc"
    assert metrics[f"optim/updates/{name}"] == 10 and metrics[f"optim/flips/{name}"] == 5
    assert metrics[f"optim/stall_ratio/{name}"] == pytest.approx(1 - 5 / 10)
    assert metrics[f"quant/bit_stall_rate/{name}"] == pytest.approx(7 / 10)  # 7 of the 10 updates kept their code
    assert metrics[f"optim/update_rate/{name}"] == pytest.approx(10 / 128)
    assert metrics[f"optim/flip_rate/{name}"] == pytest.approx(5 / 128)
    on_grid_after = quantize(layer.weight.detach() * scale, get_format("E4M3"))  # a master's cast
    codes_after = magnitude_codes(on_grid_after, get_format("E4M3")).float()
    assert metrics[f"bit_position/mean/{name}"] == pytest.approx(float(codes_after.mean()))
    assert int((rungs(on_grid_after, get_format("E4M3")) - rungs_before).sum()) == 5  # 5 moved one code up
    assert metrics["optim/stall_ratio"] == metrics[f"optim/stall_ratio/{name}"]  # one layer: the mean is itself
    assert (f"optim/rescales/{name}" in metrics) == (storage == "format")


def test_stored_adamw_takes_adamws_step_before_rounding(monkeypatch):
    """Arms B and C: the step written before the projection is AdamW's (torch's, up to float32
    rounding), for format weights; other parameters take torch's step bit for bit."""
    from altgrad.optim.storage import FormatWeight as Weight

    captured = []
    monkeypatch.setattr(Weight, "project", lambda self, generator, rounding=None, count=True:
                        captured.append(self.param.detach().clone()) if count else None)
    model = layer_model(storage="format")
    reference_model = layer_model(storage="master")
    optimizer = build_optimizer(model, OptimizerSpec("adamw", lr=0.3))
    reference = build_optimizer(reference_model, OptimizerSpec("adamw", lr=0.3))  # torch's AdamW
    assert type(reference) is torch.optim.AdamW and isinstance(optimizer, StoredAdamW)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference_model.parameters()):
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            q.grad = p.grad.clone()
        before = model.fc.weight.detach().clone()
        with torch.no_grad():
            reference_model.fc.weight.copy_(before)  # the same w (the stored one is not projected here)
        optimizer.step()
        reference.step()
    ours, theirs = captured[-1] - before, reference_model.fc.weight.detach() - before
    assert close_steps(ours, theirs, torch.ones_like(ours), before)
    assert not close_steps(ours, 1.01 * theirs, torch.ones_like(ours), before)
    assert torch.equal(model.norm.weight, reference_model.norm.weight)


def test_random_rungs_are_floor_v_plus_u_exactly():
    """An integer v never moves off itself; a fraction f moves up with probability f (to 2^-30)."""
    from altgrad.optim.grid import random_rungs

    seed = torch.tensor([123, 456])
    whole = random_rungs(torch.full((1 << 18,), 3.0), seed)
    assert torch.equal(whole, torch.full((1 << 18,), 3.0))
    for v in (-2.75, 0.3, 1.5):
        moves = random_rungs(torch.full((1 << 18,), v), seed)
        low = math.floor(v)
        assert set(moves.unique().tolist()) <= {low, low + 1}
        frac = v - low
        assert abs(float((moves == low + 1).float().mean()) - frac) < 5 * math.sqrt(frac * (1 - frac) / (1 << 18))
