"""Intended vs realized relative update and the weight decay applied (monitors/updates.py), from
the optimizers' own step records: hand cases on constructed tensors, then tiny runs of the arms."""

import math

import pytest
import torch
from torch import nn

from altgrad.optim import (FormatWeight, GridOptim, OptimizerSpec, StepRecorder, StoredAdamW, build_optimizer,
                           plain_record)
from altgrad.quantization import get_format, quantize
from altgrad.training import Trainer
from altgrad.training.monitors import StepContext, UpdateMonitor
from altgrad.training.monitors.updates import METRICS, step_sizes
from altgrad.training.tracking import read_metrics
from runs import tiny_config
from test_optim import layer_model

SIZES = ("optim/rel_update_intended", "optim/rel_update_realized", "optim/decay_applied")


@pytest.fixture(autouse=True, params=["auto", "eager"])
def kernel(request, monkeypatch):
    monkeypatch.setenv("ALTGRAD_KERNEL", request.param)
    return request.param


def stored(values, fmt="E5M2", rounding="nearest"):
    param = nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())
    return FormatWeight("w", param, get_format(fmt), stored=True, update_rounding=rounding)


def recorded_step(optimizer, weight):
    """One step of ``optimizer`` with its record of ``weight``: (record, on-grid before, after)."""
    before = weight.param.detach().clone()
    recorder = StepRecorder(optimizer)
    recorder.start([weight.param])
    optimizer.step()
    record = recorder.finish()[id(weight.param)]
    assert not optimizer.recording and not optimizer.records  # one step only
    return record, before, weight.param.detach().clone()


def sign_adamw(weight, lr, wd):
    """StoredAdamW with betas (0, 0) and eps 0: its step is exactly -lr (sign(g) + wd w)."""
    return StoredAdamW([{"params": [weight.param], "lr": lr, "weight_decay": wd, "geometry": True}], [weight], 0,
                       betas=(0.0, 0.0), eps=0.0)


# ---- hand cases ---------------------------------------------------------------------------------------
def test_intended_and_realized_on_a_known_tensor():
    """E5M2 at scale 2^15 (amax 1): spacing 1/8 on [0.5, 1), 1/16 on [0.25, 0.5). A step of 0.1
    lands on a whole grid step of 0.125 for every element: realized / intended = 1.25."""
    weight = stored([1.0, 0.5, -0.25, 0.75])
    weight.param.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    record, before, after = recorded_step(sign_adamw(weight, lr=0.1, wd=0.0), weight)
    assert after.tolist() == [0.875, 0.625, -0.375, 0.875]  # 0.9, 0.6, -0.35, 0.85 to nearest
    rms_w = math.sqrt((1 + 0.25 + 0.0625 + 0.5625) / 4)
    step = float(torch.tensor(0.1))  # the float32 lr
    assert torch.equal(record.before, before) and torch.equal(record.delta, torch.tensor([-step, step, -step, step]))
    sizes = step_sizes(record, before, after)
    assert sizes["optim/rel_update_intended"] == pytest.approx(step / rms_w, rel=1e-12)
    assert sizes["optim/rel_update_realized"] == pytest.approx(0.125 / rms_w, rel=1e-12)
    assert sizes["optim/rel_update_realized"] / sizes["optim/rel_update_intended"] == pytest.approx(1.25, rel=1e-6)
    assert math.isnan(sizes["optim/decay_applied"])  # no weight decay: undefined, never 0


def test_round_to_nearest_loses_a_decay_below_half_a_grid_step():
    """w = 1, step -0.125 (one grid step, lands exactly) plus decay -0.0125: 0.8625 rounds to
    0.875 as 0.875 does: none of the decay landed."""
    weight = stored([1.0, 0.5, 0.75, -0.625])
    weight.param.grad = torch.tensor([1.0, 1.0, -1.0, 1.0])
    record, before, after = recorded_step(sign_adamw(weight, lr=0.125, wd=0.1), weight)
    assert after.tolist() == [0.875, 0.375, 0.875, -0.75]
    assert torch.allclose(record.decay, -0.0125 * before, rtol=1e-6, atol=0)
    assert torch.equal(record.decay_landed, torch.zeros(4))
    assert step_sizes(record, before, after)["optim/decay_applied"] == 0.0
    # a decay of more than half a step lands whole steps: 1.0 * 0.125 * 0.9 = 0.1125 of decay here,
    # so 1 - 0.125 - 0.1125 = 0.7625 rounds to 0.75 where 0.875 did not: one step 0.125 of 0.1125
    weight = stored([1.0, 0.5])
    weight.param.grad = torch.tensor([1.0, 0.0])
    record, before, after = recorded_step(sign_adamw(weight, lr=0.125, wd=0.9), weight)
    assert after[0] == 0.75 and float(record.decay_landed[0]) == -0.125


def test_stochastic_rounding_lands_the_decay_in_expectation():
    """Shared random bits: Q(y) - Q(y - d) is 0 or one grid step against the decay, with
    probability |d| / spacing (independent bits would also give a step the other way)."""
    values = torch.full((20000,), 0.75)
    values[0] = 1.0
    weight = stored(values, rounding="stochastic")
    weight.param.grad = torch.full((20000,), -1.0)  # a step of +0.03 off the grid, then decay 0.75 * 0.0075
    record, before, after = recorded_step(sign_adamw(weight, lr=0.03, wd=0.25), weight)
    applied = step_sizes(record, before, after)["optim/decay_applied"]
    landed = record.decay_landed[1:]
    assert set(landed.unique().tolist()) == {0.0, -0.125}  # spacing 1/8 on [0.5, 1)
    assert abs(applied - 1.0) < 0.15  # sd ~0.03 (binomial, p 0.045)


@pytest.mark.parametrize("spec", [OptimizerSpec("adamw"), OptimizerSpec("manifold"), OptimizerSpec("grid")],
                         ids=lambda s: s.name)
def test_masters_apply_exactly_all_of_their_decay(spec):
    """FP32 masters land nowhere (Q is the identity): decay_applied is 1.0 exactly, for torch's
    AdamW (arm A, by `plain_record`), ManifoldAdamW and GridOptim on masters (their own records)."""
    model = layer_model("E4M3", storage="master")
    optimizer = build_optimizer(model, spec)
    metrics = monitored_step(model, optimizer)
    assert metrics["optim/decay_applied/fc"] == 1.0 and metrics["optim/decay_applied"] == 1.0
    assert metrics["optim/rel_update_intended/fc"] > 0 and metrics["optim/rel_update_realized/fc"] >= 0


def test_torch_adamw_record_is_the_master_change_and_minus_lr_wd_w():
    param = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = torch.optim.AdamW([param], lr=0.01, weight_decay=0.5)
    param.grad = torch.tensor([1.0, 1.0, -1.0])
    recorder = StepRecorder(optimizer)
    recorder.start([param])
    before = param.detach().clone()
    optimizer.step()
    record = recorder.finish()[id(param)]
    assert torch.equal(record.delta, param.detach() - before)
    assert torch.equal(record.decay, before * -(0.01 * 0.5)) and torch.equal(record.decay_landed, record.decay)
    again = plain_record(optimizer.param_groups[0], before, param.detach())
    assert all(torch.equal(a, b) for a, b in zip(record, again))
    # and it is torch's step: AdamW's first step is lr sign(g) after the decay w (1 - lr wd)
    assert torch.allclose(param.detach(), before * (1 - 0.005) - 0.01 * torch.sign(param.grad), rtol=1e-6)


def test_grid_stored_intends_the_master_rule_from_its_start():
    """GridOptim's intended step on a stored weight is the continuous move of GridOptim on a master
    from the same (on-grid) start: the rule is defined once, and its landing is the only difference."""
    fmt = get_format("E4M3")
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(64, generator=generator) * 0.02
    start[0] = 0.1
    grad = torch.randn(64, generator=generator)
    scale = float(stored(start, "E4M3").scale)
    start = quantize(start * scale, fmt) / scale

    def step(is_stored):
        param = nn.Parameter(start.clone())
        weight = FormatWeight("w", param, fmt, stored=is_stored, update_rounding="stochastic")
        param.grad = grad.clone()
        optimizer = GridOptim([{"params": [param], "lr": 2.5, "weight_decay": 0.1, "geometry": True}], [weight], 0)
        return recorded_step(optimizer, weight)

    stored_record, _, stored_after = step(True)
    master_record, _, master_after = step(False)
    assert torch.equal(stored_record.delta, master_record.delta)
    assert torch.equal(stored_record.decay, master_record.decay) and bool((master_record.decay != 0).any())
    assert torch.equal(master_record.decay_landed, master_record.decay)
    assert not torch.equal(stored_after, master_after)  # the stored one landed on codes


# ---- the monitor on hand-built steps ------------------------------------------------------------------------
def monitored_step(model, optimizer, grads=None):
    monitor = UpdateMonitor(model, interval=1, optimizer=optimizer)
    model(torch.randn(2, 16))  # the forward cast sets a master weight's scale
    generator = torch.Generator().manual_seed(9)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-2 if grads is None else grads(p)
    ctx = StepContext(step=1, batches=[], grad_accum=1)
    monitor.before_update(ctx)
    optimizer.step()
    return monitor.after_update(ctx)


def test_the_monitor_reports_the_stored_step_sizes_by_their_definitions():
    model = layer_model("E5M2", storage="format", rounding="nearest")
    optimizer = build_optimizer(model, OptimizerSpec("adamw", lr=1e-3))
    layer = model.fc
    before = layer.weight.detach().clone()
    captured = {}
    real = optimizer.step

    def step():
        real()
        captured.update(optimizer.records)  # the record the monitor reads
    optimizer.step = step
    metrics = monitored_step(model, optimizer)
    record = captured[id(layer.weight)]
    after = layer.weight.detach()
    norm = lambda x: float(x.double().norm())  # noqa: E731
    assert metrics["optim/rel_update_intended/fc"] == pytest.approx(norm(record.delta) / norm(before), rel=1e-12)
    assert metrics["optim/rel_update_realized/fc"] == pytest.approx(
        norm(after.double() - before.double()) / norm(before), rel=1e-12)
    decay = record.decay.double()
    assert metrics["optim/decay_applied/fc"] == pytest.approx(
        float((record.decay_landed.double() * decay).sum() / (decay * decay).sum()), rel=1e-12)
    assert torch.allclose(record.decay, before * -1e-4, rtol=1e-6, atol=0)  # -lr wd w
    # arm B at lr 1e-3: AdamW's step (a few 1e-3 of |w|) mostly stays below half a grid step: less is realized
    assert 0 < metrics["optim/rel_update_realized/fc"] < metrics["optim/rel_update_intended/fc"] < 0.01
    assert metrics["optim/rel_update_realized"] == metrics["optim/rel_update_realized/fc"]  # one layer


@pytest.mark.parametrize("name", ["adamw", "manifold", "grid"])
def test_without_weight_decay_decay_applied_is_undefined(name):
    model = layer_model("E4M3", storage="format", rounding="stochastic")
    metrics = monitored_step(model, build_optimizer(model, OptimizerSpec(name, weight_decay=0.0)))
    assert math.isnan(metrics["optim/decay_applied/fc"]) and math.isnan(metrics["optim/decay_applied"])
    assert metrics["optim/rel_update_intended/fc"] > 0


def test_a_zero_weight_has_no_relative_update():
    model = layer_model("E4M3", storage="master")
    with torch.no_grad():
        model.fc.weight.zero_()
    metrics = monitored_step(model, build_optimizer(model, OptimizerSpec("adamw")))
    assert math.isnan(metrics["optim/rel_update_intended/fc"]) and math.isnan(metrics["optim/rel_update_realized/fc"])
    assert math.isnan(metrics["optim/decay_applied/fc"])  # decay of w = 0 is zero: undefined too


def test_every_size_is_registered():
    for key in SIZES:
        assert key in METRICS and f"{key}/<layer>" in METRICS


# ---- recording changes nothing ----------------------------------------------------------------------------
ARMS = {
    "adamw-sr": (OptimizerSpec("adamw"), "format", "stochastic"),
    "adamw-rtn": (OptimizerSpec("adamw"), "format", "nearest"),
    "manifold-sr": (OptimizerSpec("manifold", grid_lr=1.5), "format", "stochastic"),
    "manifold-master": (OptimizerSpec("manifold", grid_lr=1.5, grid_lr_unit="binade"), "master", "nearest"),
    "grid-sr": (OptimizerSpec("grid", grid_lr=3.0, rung_clip=2), "format", "stochastic"),
    "grid-rtn": (OptimizerSpec("grid", grid_lr=1.5), "format", "nearest"),
    "grid-master": (OptimizerSpec("grid", grid_lr=1.5), "master", "nearest"),
    "eco-rtn": (OptimizerSpec("eco", lr=0.3), "format", "nearest"),
    "adamw-rtn-kahan": (OptimizerSpec("adamw", lr=0.3, compensation="kahan"), "format", "nearest"),
    "manifold-sr-kahan": (OptimizerSpec("manifold", grid_lr=1.5, compensation="kahan"), "format", "stochastic"),
    "grid-sr-kahan": (OptimizerSpec("grid", grid_lr=0.7, compensation="kahan"), "format", "stochastic"),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_recorded_steps_are_bit_identical_to_unrecorded_ones(monkeypatch, arm):
    """A statistics step takes the torch code and records; the weights, moments, scales and
    random stream after it are exactly those of the (native, on CPU) step without a record, and
    so is w + delta before a stored weight's projection (the landing would hide small errors)."""
    from altgrad.optim.storage import FormatWeight as Weight

    spec, storage, rounding = ARMS[arm]
    real_project = Weight.project
    runs = []
    for record in (False, True):
        landing = []
        monkeypatch.setattr(Weight, "project", lambda self, *a, **k: landing.append(self.param.detach().clone())
                            or real_project(self, *a, **k))
        model = layer_model("E5M2", storage=storage, rounding=rounding, seed=4)
        optimizer = build_optimizer(model, spec, seed=7)
        landing.clear()  # the projection onto the grid at construction
        generator = torch.Generator().manual_seed(5)
        counts = []
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            recorder = StepRecorder(optimizer)
            if record:
                recorder.start([model.fc.weight])
            counts.append(optimizer.step())
            records = recorder.finish() if record else {}
            assert (id(model.fc.weight) in records) == record
        state = optimizer.state[model.fc.weight]
        runs.append((model.fc.weight.detach().clone(), state["exp_avg"].clone(), optimizer.generator.get_state(),
                     [(float(w.scale), int(w.rescales), None if w.compensation is None else w.compensation.tolist())
                      for w in optimizer.weights], counts, landing))
    (w0, m0, g0, s0, c0, y0), (w1, m1, g1, s1, c1, y1) = runs
    assert torch.equal(w0.view(torch.int32), w1.view(torch.int32)) and torch.equal(m0, m1)
    assert torch.equal(g0, g1) and s0 == s1 and c0 == c1
    assert len(y0) == len(y1) and all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(y0, y1))
    assert bool(y0) == (storage == "format" and spec.name != "grid")  # GridOptim lands by rungs, not by projection


# ---- tiny runs ---------------------------------------------------------------------------------------------
RUN_ARMS = {
    "A": dict(optimizer="adamw"),
    "C": dict(optimizer="adamw", weight_storage="format", update_rounding="stochastic"),
    "manifold-master": dict(optimizer="manifold", weight_storage="master"),
    "grid-master": dict(optimizer="grid", weight_storage="master"),
    "grid-stored": dict(optimizer="grid"),
}


@pytest.mark.parametrize("arm", list(RUN_ARMS))
def test_the_step_sizes_appear_in_a_tiny_run(tmp_path, tiny_data, arm, kernel):
    if kernel == "eager":
        pytest.skip("one path is enough for a run (both are tested bit for bit above)")
    config = tiny_config(tmp_path, tiny_data, run_name=arm, format="E5M2", max_steps=10, stats_interval=5,
                         **RUN_ARMS[arm])
    result = Trainer(config).run()
    assert result.status == "completed"
    records = [r for r in read_metrics(result.run_dir) if "optim/decay_applied" in r]
    assert [r["step"] for r in records] == [5, 10]
    layers = [k.removeprefix("optim/rel_update_intended/") for k in records[-1]
              if k.startswith("optim/rel_update_intended/")]
    assert len(layers) == 9
    for record in records:
        for key in SIZES:
            values = [record[f"{key}/{layer}"] for layer in layers]
            assert all(isinstance(v, float) and math.isfinite(v) for v in values), (key, values)
            assert record[key] == pytest.approx(sum(values) / len(values), rel=1e-12)  # the mean over layers
        assert record["optim/rel_update_intended"] > 0 and record["optim/rel_update_realized"] > 0
        if arm in ("A", "manifold-master", "grid-master"):
            assert all(record[f"optim/decay_applied/{layer}"] == 1.0 for layer in layers)
