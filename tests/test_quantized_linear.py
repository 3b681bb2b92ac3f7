"""QuantizedLinear against a reference built from `quantize` and plain matmuls; model surgery."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from oracles import EIGHT_BIT_FORMATS

from altgrad.errors import UserError
from altgrad.model import GPT, GPTConfig
from altgrad.model import gpt as gpt_module
from altgrad.model.surgery import build_policy, quantize_model, quantized_layers
from altgrad.quantization import REGISTRY, ScalingConfig, get_format, quantize, scale_from_amax
from altgrad.quantization import linear_op
from altgrad.quantization.linear import OPERANDS, LinearQuantConfig, QuantizedLinear
from altgrad.quantization.scaling import cast_to_grid

DEFAULTS = dict(rounding="nearest", grad_rounding="nearest", scaling="current", amax_history_len=16,
                scale_margin=0, power_of_two_scales=True, gemm_dtype="bf16")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


@pytest.mark.parametrize("fmt", EIGHT_BIT_FORMATS, ids=lambda f: f.name)
def test_every_8bit_value_times_a_power_of_two_is_exact_in_bfloat16(fmt):
    values = torch.tensor(fmt.positive_values, dtype=torch.float64)
    values = torch.cat([values, -values])
    for k in range(-40, 41, 5):
        scaled = (values * 2.0**k).float()
        assert torch.equal(bits(scaled.bfloat16()), bits(scaled)), (fmt.name, k)


def test_power_of_two_scale_never_pushes_amax_past_max():
    for fmt in REGISTRY.values():
        for amax in torch.tensor([fmt.max, 1.0, 3.0, 1e-3, 7e4]).float():
            # the float32 neighbours above amax are where a rounded quotient max/amax goes wrong
            for value in (amax, torch.nextafter(amax, torch.tensor(float("inf")))):
                scale = scale_from_amax(value, fmt)
                assert float(value) * float(scale) <= fmt.max, (fmt.name, float(value))
                assert float(value) * float(scale) * 2 > fmt.max


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cast_to_grid_equals_quantize_of_the_scaled_tensor(rounding):
    fmt = get_format("E3M4")
    x = torch.randn(5000) * 3
    amax = x.abs().amax()
    q, scale, seen = cast_to_grid(x, fmt, amax, rounding=rounding, generator=torch.Generator().manual_seed(1))
    assert float(seen) == float(amax)
    expected = quantize(x * scale_from_amax(amax, fmt), fmt, rounding=rounding,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(bits(q), bits(expected))
    own, _, _ = cast_to_grid(x, fmt, rounding=rounding, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bits(own), bits(q))  # the scale from x's own amax
    eager, _, _ = cast_to_grid(x, fmt, amax, rounding=rounding, generator=torch.Generator().manual_seed(1),
                            kernel="eager")
    assert torch.equal(bits(q), bits(eager))


def reference_linear(x, w, b, config: LinearQuantConfig, grad_y, autocast: bool):
    """Dequantized operands from `quantize`, then plain F.linear / matmul in the GEMM dtype: bf16
    under bf16 autocast with bf16 GEMMs, else float32 (the values are exact in both)."""
    dtype = torch.bfloat16 if autocast and config.gemm_dtype == "bf16" else torch.float32

    def dequantized(t, fmt):
        scale = scale_from_amax(t.detach().abs().amax(), fmt)
        return (quantize(t.detach().float() * scale, fmt) / scale).to(dtype)

    xd, wd = dequantized(x, config.activation), dequantized(w, config.weight)
    y = F.linear(xd, wd, None if b is None else b.detach().to(dtype))
    y = y.to(torch.bfloat16) if autocast else y
    gd = dequantized(grad_y, config.gradient)
    grad_x = torch.matmul(gd, wd)
    grad_w = gd.reshape(-1, gd.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
    return y, grad_x, grad_w


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("gemm", ["bf16", "fp32"])
@pytest.mark.parametrize("formats", [("E4M3", "E5M2"), ("E3M4", "E5M2"), ("E0M7", "E5M2"), ("E7M0", "E4M3"),
                                     ("E7M0", "E7M0"), ("E6M1", "E7M0")])  # scaled x scaled passes 2^128
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_the_reference_bit_for_bit(gemm, formats, bias, autocast):
    fwd, bwd = formats
    config = LinearQuantConfig(weight=fwd, activation=fwd, gradient=bwd, gemm_dtype=gemm)
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias)
    layer = QuantizedLinear.from_linear(linear, config, name="test")
    x = (torch.randn(3, 7, 48) * 5).requires_grad_()
    grad_y = torch.randn(3, 7, 40) * 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(grad_y.to(y.dtype))
    ref_y, ref_gx, ref_gw = reference_linear(x, linear.weight, linear.bias, config, grad_y.to(y.dtype), autocast)
    assert torch.equal(bits(y), bits(ref_y))
    assert torch.equal(bits(x.grad), bits(ref_gx.float()))
    assert torch.equal(bits(linear.weight.grad), bits(ref_gw.float()))
    if bias:
        assert torch.equal(linear.bias.grad, grad_y.to(y.dtype).reshape(-1, 40).sum(0).float())


def test_under_autocast_the_layer_returns_bf16_like_nn_linear():
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")
    layer = QuantizedLinear.from_linear(torch.nn.Linear(16, 8), config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    assert layer(torch.randn(4, 16)).dtype == torch.float32


def test_delayed_scaling_uses_the_history_and_saturates_a_new_outlier():
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2",
                               scaling=ScalingConfig(mode="delayed", history_len=4))
    layer = QuantizedLinear.from_linear(torch.nn.Linear(8, 8), config)
    quantizer = layer.quantizers["activation"]
    quantizer.collecting = True
    layer(torch.full((2, 8), 0.5))
    layer(torch.full((2, 8), 8.0))  # 16x the amax in the history: saturates
    assert quantizer.stats[0].overflow == 0 and quantizer.stats[1].overflow == 16
    state = layer.get_extra_state()
    assert state["activation"]["amax"]["count"] == 2
    layer.eval()
    layer(torch.full((2, 8), 100.0))  # evaluation does not touch the history
    assert layer.get_extra_state()["activation"]["amax"]["count"] == 2


def test_stochastic_rounding_is_reproducible_from_the_saved_state():
    config = LinearQuantConfig(weight="E3M4", activation="E3M4", gradient="E5M2", rounding="stochastic")
    layer = QuantizedLinear.from_linear(torch.nn.Linear(32, 32), config, seed=3)
    x = torch.randn(4, 32)
    saved = copy.deepcopy(layer.state_dict())
    first = layer(x)
    layer.load_state_dict(saved)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the stream moved on


def test_a_format_not_exact_in_bf16_needs_an_fp32_gemm():
    with pytest.raises(ValueError, match="gemm_dtype fp32"):
        LinearQuantConfig(weight="E5M10", activation="E5M10", gradient="E5M2")
    LinearQuantConfig(weight="E5M10", activation="E5M10", gradient="E5M2", gemm_dtype="fp32")


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_surgery_swaps_exactly_the_selected_layers_and_keeps_parameters():
    model = tiny_gpt()
    source_before = inspect.getsource(gpt_module)
    params_before = {name: p for name, p in model.named_parameters()}
    policy = build_policy([{"layers": "lm_head", "format": "bf16"}, {"layers": "*.attn.c_proj", "format": "bf16"},
                           {"layers": "*.attn.c_attn", "format": "E5M2"}, {"layers": "*.mlp.*", "format": "E3M4"}],
                          {**DEFAULTS, "gradient": "E5M2"})
    rng = torch.get_rng_state()
    assignments = quantize_model(model, policy)
    assert torch.equal(rng, torch.get_rng_state())  # dropout masks stay paired with a BF16 run
    swapped = quantized_layers(model)
    assert sorted(swapped) == sorted(f"transformer.h.{i}.{name}" for i in range(2)
                                     for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"))
    assert swapped["transformer.h.0.attn.c_attn"].config.weight.name == "E5M2"
    assert swapped["transformer.h.1.mlp.c_fc"].config.activation.name == "E3M4"
    assert swapped["transformer.h.1.mlp.c_fc"].config.gradient.name == "E5M2"
    assert type(model.lm_head) is torch.nn.Linear and type(model.transformer.h[0].attn.c_proj) is torch.nn.Linear
    assert {a.name: a.quantized for a in assignments}["lm_head"] is False
    assert {name: p for name, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert model.lm_head.weight is model.transformer.wte.weight
    assert inspect.getsource(gpt_module) == source_before


def test_an_empty_policy_leaves_the_model_computing_exactly_as_before():
    model, idx = tiny_gpt(), torch.randint(0, 64, (2, 16))
    before, _ = model(idx)
    quantize_model(model, build_policy([{"layers": "*", "format": "fp32"}], {**DEFAULTS, "gradient": None}))
    assert not quantized_layers(model)
    assert torch.equal(model(idx)[0], before)


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(UserError, match="matches no Linear layer"):
        quantize_model(tiny_gpt(), build_policy([{"layers": "*.mlp.fc", "format": "E4M3"}], DEFAULTS))


@pytest.mark.parametrize("rule, message", [
    ({"layers": "*", "format": "E9M9"}, "E9M9"),
    ({"layers": "*", "format": "E4M3", "colour": 1}, "unknown key"),
    ({"format": "E4M3"}, "'layers' pattern"),
    ({"layers": "*", "format": "E4M3", "rounding": "up"}, "rounding must be one of"),
])
def test_bad_policy_rules_are_clear_errors(rule, message):
    with pytest.raises(UserError, match=message):
        build_policy([rule], DEFAULTS)


def test_under_fp32_the_gemms_return_float32_not_bf16_rounded_values():
    """precision fp32 with a quantized layer: the operands are on the grid (exact in bf16),
    but the products accumulate and come back in float32, forward and backward."""
    import torch.nn.functional as F

    from altgrad.quantization.linear import LinearQuantConfig, QuantizedLinear
    from altgrad.quantization.scaling import cast_to_grid

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = QuantizedLinear.from_linear(linear, LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2"))
    x = torch.randn(16, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    qx, sx, _ = cast_to_grid(x.detach(), get_format("E4M3"))
    qw, sw, _ = cast_to_grid(linear.weight.detach(), get_format("E4M3"))
    expected = F.linear(qx.double() / float(sx), qw.double() / float(sw), linear.bias.detach().double())
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-6)  # float32 accuracy, not bf16's 2^-9
    assert (y != y.bfloat16().float()).float().mean() > 0.9  # not bf16 values
    y.square().sum().backward()
    assert x.grad.dtype == torch.float32 and (x.grad != x.grad.bfloat16().float()).float().mean() > 0.9
    assert (linear.weight.grad != linear.weight.grad.bfloat16().float()).float().mean() > 0.9


def test_on_cpu_the_gemms_take_dequantized_operands_with_no_unscale_pass():
    """The casts write q(x s) / s, so forward and backward run the GEMMs of nn.Linear and nothing
    else: no multiplication by an unscale factor over an operand or a product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for storage in ("master", "format"):
        config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2", weight_storage=storage)
        torch.manual_seed(0)
        linear = torch.nn.Linear(32, 16)
        layer = QuantizedLinear.from_linear(linear, config)
        if storage == "format":
            from altgrad.optim import build_optimizer, OptimizerSpec

            build_optimizer(torch.nn.Sequential(layer), OptimizerSpec("adamw"))  # stores the weight on its grid
        x = torch.randn(4, 8, 32, requires_grad=True)
        grad_y = torch.randn(4, 8, 16).to(torch.bfloat16)
        with Recorder() as recorder:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(grad_y)
        assert not {"mul", "mul_", "div"} & set(recorder.ops), (storage, recorder.ops)
        assert recorder.ops.count("mm") + recorder.ops.count("addmm") + recorder.ops.count("bmm") >= 2


@pytest.mark.parametrize("storage", ["master", "format"])
@pytest.mark.parametrize("formats", [("E4M3", "E5M2"), ("E7M0", "E7M0"), ("E0M7", "E5M2")])
def test_operands_that_carry_their_scale_give_the_same_bits_as_dequantized_ones(monkeypatch, storage, formats):
    """The accelerator path (scaled grid values, the GEMMs unscaled by the carried scales) and the
    CPU path (dequantized operands, no unscale) compute the same forward and backward, bit for bit."""
    import altgrad.quantization.linear as linear_module

    fwd, bwd = formats
    config = LinearQuantConfig(weight=fwd, activation=fwd, gradient=bwd, weight_storage=storage)
    results = []
    for dequantize in (True, False):
        if not dequantize:  # the Python route (no native streams), its casts not dequantized
            real = linear_module.cast_operand
            monkeypatch.setattr(linear_module, "cast_operand", lambda *a, **k: real(*a, **k | {"dequantize": False}))
            monkeypatch.setattr(linear_module, "dequantize_exact", lambda fmt, scale: False)
            monkeypatch.setattr(linear_op, "native_stream", lambda *a: None)
        torch.manual_seed(0)
        linear = torch.nn.Linear(48, 40)
        layer = QuantizedLinear.from_linear(linear, config, name="test")
        if storage == "format":
            from altgrad.optim import OptimizerSpec, build_optimizer

            build_optimizer(torch.nn.Sequential(layer), OptimizerSpec("adamw"))
        x = (torch.randn(3, 7, 48) * 5).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1)).to(y.dtype) * 1e-3)
        carried = {name: q.last_scale for name, q in layer.quantizers.items()}
        results.append((y.detach(), x.grad, linear.weight.grad, linear.bias.grad, carried))
        monkeypatch.undo()
    for mine, other in zip(results[0][:4], results[1][:4]):
        assert torch.equal(bits(mine), bits(other))
    assert results[0][4] == results[1][4]  # the same scales either way


# ---- the C++ autograd op (linear_op.cpp) against its reference, the Python Function ----------

needs_op = pytest.mark.skipif(linear_op.module() is None,
                              reason=f"C++ op unavailable: {linear_op.unavailable_reason()}")


def _scale(kind: str, value: float, operand: int):
    """A carried scale: a float, a 0-d tensor, or (mixed) one of each by operand (x, w, gradient):
    an accelerator's activations beside a format-stored weight's float scale."""
    tensor = kind == "tensor" or (kind == "mixed" and operand == 1) or (kind == "mixed2" and operand != 1)
    return torch.tensor(value) if tensor else value


def _gemms_run(gemms, case, seed=0):
    """One forward and backward through ``gemms`` on constructed operands: y and every gradient."""
    exact, wide, out_dtype, kind, bias, needs = case
    g = torch.Generator().manual_seed(seed)
    gemm_dtype = torch.float32 if (not wide and out_dtype == torch.bfloat16 and kind == "fp32-gemm") else torch.bfloat16
    values = (1.0, 1.0) if kind == "one" else (2.0 ** 5, 2.0 ** -3) if exact else (1.7, 0.3)
    x = torch.randn(3, 5, 24, generator=g).requires_grad_(needs[0])
    w = torch.randn(16, 24, generator=g).requires_grad_(needs[1])
    b = torch.randn(16, generator=g).requires_grad_(needs[2]) if bias else None
    qx, qw = (x.detach() * values[0]).to(gemm_dtype), (w.detach() * values[1]).to(gemm_dtype)
    sx, sw = _scale(kind, values[0], 0), _scale(kind, values[1], 1)
    sg = _scale(kind, 2.0 ** 7 if exact else 3.1, 2)

    def cast_gradient(grad_y):
        return (grad_y.float() * 2.0 ** 7).to(gemm_dtype), sg

    y = gemms(x, w, b, qx, qw, sx, sw, exact, wide, out_dtype, cast_gradient)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    grads = [t.grad if t is not None and t.requires_grad else None for t in (x, w, b)]
    return [y.detach(), *grads]


GEMM_CASES = [
    # exact, wide, out dtype, scales, bias, which of (x, w, b) need a gradient
    (True, False, torch.bfloat16, "one", True, (True, True, True)),  # CPU default: dequantized, bf16 autocast
    (True, True, torch.float32, "one", True, (True, True, True)),  # fp32 run: float32 GEMMs on grid values
    (True, False, torch.bfloat16, "float", True, (True, True, True)),  # carried power-of-two floats
    (True, False, torch.bfloat16, "tensor", True, (True, True, True)),  # accelerator: 0-d tensor scales
    (True, True, torch.float32, "tensor", False, (True, True, False)),
    (True, False, torch.bfloat16, "mixed", True, (True, True, True)),
    (True, False, torch.bfloat16, "mixed2", True, (True, True, True)),
    (False, False, torch.bfloat16, "mixed", True, (True, True, True)),
    (False, False, torch.bfloat16, "float", True, (True, True, True)),  # not powers of two: unscale in fp32
    (False, True, torch.float32, "tensor", True, (True, True, True)),
    (True, False, torch.bfloat16, "fp32-gemm", True, (True, True, True)),  # gemm_dtype fp32 under autocast
    (True, False, torch.bfloat16, "one", False, (False, True, False)),  # the first layer: x needs no gradient
    (True, False, torch.bfloat16, "one", True, (True, False, True)),  # a frozen weight
]


@needs_op
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "-".join(
    [("exact" if c[0] else "inexact"), ("wide" if c[1] else "narrow"), c[3], "bias" if c[4] else "nobias",
     "".join("xwb"[i] for i in range(3) if c[5][i])]))
def test_the_cpp_op_is_the_python_function_bit_for_bit(case):
    from altgrad.quantization.linear import _QuantizedLinearFunction

    cpp = _gemms_run(linear_op.module().quantized_linear, case)
    python = _gemms_run(_QuantizedLinearFunction.apply, case)
    for name, mine, reference in zip(("y", "grad x", "grad w", "grad b"), cpp, python):
        assert (mine is None) == (reference is None), name
        if mine is not None:
            assert mine.dtype == reference.dtype and torch.equal(bits(mine), bits(reference)), name


@needs_op
@pytest.mark.parametrize("arm", [dict(format="E4M3"), dict(format="E5M2", rounding="stochastic", optimizer="manifold"),
                                 dict(format="E4M3", precision="fp32", optimizer="grid")], ids=["A", "D", "E-fp32"])
def test_training_with_the_cpp_op_is_training_with_the_python_function(tmp_path, tiny_data, monkeypatch, arm):
    from altgrad.training import Trainer
    from altgrad.training.tracking import read_metrics
    from runs import tiny_config, without_rates

    settings = dict(max_steps=8, eval_interval=4, stats_interval=2, **arm)
    cpp = Trainer(tiny_config(tmp_path, tiny_data, run_name="cpp", **settings)).run()
    monkeypatch.setattr(linear_op, "module", lambda: None)  # no C++ op, no native streams
    python = Trainer(tiny_config(tmp_path, tiny_data, run_name="python", **settings)).run()
    assert without_rates(read_metrics(cpp.run_dir)) == without_rates(read_metrics(python.run_dir))


def test_where_the_cpp_op_cannot_be_built_the_python_function_runs(monkeypatch, caplog):
    def fail():
        raise RuntimeError("Error building extension\nlinear_op.cpp:1:1: error: no compiler here\nninja: stopped")

    monkeypatch.setattr(linear_op, "_state", {})
    monkeypatch.setattr(linear_op, "_build", fail)
    with caplog.at_level("WARNING"):
        assert linear_op.module() is None
        assert linear_op.module() is None  # once and for all: no second build
    assert linear_op.unavailable_reason() == "linear_op.cpp:1:1: error: no compiler here"
    assert sum("C++ quantized-linear op unavailable" in r.message for r in caplog.records) == 1
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    layer = QuantizedLinear.from_linear(linear, config)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None


# ---- native streams (linear_op.NativeStream): the common configuration cast in C++ ------------

needs_streams = pytest.mark.skipif(
    linear_op.native_stream(get_format("E4M3"), "nearest", "current", True, 0) is None,
    reason=f"C++ op unavailable: {linear_op.unavailable_reason()}")


def _stream_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    normal = torch.randn(6, 40, generator=g) * 5
    wide = normal * torch.exp2(torch.randint(-40, 10, normal.shape, generator=g).float())  # below the grid's floor
    special = normal.clone()
    special[0, :4] = torch.tensor([float("inf"), -0.0, float("nan"), 0.0])
    tiny = torch.randn(6, 40, generator=g) * 1e-37  # a scale near 2^125: q / scale is not exact, nothing dequantized
    cases = dict(normal=normal, wide=wide, zeros=torch.zeros(6, 40), special=special, tiny=tiny,
                 strided=normal.t())  # not contiguous
    return {name: t.to(dtype) for name, t in cases.items()}


@needs_streams
@pytest.mark.parametrize("fmt", [f for f in EIGHT_BIT_FORMATS if f.name in ("E0M7", "E2M5", "E3M4", "E4M3", "E5M2",
                                                                           "E6M1")], ids=lambda f: f.name)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32)], ids=["f32-bf16", "bf16-bf16", "f32-f32"])
@pytest.mark.parametrize("margin", [0, 3, -2])
def test_a_native_stream_casts_as_the_python_route_bit_for_bit(fmt, dtypes, margin):
    """NativeStream.cast against cast_operand (the Python route's call): values, the carried scale,
    the stream's scale, with no guess, the right guess and a wrong one."""
    from altgrad.quantization.scaling import cast_operand, dequantize_exact

    source, out = dtypes
    stream = linear_op.native_stream(fmt, "nearest", "current", True, margin)
    for name, x in _stream_inputs(source).items():
        expected, scale, _, carried = cast_operand(x, fmt, None, margin=margin, out_dtype=out)
        for guess in (0.0, scale, scale * 4, scale / 2):
            stream.scale = guess
            values, mine = stream.cast(x, out)
            assert values.dtype == out and values.shape == x.shape and values.is_contiguous()
            assert torch.equal(bits(values), bits(expected)), (name, guess)
            assert mine == carried and stream.scale == scale, (name, guess)
        assert (carried == 1.0) == dequantize_exact(fmt, scale)
        if margin <= 0:
            assert (carried != 1.0) == (name == "tiny")  # the tiny values carry their scale


def test_native_streams_exist_only_for_the_common_configuration():
    e4m3 = get_format("E4M3")
    if linear_op.module() is not None:
        assert linear_op.native_stream(e4m3, "nearest", "current", True, 0) is not None
    assert linear_op.native_stream(None, "nearest", "current", True, 0) is None
    assert linear_op.native_stream(e4m3, "stochastic", "current", True, 0) is None  # random streams: Python
    assert linear_op.native_stream(e4m3, "nearest", "delayed", True, 0) is None  # a scale history: Python
    assert linear_op.native_stream(e4m3, "nearest", "none", True, 0) is None
    assert linear_op.native_stream(e4m3, "nearest", "current", False, 0) is None
    assert linear_op.native_stream(get_format("E7M0"), "nearest", "current", True, 0) is None  # not native-exact


def _layer_pair(config: LinearQuantConfig, size=(48, 40)):
    """Two layers on the same parameters: one on its native streams, one with them taken away."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(*size)
    native_layer = QuantizedLinear.from_linear(linear, config, name="test")
    python_layer = QuantizedLinear.from_linear(linear, config, name="test")
    for quantizer in python_layer.quantizers.values():
        quantizer.native = None
    return linear, native_layer, python_layer


def _forward_backward(layer, linear, x, grad_y, autocast):
    x = x.clone().requires_grad_()
    linear.weight.grad = linear.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(grad_y.to(y.dtype))
    return [y.detach(), x.grad, linear.weight.grad, linear.bias.grad]


@needs_streams
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("setting", [dict(), dict(gemm_dtype="fp32"), dict(rounding="stochastic"),
                                     dict(weight="E7M0", activation="E7M0", gradient="E5M2"),
                                     dict(weight="E4M3", activation="E4M3", gradient="E7M0"),
                                     dict(scale_margin=2)], ids=["default", "fp32-gemm", "stochastic-forward",
                                                                 "E7M0-forward", "E7M0-gradient", "margin"])
def test_a_layer_on_native_streams_computes_what_the_python_route_computes(autocast, setting, monkeypatch):
    """Forward, backward and every stream's scale, over three steps (the guesses at work), with
    the native route taken wherever the configuration allows it (counted)."""
    import altgrad.quantization.linear as linear_module

    values = dict(weight="E4M3", activation="E4M3", gradient="E5M2") | setting
    margin = values.pop("scale_margin", 0)
    config = LinearQuantConfig(**values, scaling=ScalingConfig(margin=margin))
    linear, native_layer, python_layer = _layer_pair(config)
    python_casts = []
    real = linear_module.cast_operand
    monkeypatch.setattr(linear_module, "cast_operand", lambda x, *a, **k: python_casts.append(x.shape) or real(x, *a, **k))
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(3, 7, 48, generator=g) * 4 ** step
        grad_y = torch.randn(3, 7, 40, generator=g) * 1e-3
        python_casts.clear()
        mine = _forward_backward(native_layer, linear, x, grad_y, autocast)
        native_casts = list(python_casts)
        reference = _forward_backward(python_layer, linear, x, grad_y, autocast)
        for name, a, b in zip(("y", "grad x", "grad w", "grad b"), mine, reference):
            assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), (name, step)
        for operand in OPERANDS:
            assert native_layer.quantizers[operand].last_scale == python_layer.quantizers[operand].last_scale
        python_side = {operand for operand in OPERANDS if native_layer.quantizers[operand].native is None}
        assert len(native_casts) == len(python_side), (python_side, native_casts)  # the rest were cast in C++
    if setting == {}:
        assert python_side == set()


@needs_streams
def test_while_statistics_are_collected_python_casts_every_stream_and_records_them():
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")
    linear, layer, _ = _layer_pair(config)
    x, grad_y = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    for quantizer in layer.quantizers.values():
        quantizer.collecting = True
    _forward_backward(layer, linear, x, grad_y, autocast=True)
    assert all(len(q.stats) == 1 for q in layer.quantizers.values())
    assert layer.quantizers["activation"].alive is not None
    for quantizer in layer.quantizers.values():
        quantizer.collecting = False
    _forward_backward(layer, linear, x, grad_y, autocast=True)
    assert all(len(q.stats) == 1 for q in layer.quantizers.values())  # nothing recorded off the statistics step
    assert all(q.native.active for q in layer.quantizers.values())


@needs_streams
def test_the_gradient_stream_is_native_beside_a_python_forward():
    """Stochastic forward casts are Python's; the nearest gradient cast still runs in C++, and
    goes back to Python while the gradient stream collects statistics."""
    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2", rounding="stochastic")
    linear, layer, _ = _layer_pair(config)
    calls = []
    real = layer._cast_gradient
    layer._cast_gradient = lambda grad_y: calls.append(grad_y.shape) or real(grad_y)
    x, grad_y = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    _forward_backward(layer, linear, x, grad_y, autocast=True)
    assert calls == [] and layer.quantizers["gradient"].last_scale is not None
    layer.quantizers["gradient"].collecting = True
    _forward_backward(layer, linear, x, grad_y, autocast=True)
    assert calls == [(3, 7, 40)] and len(layer.quantizers["gradient"].stats) == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_layer_makes_its_own_native_streams(how):
    """A NativeStream holds a kernel address of its process: copies and pickles leave it out and
    make their own, with the last scale and the collecting switch carried over."""
    import pickle

    config = LinearQuantConfig(weight="E4M3", activation="E4M3", gradient="E5M2")
    linear, layer, _ = _layer_pair(config)
    x, grad_y = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    _forward_backward(layer, linear, x, grad_y, autocast=True)
    layer.quantizers["gradient"].collecting = True
    copied = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    for name, quantizer in layer.quantizers.items():
        other = copied.quantizers[name]
        assert other.last_scale == quantizer.last_scale and other.collecting == quantizer.collecting
        if quantizer.native is not None:
            assert other.native is not None and other.native is not quantizer.native
            assert other.native.active == quantizer.native.active
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(bits(copied(x)), bits(layer(x)))
