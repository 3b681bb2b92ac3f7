"""Gradient clipping (training/clipping.py): the global rule is torch's; partition clipping bounds
each gradient-format partition by its format's range under the scale of its own history, on
constructed gradients with hand-computed factors, and end to end in a tiny run."""

import json
import math

import pytest
import torch

from altgrad.model import GPT, GPTConfig
from altgrad.model.surgery import build_policy, quantize_model
from altgrad.quantization.formats import get_format
from altgrad.training import Trainer
from altgrad.training.clipping import HIGH_PRECISION, GradientClipper
from altgrad.training.tracking import read_metrics
from runs import tiny_config

DEFAULTS = dict(rounding="nearest", grad_rounding="nearest", scaling="current", amax_history_len=4, scale_margin=0,
                power_of_two_scales=True, gemm_dtype="bf16", weight_storage="master", update_rounding="nearest",
                gradient="E5M2")


def model(rules):
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    quantize_model(net, build_policy(rules, DEFAULTS))
    return net


MIXED = [{"layers": "*.attn.*", "format": "E4M3"},                      # gradients E5M2
         {"layers": "*.mlp.*", "format": "E4M3", "gradient": "E4M3"},   # gradients E4M3
         {"layers": "lm_head", "format": "bf16"}]                       # high precision


def weights(net, pattern):
    return [m.weight for n, m in net.named_modules() if pattern in n and hasattr(m, "quantizers")]


def set_grads(net, value=0.01, generator_seed=1):
    generator = torch.Generator().manual_seed(generator_seed)
    for p in net.parameters():
        p.grad = (torch.rand(p.shape, generator=generator) * 2 - 1) * value


def grads(params):
    return [p.grad.clone() for p in params]


def range_top(fmt_name, amax, margin=0):
    """max / s with s the largest power of two with amax * s <= max (times 2^-margin), by hand."""
    fmt = get_format(fmt_name)
    k = math.floor(math.log2(fmt.max / amax))
    while amax * 2.0 ** (k + 1) <= fmt.max:
        k += 1
    while amax * 2.0**k > fmt.max:
        k -= 1
    return fmt.max / 2.0 ** (k - margin)


def test_global_mode_is_torchs_clip_grad_norm():
    a, b = model(MIXED), model(MIXED)
    set_grads(a, 1.0)
    set_grads(b, 1.0)
    norm, factors = GradientClipper(a, 1.0, "global")()
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert factors == {} and norm == float(expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def test_partitions_are_gradient_formats_and_the_rest_is_high_precision():
    net = model(MIXED)
    clipper = GradientClipper(net, 1.0, "partition")
    names = {p.name: p.params for p in clipper.partitions}
    assert set(names) == {"E5M2", "E4M3"}
    assert {id(p) for p in names["E5M2"]} == {id(p) for p in weights(net, ".attn.")}
    assert {id(p) for p in names["E4M3"]} == {id(p) for p in weights(net, ".mlp.")}
    owned = {id(p) for ps in names.values() for p in ps}
    assert {id(p) for p in clipper.plain} == {id(p) for p in net.parameters()} - owned  # biases, norms, tied head


def test_two_scale_policies_sharing_a_format_are_two_named_partitions():
    rules = [{"layers": "*.attn.*", "format": "E4M3"},
             {"layers": "*.mlp.*", "format": "E4M3", "scaling": "delayed"}]
    names = sorted(p.name for p in GradientClipper(model(rules), 1.0, "partition").partitions)
    assert names == ["E5M2/current", "E5M2/delayed4"]


def test_a_spike_is_cut_to_its_formats_range_under_the_scale_of_its_history_and_spares_the_others():
    net = model(MIXED)
    clipper = GradientClipper(net, 1.0, "partition")
    attn, mlp = weights(net, ".attn."), weights(net, ".mlp.")
    set_grads(net, 0.01)
    first_amax = max(float(p.grad.abs().max()) for p in attn)
    before = grads(net.parameters())
    _, factors = clipper()
    # the first step has no history: not clipped (the high-precision rest: norm far below 1)
    assert factors == {"E5M2": 1.0, "E4M3": 1.0, HIGH_PRECISION: 1.0}
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))

    set_grads(net, 0.01, generator_seed=2)
    attn[0].grad[0, 0] = 8 * first_amax  # a spike in one partition
    spike = 8 * first_amax
    attn_before, mlp_before = grads(attn), grads(mlp)
    _, factors = clipper()
    expected = range_top("E5M2", first_amax) / spike
    assert factors["E5M2"] == pytest.approx(expected, rel=1e-12)
    assert all(torch.equal(p.grad, g * factors["E5M2"]) for p, g in zip(attn, attn_before))
    assert factors["E4M3"] == 1.0 and all(torch.equal(p.grad, g) for p, g in zip(mlp, mlp_before))
    assert max(float(p.grad.abs().max()) for p in attn) == pytest.approx(range_top("E5M2", first_amax))


def test_grad_clip_is_the_bound_in_units_of_the_range_and_the_margin_widens_it():
    for grad_clip, margin in ((0.5, 0), (1.0, 2)):
        rules = [{"layers": "*.attn.*", "format": "E4M3", "scale_margin": margin}]
        net = model(rules)
        clipper = GradientClipper(net, grad_clip, "partition")
        attn = weights(net, ".attn.")
        set_grads(net, 0.01)
        first = max(float(p.grad.abs().max()) for p in attn)
        clipper()
        set_grads(net, 0.01, generator_seed=2)
        attn[0].grad[0, 0] = 64 * first
        _, factors = clipper()
        assert factors["E5M2"] == pytest.approx(grad_clip * range_top("E5M2", first, margin) / (64 * first))


def test_the_reference_is_the_largest_amax_of_the_window_and_old_spikes_leave_it():
    net = model([{"layers": "*.attn.*", "format": "E4M3", "scaling": "delayed", "amax_history_len": 2}])
    clipper = GradientClipper(net, 1.0, "partition")
    attn = weights(net, ".attn.")
    for step, size in enumerate((0.01, 1.0, 0.01, 0.5, 0.01, 0.01, 0.5)):
        set_grads(net, 0.01, generator_seed=step)
        attn[0].grad[0, 0] = size
        _, factors = clipper()
        if step == 1:  # a spike beyond the window [0.01]
            assert factors["E5M2"] == pytest.approx(range_top("E5M2", 0.01) / 1.0)
        elif step == 6:  # window: steps 4 and 5 (0.01 each); the spikes have left it
            assert factors["E5M2"] == pytest.approx(range_top("E5M2", 0.01) / 0.5)
        else:  # step 3: the window's largest (the raw spike of step 1, not its clipped value) covers 0.5
            assert factors["E5M2"] == 1.0
    assert clipper.partitions[0].history == pytest.approx([0.01, 0.5])


def test_unscaled_formats_are_bounded_by_their_absolute_range():
    net = model([{"layers": "*.attn.*", "format": "E4M3", "scaling": "none", "gradient": "E4M3"}])
    clipper = GradientClipper(net, 1.0, "partition")
    attn = weights(net, ".attn.")
    set_grads(net, 0.01)
    attn[0].grad[0, 0] = 896.0  # 2x E4M3's max: clipped from the first step, no history needed
    _, factors = clipper()
    assert factors["E4M3"] == 0.5


def test_non_finite_gradients_are_not_clipped_and_leave_the_history_alone():
    net = model(MIXED)
    clipper = GradientClipper(net, 1.0, "partition")
    attn = weights(net, ".attn.")
    set_grads(net, 0.01)
    clipper()
    history = list(clipper.partitions[0].history)
    set_grads(net, 0.01, generator_seed=2)
    attn[0].grad[0, 0] = float("nan")
    norm, factors = clipper()
    assert math.isnan(norm) and factors["E5M2"] == 1.0
    assert clipper.partitions[0].history == history


def test_the_returned_norm_is_the_global_norm_before_clipping_and_totals_count_clipped_steps():
    net = model(MIXED)
    clipper = GradientClipper(net, 1.0, "partition")
    set_grads(net, 0.01)
    clipper()
    set_grads(net, 5.0, generator_seed=2)  # everything 500x: every partition clipped
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))
    norm, factors = clipper()
    assert norm == pytest.approx(expected, rel=1e-6)
    assert all(f < 1 for f in factors.values())
    summary = clipper.summary()
    assert all(s["clipped_steps"] == 1 and s["min_factor"] == pytest.approx(factors[n]) for n, s in summary.items())
    copy = GradientClipper(model(MIXED), 1.0, "partition")
    copy.load_state_dict(clipper.state_dict())
    assert copy.summary() == summary and [p.history for p in copy.partitions] == [p.history for p in clipper.partitions]


def test_no_bound_means_no_clipping_in_either_mode():
    for mode in ("global", "partition"):
        net = model(MIXED)
        set_grads(net, 5.0)
        before = grads(net.parameters())
        norm, factors = GradientClipper(net, 0.0, mode)()
        assert factors == {} and norm == pytest.approx(float(torch.nn.utils.get_total_norm(before)), rel=1e-6)
        assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))


def test_a_partition_clipped_run_logs_its_factors_resumes_exactly_and_counts_in_the_summary(tmp_path, tiny_data):
    from runs import without_rates

    settings = dict(format="E4M3", grad_clip_mode="partition", max_steps=40, lr_decay_steps=40, lr=3e-2,
                    scaling="delayed")
    full = Trainer(tiny_config(tmp_path, tiny_data, run_name="full", **settings)).run()
    Trainer(tiny_config(tmp_path, tiny_data, run_name="split", **{**settings, "max_steps": 20})).run()
    resumed = Trainer(tiny_config(tmp_path, tiny_data, run_name="split", **settings), resume=True).run()
    records = read_metrics(full.run_dir)
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(records)
    logged = [r for r in records if "grad/clip_factor/E5M2" in r]
    assert logged and all(0 < r["grad/clip_factor/E5M2"] <= 1 for r in logged)
    assert all(f"grad/clip_factor/{HIGH_PRECISION}" in r for r in logged)
    summary = json.loads((full.run_dir / "summary.json").read_text())
    assert set(summary["clipping"]) == {"E5M2", HIGH_PRECISION}
    clipped = summary["clipping"]["E5M2"]["clipped_steps"]
    assert clipped == json.loads((resumed.run_dir / "summary.json").read_text())["clipping"]["E5M2"]["clipped_steps"]
    # the window's smallest factor is logged: the summary's smallest is among them
    assert summary["clipping"]["E5M2"]["min_factor"] == pytest.approx(min(r["grad/clip_factor/E5M2"] for r in logged))
