"""Emergency mantissa shift (training/shift.py): the neighbouring formats, the in-place reformat
of a layer, the triggers on constructed measurements, and constructed runs that overflow and
stall, shift, finish, say so everywhere and resume exactly."""

import json

import pytest
import torch

from altgrad.model import GPT, GPTConfig
from altgrad.model.surgery import build_policy, quantize_model, quantized_layers
from altgrad.optim import OptimizerSpec, build_optimizer
from altgrad.quantization.formats import REGISTRY, get_format
from altgrad.quantization.linear import LinearQuantConfig, QuantizedLinear
from altgrad.quantization.quantize import quantize
from altgrad.training import Trainer
from altgrad.training.checkpoint import list_checkpoints, load_checkpoint
from altgrad.training.shift import FormatShifter, describe, neighbour
from altgrad.training.tracking import read_metrics
from runs import tiny_config, without_rates

DEFAULTS = dict(rounding="nearest", grad_rounding="nearest", scaling="current", amax_history_len=4, scale_margin=0,
                power_of_two_scales=True, gemm_dtype="bf16", weight_storage="master", update_rounding="nearest",
                gradient="E5M2")
LAYER = "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("name, more, expected", [
    ("E3M4", "exponent", "E4M3"), ("E4M3", "exponent", "E5M2"), ("E5M2", "exponent", "E6M1"),
    ("E6M1", "exponent", "E7M0"), ("E7M0", "exponent", None), ("E0M7", "exponent", "E1M6"),
    ("E5M2", "mantissa", "E4M3"), ("E4M3", "mantissa", "E3M4"), ("E1M6", "mantissa", "E0M7"),
    ("E0M7", "mantissa", None), ("E3M4:bias=3", "exponent", "E4M3"), ("E2M1", "exponent", "E3M0"),
])
def test_the_neighbouring_format_is_the_registrys_of_that_shape(name, more, expected):
    found = neighbour(get_format(name), more)
    if expected is None:
        assert found is None
    else:
        assert found == get_format(expected) and (expected not in REGISTRY or found is REGISTRY[expected])


def layer(weight="E3M4", gradient="E5M2", seed=3):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    config = LinearQuantConfig(weight=weight, activation=weight, gradient=gradient, rounding="stochastic",
                               grad_rounding="stochastic")
    return QuantizedLinear.from_linear(linear, config, name="l", seed=seed)


def run_layer(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.ones_like(y) * 1e-3)
    return y.detach(), x.grad, module.weight.grad


def test_reformat_gives_the_layer_of_the_new_format_and_keeps_its_streams():
    x = torch.randn(4, 16)
    shifted = layer()
    generator = shifted.quantizers["activation"].generator
    run_layer(shifted, x)  # move the random streams forward
    fresh = layer(weight="E4M3", gradient="E6M1")
    run_layer(fresh, x)
    shifted.reformat(weight=get_format("E4M3"), activation=get_format("E4M3"), gradient=get_format("E6M1"))
    assert shifted.quantizers["activation"].generator is generator
    assert shifted.config.weight.name == "E4M3" and shifted.config.gradient.name == "E6M1"
    assert shifted.config.rounding == "stochastic" and shifted.weight_format.name == "E4M3"
    shifted.weight.grad = fresh.weight.grad = None
    for a, b in zip(run_layer(shifted, x), run_layer(fresh, x)):
        assert torch.equal(a, b)  # same formats, same streams, same place in them: the same layer
    with pytest.raises(ValueError, match="unknown operand"):
        shifted.reformat(bias=get_format("E4M3"))


def test_reformat_keeps_a_delayed_scalings_amax_history():
    config = LinearQuantConfig(weight="E3M4", activation="E3M4", gradient="E5M2",
                               scaling=__import__("altgrad.quantization.scaling", fromlist=["ScalingConfig"])
                               .ScalingConfig(mode="delayed", history_len=4))
    module = QuantizedLinear.from_linear(torch.nn.Linear(16, 8), config, name="l")
    run_layer(module, torch.randn(4, 16))
    history = module.quantizers["activation"].tracker.history.clone()
    module.reformat(activation=get_format("E4M3"))
    assert torch.equal(module.quantizers["activation"].tracker.history, history)
    assert module.quantizers["activation"].tracker.fmt.name == "E4M3"


def model_and_optimizer(storage="master", rounding="nearest", optimizer="adamw"):
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    quantize_model(net, build_policy([{"layers": "*", "format": "E3M4"}],
                                     {**DEFAULTS, "weight_storage": storage, "update_rounding": rounding}))
    return net, build_optimizer(net, OptimizerSpec(name=optimizer), seed=1)


def overflow(layer=LAYER, operand="activation", rate=0.5):
    return {f"quant/overflow_rate/{operand}/{layer}": rate}


def test_overflow_shifts_after_patience_measurements_in_a_row_and_only_then():
    net, optimizer = model_and_optimizer()
    shifter = FormatShifter(net, optimizer, patience=3, overflow_threshold=0.001, bit_stall_threshold=0.99)
    assert shifter.observe(10, overflow(), True) == []
    assert shifter.observe(11, {}, True) == []  # not measured: the streak neither grows nor breaks
    assert shifter.observe(20, overflow(), True) == []
    assert shifter.observe(30, overflow(rate=0.001), True) == []  # at the threshold: not above, breaks it
    assert shifter.observe(40, overflow(), True) == []
    assert shifter.observe(50, overflow(), True) == []
    events = shifter.observe(60, overflow(), True)
    assert len(events) == 1
    event = events[0]
    assert event["step"] == 60 and event["layer"] == LAYER and event["side"] == "forward" and event["shifted"]
    assert event["from"] == {"weight": "E3M4", "activation": "E3M4"} and event["to"] == {"weight": "E4M3",
                                                                                       "activation": "E4M3"}
    assert "activation overflow rate 0.5 > 0.001, 3 measurements in a row" in event["reason"]
    layer = quantized_layers(net)[LAYER]
    assert layer.config.weight.name == "E4M3" and layer.config.gradient.name == "E5M2"  # gradient separately
    assert all(m.config.weight.name == "E3M4" for n, m in quantized_layers(net).items() if n != LAYER)
    assert describe(event).startswith("h.0.attn.c_attn weight+activation E3M4 -> E4M3 (")
    assert shifter.observe(70, overflow(), True) == []  # the streak starts again after a shift


def test_gradient_overflow_shifts_the_gradient_alone():
    net, optimizer = model_and_optimizer()
    shifter = FormatShifter(net, optimizer, patience=1, overflow_threshold=0.001, bit_stall_threshold=0.99)
    (event,) = shifter.observe(10, overflow(operand="gradient"), True)
    assert event["side"] == "gradient" and event["from"] == {"gradient": "E5M2"} and event["to"] == {"gradient": "E6M1"}
    assert quantized_layers(net)[LAYER].config.weight.name == "E3M4"


def test_non_finite_weight_gradients_on_skipped_steps_shift_both_sides_of_that_layer():
    net, optimizer = model_and_optimizer()
    shifter = FormatShifter(net, optimizer, patience=2, overflow_threshold=0.001, bit_stall_threshold=0.99)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    quantized_layers(net)[LAYER].weight.grad[0, 0] = float("inf")
    assert shifter.observe(1, {}, applied=False) == []
    assert shifter.observe(2, {}, applied=True) == []  # an applied step breaks the streak
    assert shifter.observe(3, {}, applied=False) == []
    events = shifter.observe(4, {}, applied=False)
    assert {(e["layer"], e["side"]) for e in events} == {(LAYER, "forward"), (LAYER, "gradient")}
    assert all("non-finite weight gradient" in e["reason"] for e in events)


def test_bit_stall_shifts_stored_weights_to_one_more_mantissa_bit():
    net, optimizer = model_and_optimizer(storage="format", rounding="stochastic")
    shifter = FormatShifter(net, optimizer, patience=1, overflow_threshold=0.001, bit_stall_threshold=0.5)
    layer = quantized_layers(net)[LAYER]
    (event,) = shifter.observe(10, {f"quant/bit_stall_rate/{LAYER}": 0.9}, True)
    assert event["direction"] == "mantissa" and event["to"] == {"weight": "E2M5", "activation": "E2M5"}
    weight = optimizer.weight_of(layer.weight)
    assert weight.fmt.name == "E2M5" and layer.weight_format.name == "E2M5"
    scaled = layer.weight.detach() * weight.forward_scale()
    assert torch.equal(quantize(scaled, get_format("E2M5")), scaled)  # on the new grid


def test_a_shift_reprojects_a_stored_weight_onto_the_new_grid_with_its_scale():
    net, optimizer = model_and_optimizer(storage="format", rounding="nearest")
    shifter = FormatShifter(net, optimizer, patience=1, overflow_threshold=0.001, bit_stall_threshold=0.99)
    layer = quantized_layers(net)[LAYER]
    weight = optimizer.weight_of(layer.weight)
    before = layer.weight.detach().clone()
    shifter.observe(10, overflow(), True)  # E3M4 -> E4M3: one mantissa bit less, a real rounding
    scale = weight.forward_scale()
    assert weight.fmt.name == "E4M3"
    assert scale == float(torch.exp2(torch.floor(torch.log2(448.0 / before.abs().max()))))  # E4M3's amax scale
    assert torch.equal(layer.weight.detach() * scale, quantize(before * scale, get_format("E4M3")))
    assert not torch.equal(layer.weight.detach(), before)


def test_bit_stall_of_fp32_masters_costs_nothing_and_shifts_nothing():
    net, optimizer = model_and_optimizer()
    shifter = FormatShifter(net, optimizer, patience=1, overflow_threshold=0.001, bit_stall_threshold=0.5)
    assert shifter.observe(10, {f"quant/bit_stall_rate/{LAYER}": 1.0}, True) == []


def test_no_oscillation_and_an_impossible_shift_is_reported_once():
    net, optimizer = model_and_optimizer(storage="format", rounding="stochastic")
    shifter = FormatShifter(net, optimizer, patience=1, overflow_threshold=0.001, bit_stall_threshold=0.5)
    (up,) = shifter.observe(10, overflow(), True)  # E3M4 -> E4M3
    (back,) = shifter.observe(20, {f"quant/bit_stall_rate/{LAYER}": 0.9}, True)  # E4M3 -> E3M4: left already
    assert up["shifted"] and not back["shifted"] and back["to"] == {}
    assert "no format with one more mantissa bit than E4M3" in back["reason"]
    assert "cannot shift" in describe(back)
    assert shifter.observe(30, {f"quant/bit_stall_rate/{LAYER}": 0.9}, True) == []  # said once
    assert quantized_layers(net)[LAYER].config.weight.name == "E4M3"


def test_e7m0_has_no_wider_format():
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    quantize_model(net, build_policy([{"layers": "*", "format": "E7M0"}], DEFAULTS))
    shifter = FormatShifter(net, build_optimizer(net, OptimizerSpec()), 1, 0.001, 0.99)
    (event,) = shifter.observe(10, overflow(), True)
    assert not event["shifted"] and "one more exponent bit than E7M0" in event["reason"]


def overflowing(tmp_path, data, name, **overrides):
    """E3M4 scaled 8x too large (scale_margin -3): most activations saturate, every stats step."""
    settings = dict(format="E3M4", scale_margin=-3, format_shift=True, stats_interval=5, shift_patience=2)
    return tiny_config(tmp_path, data, run_name=name, **{**settings, **overrides})


def test_an_overflowing_run_shifts_finishes_and_says_so_everywhere(tmp_path, tiny_data):
    result = Trainer(overflowing(tmp_path, tiny_data, "overflow", max_steps=30)).run()
    assert result.status == "completed" and result.steps == 30
    assert result.format_shifts and all(e["step"] == 10 for e in result.format_shifts[:2])
    first = result.format_shifts[0]
    assert first["side"] == "forward" and first["from"]["weight"] == "E3M4" and first["to"]["weight"] == "E4M3"
    records = read_metrics(result.run_dir)
    logged = [e for r in records for e in r.get("format_shifts", [])]
    assert logged == result.format_shifts
    assert all(r["step"] == e["step"] for r in records for e in r.get("format_shifts", []))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["format_shifts"] == result.format_shifts
    head = summary["layers"]["lm_head"]
    assert head["formats_at_start"]["weight"] == "E3M4" and head["weight"] != "E3M4"


def test_a_run_without_format_shift_never_shifts(tmp_path, tiny_data):
    result = Trainer(overflowing(tmp_path, tiny_data, "off", max_steps=15, format_shift=False)).run()
    assert result.format_shifts == [] and all("format_shifts" not in r for r in read_metrics(result.run_dir))


def stalling(tmp_path, data, name, **overrides):
    """Arm B at E5M2: weights on the grid, round-to-nearest updates: most updates stall."""
    return tiny_config(tmp_path, data, run_name=name, format="E5M2", weight_storage="format",
                       update_rounding="nearest", format_shift=True, stats_interval=5, shift_patience=2,
                       bit_stall_threshold=0.5, **overrides)


def test_a_stalling_run_moves_its_stored_weights_to_one_more_mantissa_bit(tmp_path, tiny_data):
    result = Trainer(stalling(tmp_path, tiny_data, "stall", max_steps=20)).run()
    assert result.status == "completed"
    shifted = [e for e in result.format_shifts if e["shifted"]]
    assert shifted and all(e["direction"] == "mantissa" for e in shifted)
    first = {}
    for event in shifted:
        first.setdefault(event["layer"], event)
    assert all(e["from"]["weight"] == "E5M2" and e["to"]["weight"] == "E4M3" for e in first.values())
    state = load_checkpoint(list_checkpoints(result.run_dir)[-1])
    scales = state["optimizer"]["altgrad"]["weights"]
    for name, formats in result.layers.items():  # every stored weight is on its current grid at the end
        key = "transformer.wte.weight" if name == "lm_head" else f"{name}.weight"
        scaled = state["model"][key] * scales[name]["scale"]
        assert torch.equal(quantize(scaled, get_format(formats["weight"])), scaled)


@pytest.mark.parametrize("make", [overflowing, stalling])
def test_a_shifted_run_resumes_exactly_with_its_layers_formats(tmp_path, tiny_data, make):
    settings = dict(max_steps=40, lr_decay_steps=40)
    full = Trainer(make(tmp_path, tiny_data, "full", **settings)).run()
    assert any(e["step"] < 20 for e in full.format_shifts) and full.format_shifts
    Trainer(make(tmp_path, tiny_data, "split", **{**settings, "max_steps": 20})).run()
    resumed = Trainer(make(tmp_path, tiny_data, "split", **settings), resume=True).run()
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(read_metrics(full.run_dir))
    assert resumed.format_shifts == full.format_shifts
    a = load_checkpoint(list_checkpoints(full.run_dir)[-1])
    b = load_checkpoint(list_checkpoints(resumed.run_dir)[-1])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if torch.is_tensor(a["model"][k]))
    assert json.loads((full.run_dir / "summary.json").read_text())["layers"] == \
        json.loads((resumed.run_dir / "summary.json").read_text())["layers"]


def test_the_cli_flags_show_shifts_and_clipping_and_bad_modes_are_one_line(tmp_path, tiny_data):
    from typer.testing import CliRunner

    from altgrad.cli import app

    runner = CliRunner()
    config = tmp_path / "overflow.yaml"
    config.write_text("format: E3M4\nscale_margin: -3\nstats_interval: 5\nshift_patience: 2\n")
    result = runner.invoke(app, ["train", "--preset", "tiny", "-c", str(config), "--data", str(tiny_data),
                                 "--runs-dir", str(tmp_path / "runs"), "--max-steps", "15", "--format-shift",
                                 "--grad-clip-mode", "partition"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps at its width
    assert "step 10: format shift: h.0.attn.c_attn weight+activation E3M4 -> E4M3 (activation overflow" in text
    assert "│ format shift │ step 10: h.0.attn.c_attn weight+activation" in text  # the summary
    assert "clipped: E" in text
    bad = runner.invoke(app, ["train", "--preset", "tiny", "--grad-clip-mode", "layer"])
    assert bad.exit_code == 2 and "grad_clip_mode must be one of global, partition" in bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1


def test_a_gradient_shift_regroups_the_clipping_partitions_and_resumes_exactly(tmp_path, tiny_data):
    settings = dict(grad_clip_mode="partition", max_steps=40, lr_decay_steps=40)
    full = Trainer(overflowing(tmp_path, tiny_data, "full", **settings)).run()
    assert any(e["side"] == "gradient" and e["to"] == {"gradient": "E6M1"} for e in full.format_shifts)
    assert "E6M1" in full.clipping and "E5M2" in full.clipping
    records = read_metrics(full.run_dir)
    assert any("grad/clip_factor/E6M1" in r for r in records)
    Trainer(overflowing(tmp_path, tiny_data, "split", **{**settings, "max_steps": 20})).run()
    resumed = Trainer(overflowing(tmp_path, tiny_data, "split", **settings), resume=True).run()
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(records)
    assert resumed.clipping == full.clipping
