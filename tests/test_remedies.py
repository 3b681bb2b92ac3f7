"""The non-geometric remedies for stalling without master weights (DESIGN §5.2): ECO's error
feedback into Adam's first moment (optim/eco.py) and compensated storage (Kahan summation,
optim/storage.py FormatWeight.store), on constructed tensors: against a direct transcription
of the equations, the state they keep, and what they do to steps below half a grid step."""

import copy
import math

import pytest
import torch
from torch import nn

from altgrad.errors import UserError
from altgrad.optim import EcoAdamW, FormatWeight, OptimizerSpec, StoredAdamW, build_optimizer
from altgrad.quantization import get_format, quantize
from altgrad.quantization.scaling import scale_from_amax
from altgrad.training import resolve_config
from test_optim import layer_model

BETAS, EPS, WD = (0.9, 0.99), 1e-8, 0.1


@pytest.fixture(autouse=True, params=["auto", "eager"])
def kernel(request, monkeypatch):
    """Both paths: the native Adam step and projection (auto, on CPU) and the torch code."""
    monkeypatch.setenv("ALTGRAD_KERNEL", request.param)
    return request.param


def one_weight(values, fmt="E5M2", rounding="nearest", compensation=None):
    param = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())
    weight = FormatWeight("w", param, get_format(fmt), stored=True, update_rounding=rounding,
                          compensation=compensation)
    return param, weight


def eco_optimizer(param, weight, lr, optimizer=EcoAdamW):
    group = {"params": [param], "lr": lr, "weight_decay": WD, "geometry": True}
    return optimizer([group], [weight], 0, betas=BETAS, eps=EPS, foreach=True)


# ---- ECO -------------------------------------------------------------------------------------------
def eco_transcription(w, grads, lrs, fmt, bias_correction=True):
    """Algorithm 3 of Nikdan et al. (2026), transcribed in float64 from the equations in
    optim/eco.py's docstring: the AdamW step to w~, w^ = Q(w~) at the power-of-two amax scale of
    w~ (round to nearest), e = w~ - w^, and m += (1 - b1^t)/lr (1 - 1/b1)(sqrt(v_hat) + eps) e.
    ``bias_correction=False`` drops the (1 - b1^t) factor: a wrong transcription that must differ."""
    b1, b2 = BETAS
    w = w.double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denominator = torch.sqrt(v / (1 - b2**t)) + EPS
        intended = w - lr * (m / (1 - b1**t) / denominator + WD * w)
        scale = float(scale_from_amax(intended.abs().amax().float(), fmt))
        landed = quantize((intended * scale).float(), fmt).double() / scale
        error = intended - landed
        m = m + ((1 - b1**t) if bias_correction else 1.0) / lr * (1 - 1 / b1) * denominator * error
        w = landed
    return w, m, v


def constructed(seed=0, shape=(32, 24)):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * torch.logspace(-2, 0, shape[1])  # two decades of magnitude
    grads = [torch.randn(shape, generator=generator) * 1e-2 for _ in range(5)]
    return w, grads


@pytest.mark.parametrize("fmt", ["E5M2", "E4M3", "E3M4"])
def test_eco_is_its_papers_equations_on_constructed_tensors(fmt):
    w0, grads = constructed()
    lrs = [0.02, 0.05, 0.05, 0.03, 0.01]  # a schedule: the injection divides by each step's own lr
    param, weight = one_weight(w0, fmt)
    start = param.detach().clone()  # on the grid (every arm starts there)
    optimizer = eco_optimizer(param, weight, lrs[0])
    for grad, lr in zip(grads, lrs):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = grad.clone()
        optimizer.step()
    w, m, v = eco_transcription(start, grads, lrs, get_format(fmt))
    state = optimizer.state[param]
    assert torch.equal(param.detach().double(), w)  # the same grid points every step
    assert torch.allclose(state["exp_avg_sq"].double(), v, rtol=1e-6, atol=0)
    assert torch.allclose(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-9)
    _, wrong, _ = eco_transcription(start, grads, lrs, get_format(fmt), bias_correction=False)
    assert not torch.allclose(state["exp_avg"].double(), wrong, rtol=1e-3, atol=1e-9)
    # the feedback is real: without it (arm B) the moment is plain Adam's and differs
    b_param, b_weight = one_weight(w0, fmt)
    plain = eco_optimizer(b_param, b_weight, lrs[0], optimizer=StoredAdamW)
    for grad, lr in zip(grads, lrs):
        plain.param_groups[0]["lr"] = lr
        b_param.grad = grad.clone()
        plain.step()
    assert not torch.allclose(plain.state[b_param]["exp_avg"].double(), m, rtol=1e-3, atol=1e-9)


def test_eco_with_a_zero_learning_rate_moves_and_injects_nothing():
    w0, grads = constructed(1)
    param, weight = one_weight(w0)
    start = param.detach().clone()
    optimizer = eco_optimizer(param, weight, 0.0)
    param.grad = grads[0]
    optimizer.step()
    state = optimizer.state[param]
    assert torch.equal(param.detach(), start)
    assert torch.equal(state["exp_avg"], grads[0] * (1 - BETAS[0]))  # Adam's moment, no 0/0
    assert torch.isfinite(state["exp_avg"]).all()


def test_eco_keeps_adams_two_moments_and_nothing_else_of_the_weights_shape():
    model = layer_model(storage="format")
    optimizer = build_optimizer(model, OptimizerSpec("eco"))
    assert isinstance(optimizer, EcoAdamW)
    for _ in range(2):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        model.zero_grad()
    shape = model.fc.weight.shape
    state = optimizer.state_dict()
    tensors = [(key, t) for s in state["state"].values() for key, t in s.items() if torch.is_tensor(t)]
    tensors += [(key, t) for w in state["altgrad"]["weights"].values() for key, t in w.items()]
    assert sorted(key for key, t in tensors if t.shape == shape) == ["exp_avg", "exp_avg_sq"]


def quadratic_run(optimizer_class, compensation=None, rounding="nearest", steps=3000, lr=2e-4):
    """AdamW on ``(w - w*)^2 / 2`` with targets w* off the grid, 0 to 6.4 grid steps from the start,
    and steps of lr = 2e-4 (0.0064 of the spacing 2^-5 of E3M4 at this scale): the stored
    weight's and the FP32 master's distance to w* after ``steps`` steps, in grid steps."""
    w0 = torch.full((1024,), 0.75)
    w0[0] = 1.0  # amax, its own target: the scale stays 64 and 0.75 sits where the spacing is 2^-5
    target = torch.linspace(0.55, 0.95, 1024)
    target[0] = 1.0
    param, weight = one_weight(w0, "E3M4", rounding, compensation=compensation)
    optimizer = eco_optimizer(param, weight, lr, optimizer=optimizer_class)
    optimizer.param_groups[0]["weight_decay"] = 0.0
    master = nn.Parameter(w0.clone())
    adamw = torch.optim.AdamW([master], lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    for _ in range(steps):
        param.grad, master.grad = param.detach() - target, master.detach() - target
        optimizer.step()
        adamw.step()
    spacing = float(get_format("E3M4").ulp(torch.tensor(0.75 * float(weight.scale)))) / float(weight.scale)
    assert spacing == 2.0**-5 and float(weight.scale) == 64.0
    return ((param.detach() - target) / spacing)[1:], ((master.detach() - target) / spacing)[1:]


def test_eco_reaches_the_optimum_where_round_to_nearest_stalls():
    """Arm B never leaves its start (every step is below half a grid step); ECO's stored weight
    reaches a neighbourhood of the optimum (the paper's constant radius: measured, a mean of 1.08
    grid steps, at most 1.85), as the FP32 master reaches the optimum itself."""
    stalled, master = quadratic_run(StoredAdamW)
    assert float(master.abs().max()) < 0.05
    assert float(stalled.abs().mean()) > 3.1  # where it started: 0 to 6.4 grid steps away
    eco, _ = quadratic_run(EcoAdamW)
    assert float(eco.abs().max()) < 2.0 and float(eco.abs().mean()) < 1.2
    assert float(eco.abs().mean()) < 0.4 * float(stalled.abs().mean())


# ---- compensated storage ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_stored_weight_plus_compensation_is_the_exact_sum_to_the_buffers_precision(dtype, rounding):
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=generator) * 0.02
    param, weight = one_weight(w0, "E4M3", rounding, compensation=dtype)
    assert weight.compensation.dtype == dtype and not weight.compensation.any()  # starts at zero
    for _ in range(5):
        delta = torch.randn(64, 32, generator=generator) * 3e-4
        exact = param.detach().double() + delta.double() + weight.compensation.double()
        with torch.no_grad():
            param.add_(delta)  # w + delta, as an optimizer leaves it
        weight.store(generator)
        residual = exact - param.detach().double()  # what the grid could not hold
        kept = weight.compensation.double()
        # the buffer is the residual rounded once to its dtype (float32's own rounding of w + delta aside)
        info = torch.finfo(dtype)  # half an ulp of the residual, or of the subnormal spacing
        # and the two float32 roundings of the sums w + delta and (w + delta) + c
        tolerance = residual.abs() * info.eps / 2 + info.smallest_normal * info.eps / 2 + exact.abs() * 2.0**-23
        assert bool(((kept - residual).abs() <= tolerance).all())
    assert weight.compensation.any()


def test_compensation_in_float32_loses_nothing_a_float32_sum_keeps():
    param, weight = one_weight(torch.tensor([1.0, 0.75, -0.3]), "E5M2", compensation=torch.float32)
    with torch.no_grad():
        param.add_(torch.tensor([0.0, 0.01, 0.001]))
    y = param.detach().clone()
    weight.store(None)
    assert torch.equal(param.detach() + weight.compensation, y)  # Q(y) + (y - Q(y)) = y exactly
    assert param.tolist()[:2] == [1.0, 0.75]  # nearest: the step was below half a grid step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_sub_ulp_steps_move_a_compensated_weight_by_their_sum(dtype):
    """100 steps of a tenth of the spacing: round-to-nearest alone never moves; with the buffer
    the weight moves by their sum, 10 grid steps, to within the buffer's precision."""
    w0 = torch.full((512,), 0.75)
    w0[0] = 1.0  # amax: scale 2^15, spacing 0.125 at 0.75
    plain_param, plain = one_weight(w0)
    param, weight = one_weight(w0, compensation=dtype)
    step = torch.full((512,), 0.0125)
    step[0] = 0.0
    bound = torch.zeros(512, dtype=torch.float64)  # what the buffer's roundings may have lost so far
    eps = torch.finfo(dtype).eps
    for _ in range(100):
        with torch.no_grad():
            plain_param.add_(step)
            param.add_(step)
        plain.store(None)
        weight.store(None)
        bound += weight.compensation.double().abs() * eps / 2 + param.detach().double().abs() * 2.0**-23
    assert torch.equal(plain_param.detach(), w0)  # stalled
    total = param.detach().double() + weight.compensation.double()
    assert bool(((total[1:] - (0.75 + 100 * 0.0125)).abs() <= bound[1:]).all())  # the sum, to the buffer's precision
    assert float(bound[1:].max()) < 0.05  # and that is far below a grid step
    assert torch.equal(param.detach()[1:], torch.full((511,), 2.0))  # 10 grid steps of 0.125 ... on E5M2's grid
    assert float(weight.scale) == float(plain.scale) / 2  # amax 2.0 now: the scale followed


def test_compensated_adamw_reaches_the_optimum_where_round_to_nearest_stalls():
    """The same problem as ECO's: with a bfloat16 buffer the stored weight ends within one grid
    step of the optimum (measured: at most 0.97, mean 0.33), as it would with an FP32 master."""
    compensated, _ = quadratic_run(StoredAdamW, compensation=torch.bfloat16)
    assert float(compensated.abs().max()) <= 1.0 and float(compensated.abs().mean()) < 0.5


def test_the_compensation_is_checkpointed_and_restored():
    model = layer_model(storage="format")
    optimizer = build_optimizer(model, OptimizerSpec("adamw", compensation="kahan"))
    (weight,) = optimizer.weights
    assert weight.compensation.dtype == torch.bfloat16
    x = torch.randn(4, 16)
    model(x).sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # torch's holds references to the live moments
    saved_model = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    kept = weight.compensation.clone()
    assert kept.any()
    optimizer.step()
    expected = model.fc.weight.detach().clone(), weight.compensation.clone()
    model.load_state_dict(saved_model, strict=False)
    optimizer.load_state_dict(saved)
    assert torch.equal(weight.compensation, kept)
    optimizer.step()
    assert torch.equal(model.fc.weight.detach(), expected[0]) and torch.equal(weight.compensation, expected[1])


def test_compensation_works_with_the_geometry_arm_and_its_buffer_has_the_configured_dtype():
    model = layer_model(storage="format", rounding="stochastic")
    optimizer = build_optimizer(model, OptimizerSpec("manifold", compensation="kahan", compensation_dtype="float16"))
    (weight,) = optimizer.weights
    assert weight.compensation.dtype == torch.float16
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    assert weight.compensation.any()


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(optimizer="eco", weight_storage="master"), "needs weight_storage format"),
    (dict(compensation="kahan"), "needs weight_storage format"),  # adamw defaults to FP32 masters
    (dict(optimizer="manifold", weight_storage="master", compensation="kahan"), "needs weight_storage format"),
    (dict(optimizer="eco", compensation="kahan"), "choose one"),
    (dict(weight_storage="format", compensation="simple"), "compensation must be one of none, kahan"),
    (dict(weight_storage="format", compensation="kahan", compensation_dtype="int8"), "compensation_dtype"),
])
def test_impossible_remedies_are_clear_errors(settings, message):
    with pytest.raises(UserError, match=message):
        resolve_config(None, dict(preset="tiny", format="E5M2", **settings))


def test_the_arms_are_named_apart_with_their_defaults():
    def arm(**settings):
        return resolve_config(None, dict(preset="tiny", format="E5M2", **settings)).arm

    assert arm(optimizer="eco") == "eco-rtn"  # ECO defaults to stored, round to nearest
    assert arm(optimizer="eco", update_rounding="stochastic") == "eco-sr"
    assert arm(weight_storage="format", compensation="kahan") == "adamw-rtn-kahan"  # C-kahan
    assert arm(optimizer="manifold", compensation="kahan") == "manifold-sr-kahan"
    assert arm(optimizer="grid", compensation="kahan") == "grid-sr-kahan"
    with pytest.raises(ValueError, match="not eco"):
        OptimizerSpec("eco", compensation="kahan")
    assert math.isfinite(OptimizerSpec("eco").lr)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gridoptim_with_compensation_moves_by_the_sum_of_sub_rung_moves(rounding):
    """GridOptim's proposal here is 0.1 rung a step (Adam's direction of a constant gradient is
    1, grid_lr 0.1): to nearest it never moves; with a float32 buffer the move starts at the code
    position of w + c, so 60 steps move it 6 rungs (the buffer keeps the rest, under one rung)."""
    from altgrad.optim import GridOptim
    from altgrad.quantization.codes import rungs

    fmt = get_format("E4M3")
    results = {}
    for compensation in (None, torch.float32):
        values = torch.linspace(0.05, 0.1, 65)
        values[0] = 1.0  # the amax, without a gradient (its proposal is 0): the scale stays 256
        param, weight = one_weight(values, "E4M3", rounding, compensation=compensation)
        start = rungs(param.detach() * float(weight.scale), fmt)
        optimizer = GridOptim([{"params": [param], "lr": 0.1, "weight_decay": 0.0, "geometry": True}], [weight], 0,
                              eps=0.0)
        for _ in range(60):
            param.grad = torch.full_like(param, -1.0)
            param.grad[0] = 0.0
            optimizer.step()
        assert float(weight.scale) == 256.0  # no rescale: rungs before and after compare
        results[compensation] = ((rungs(param.detach() * 256.0, fmt) - start)[1:], weight.compensation)
    plain, _ = results[None]
    moved, buffer = results[torch.float32]
    if rounding == "nearest":
        assert torch.equal(plain, torch.zeros_like(plain))  # 0.1 rung rounds to no move, every step
    assert bool(((moved - 6).abs() <= 1).all()) and float(moved.float().mean()) == pytest.approx(6, abs=0.35)
    assert float(buffer.abs().max()) * 256.0 < 2.0  # under one grid step (at most 2 at these scaled values)


def test_a_rescale_or_a_new_format_keeps_what_its_re_rounding_lost_in_the_buffer():
    """Re-rounding a compensated weight onto another grid (GridOptim's rescale, an emergency
    shift) moves the residual into the buffer: w + c is unchanged, to the buffer's precision."""
    generator = torch.Generator().manual_seed(2)
    param, weight = one_weight(torch.randn(256, generator=generator) * 0.05, "E4M3", compensation=torch.float32)
    with torch.no_grad():
        param.add_(torch.randn(256, generator=generator) * 1e-3)
    weight.store(None)
    total = param.detach().double() + weight.compensation.double()
    stored = param.detach().clone()
    weight.rescale(2.0**-8, None)  # many values into the subnormals: the re-rounding loses there
    assert not torch.equal(param.detach(), stored)
    assert torch.allclose(param.detach().double() + weight.compensation.double(), total, rtol=0, atol=1e-8)
    weight.reformat(get_format("E3M4"), None)
    assert torch.allclose(param.detach().double() + weight.compensation.double(), total, rtol=0, atol=1e-8)
