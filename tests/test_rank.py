"""Rank health: the measures on constructed matrices, the weight they are taken on, and the
warnings (critical layers first) in a real run."""

import json
import math

import pytest
import torch
from torch import nn

from altgrad.model.surgery import build_policy, quantize_model
from altgrad.optim import OptimizerSpec, build_optimizer
from altgrad.quantization import get_format, quantize
from altgrad.training import Trainer, resolve_config
from altgrad.training.monitors import RankMonitor
from altgrad.training.monitors.rank import forward_weight, rank_measures
from altgrad.training.tracking import read_metrics


def test_rank_measures_on_constructed_matrices():
    identity = rank_measures(torch.eye(8))
    assert identity["stable"] == pytest.approx(8) and identity["effective"] == pytest.approx(8)
    assert identity["spectral_norm"] == pytest.approx(1)
    one = rank_measures(torch.outer(torch.arange(1.0, 5.0), torch.ones(3)))
    assert one["stable"] == pytest.approx(1) and one["effective"] == pytest.approx(1, abs=1e-5)
    two = rank_measures(torch.diag(torch.tensor([3.0, 1.0, 0.0])))
    assert two["stable"] == pytest.approx(10 / 9) and two["spectral_norm"] == pytest.approx(3)
    assert two["effective"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    zero = rank_measures(torch.zeros(4, 4))
    assert math.isnan(zero["effective"]) and math.isnan(zero["stable"])  # undefined, never 0


def model_with(storage, fmt="E3M4", seed=0, **settings):
    """fc in ``fmt`` (``settings``: the policy's defaults changed), lm_head in high precision."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(32, 16))
    model.add_module("lm_head", nn.Linear(16, 32))
    defaults = dict(rounding="nearest", grad_rounding="nearest", scaling="current", amax_history_len=4,
                    scale_margin=0, power_of_two_scales=True, gemm_dtype="bf16", gradient="E5M2",
                    weight_storage=storage, update_rounding="nearest") | settings
    quantize_model(model, build_policy([{"layers": "fc", "format": fmt}], defaults))
    build_optimizer(model, OptimizerSpec("adamw"))
    return model


@pytest.mark.parametrize("storage", ["master", "format"])
def test_ranks_are_taken_on_the_weight_the_forward_pass_uses(storage):
    model = model_with(storage)
    weight = forward_weight(model.fc)
    scale = float(model.fc.weight_scale) if storage == "format" else float(
        2.0 ** math.floor(math.log2(124 / float(model.fc.weight.detach().abs().max()))))
    assert torch.equal(weight, quantize(model.fc.weight.detach() * scale, get_format("E3M4")) / scale)
    assert torch.equal(forward_weight(model.lm_head), model.lm_head.weight.detach())  # high precision: as is


def test_a_stochastic_forward_weight_rounds_with_the_runs_random_bits():
    """The rank (and bit-stall) measurement casts a master weight as the run does: its stochastic
    rounding with its sr_bits (one fixed draw, seed 0)."""
    model = model_with("master", rounding="stochastic", sr_bits=1)
    weight = model.fc.weight.detach()
    scale = 2.0 ** math.floor(math.log2(124 / float(weight.abs().max())))  # E3M4 max 124

    def cast(bits):
        return quantize(weight * scale, get_format("E3M4"), rounding="stochastic",
                        generator=torch.Generator().manual_seed(0), sr_bits=bits) / scale
    assert torch.equal(forward_weight(model.fc), cast(1)) and not torch.equal(cast(1), cast(None))


def test_rank_drops_are_measured_against_the_windows_highest_and_critical_layers_warn_first():
    model = model_with("master")
    monitor = RankMonitor(model, interval=1, threshold=0.25, critical_layers=("lm_head",), critical_multiplier=0.5,
                          window=100, settle=50)
    assert monitor.bound("lm_head") == 0.125 and monitor.bound("fc") == 0.25
    assert (monitor.window, monitor.settle) == (100, 100)  # judged from the end of the first window at the earliest

    def judge(step, fc, lm_head=None):
        ranks = {"fc": fc} if lm_head is None else {"fc": fc, "lm_head": lm_head}
        monitor.observe(step, ranks)
        return monitor.alerts({"step": step, **{f"rank/effective/{k}": v for k, v in ranks.items()}})

    # the early phase: a fall of 60% from step 0 (healthy runs leave their initial rank) is not judged
    assert judge(90, 0.4 * monitor.initial["fc"], 0.4 * monitor.initial["lm_head"]) == {}
    assert monitor.history == []
    assert judge(100, 64.0, 64.0) == {"rank_drop/fc": None, "rank_drop/lm_head": None}
    # 20% below the window's highest: only the critical layer warns
    judged = judge(150, 51.2, 51.2)
    assert judged["rank_drop/fc"] is None
    assert judged["rank_drop/lm_head"]["critical"] and "critical layer lm_head" in judged["rank_drop/lm_head"]["message"]
    assert "below its highest 64.0 of the last 100 steps (threshold 12%)" in judged["rank_drop/lm_head"]["message"]
    # exactly at the bound is no warning (strictly beyond): 48 is 25% below 64, 47.9 beyond
    assert judge(160, 48.0)["rank_drop/fc"] is None
    assert judge(170, 47.9)["rank_drop/fc"]["value"] == 47.9 and "rank_drop/lm_head" not in judge(171, 48.0)
    # step 100's 64 leaves the window at step 201: the reference is then 51.2 (step 150), 48 is 6% below it
    assert monitor.reference("fc", 200) == 64.0 and monitor.reference("fc", 201) == 51.2
    assert judge(201, 48.0)["rank_drop/fc"] is None
    # a slow decline (5% a window) never warns, however far it goes in all
    slow = RankMonitor(model, 1, 0.25, ("lm_head",), 0.5, window=100)
    value, warned = 100.0, []
    for step in range(100, 2001, 100):
        slow.observe(step, {"fc": value})
        warned.append(slow.alerts({"step": step, "rank/effective/fc": value})["rank_drop/fc"])
        value *= 0.95
    assert warned == [None] * len(warned) and value < 40  # 63% below where it started
    state = monitor.state_dict()
    other = RankMonitor(model, 1, 0.25, ("lm_head",), 0.5, window=100, settle=50)
    other.initial = {}
    other.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint keeps it
    assert other.initial == monitor.initial and other.history == monitor.history
    assert other.alerts({"step": 202, "rank/effective/fc": 30.0}) == monitor.alerts({"step": 202,
                                                                                     "rank/effective/fc": 30.0})
    assert other.alerts({"step": 202, "rank/effective/fc": 30.0})["rank_drop/fc"] is not None
    older = RankMonitor(model, 1, 0.25, ("lm_head",), 0.5, window=100)
    older.load_state_dict({"initial": dict(monitor.initial)})  # a checkpoint from before the window
    assert older.history == []


def test_a_collapsing_layer_warns_once_per_excursion_and_is_counted(tmp_path, tiny_data):
    config = resolve_config(None, dict(preset="tiny", data=str(tiny_data), runs_dir=str(tmp_path / "runs"),
                                       run_name="collapse", device="cpu", format="E5M2", max_steps=20,
                                       rank_interval=5, rank_window=0.5))  # a window of 10 steps, from step 10
    warnings = []
    trainer = Trainer(config, on_event=lambda kind, p: warnings.append(p) if kind == "warning" else None)
    build = trainer._build

    def build_then_damage():
        build()
        real_step = trainer.optimizer.step

        def step_and_collapse(*args, **kwargs):  # from step 12 on, c_proj of block 0 becomes rank 1
            out = real_step(*args, **kwargs)
            if trainer.counters["tokens"] >= 11 * config.tokens_per_step:
                with torch.no_grad():
                    w = trainer.model.transformer.h[0].attn.c_proj.weight
                    w.copy_(torch.outer(w[:, 0], torch.ones(w.shape[1])))
            return out

        trainer.optimizer.step = step_and_collapse

    trainer._build = build_then_damage
    result = trainer.run()
    name = "rank_drop/transformer.h.0.attn.c_proj"
    rank_warnings = [w for w in warnings if "h.0.attn.c_proj: effective rank" in w["message"]]
    assert len(rank_warnings) == 1 and rank_warnings[0]["critical"]  # once per excursion, marked critical
    summary = json.loads((result.run_dir / "summary.json").read_text())
    # steps 15 and 20, against step 10's rank in the window (judged from step 10, the end of the first window)
    assert summary["alerts"][name]["first_step"] == 15 and summary["alerts"][name]["count"] == 2
    assert summary["alerts"][name]["critical"] is True
    record = next(r for r in read_metrics(result.run_dir) if r["step"] == 5)
    for key in ("rank/stable/lm_head", "rank/effective/transformer.h.1.mlp.c_fc", "rank/spectral_norm/lm_head",
                "rank/effective"):
        assert key in record


def test_the_update_monitors_grid_of_a_master_weight_rounds_with_the_runs_random_bits():
    from altgrad.training.monitors.updates import _scaled_grid

    model = model_with("master", "E4M3", seed=1, rounding="stochastic", sr_bits=2)
    weight, scale = model.fc.weight.detach(), 1024.0

    def cast(bits):
        return quantize(weight * scale, get_format("E4M3"), rounding="stochastic",
                        generator=torch.Generator().manual_seed(7), sr_bits=bits)
    assert torch.equal(_scaled_grid(model.fc, scale, 7), cast(2)) and not torch.equal(cast(2), cast(None))
