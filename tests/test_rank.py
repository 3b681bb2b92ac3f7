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


def test_rank_drops_warn_and_critical_layers_warn_first():
    model = model_with("master")
    monitor = RankMonitor(model, interval=1, threshold=0.3, critical_layers=("lm_head",), critical_multiplier=0.5)
    assert monitor.bound("lm_head") == pytest.approx(0.15) and monitor.bound("fc") == pytest.approx(0.3)
    start = {name: monitor.initial[name] for name in ("fc", "lm_head")}
    # a 20% drop of both: only the critical layer warns
    record = {"rank/effective/fc": 0.8 * start["fc"], "rank/effective/lm_head": 0.8 * start["lm_head"]}
    judged = monitor.alerts(record)
    assert judged["rank_drop/fc"] is None
    assert judged["rank_drop/lm_head"]["critical"] and "critical layer lm_head" in judged["rank_drop/lm_head"]["message"]
    judged = monitor.alerts({"rank/effective/fc": 0.6 * start["fc"]})  # 40%: beyond 30%
    assert judged["rank_drop/fc"] is not None and not judged["rank_drop/fc"]["critical"]
    assert "rank_drop/lm_head" not in judged  # not measured in this record: not judged
    state = monitor.state_dict()
    other = RankMonitor(model, 1, 0.3, ("lm_head",), 0.5)
    other.initial = {}
    other.load_state_dict(state)
    assert other.initial == monitor.initial


def test_a_collapsing_layer_warns_once_per_excursion_and_is_counted(tmp_path, tiny_data):
    config = resolve_config(None, dict(preset="tiny", data=str(tiny_data), runs_dir=str(tmp_path / "runs"),
                                       run_name="collapse", device="cpu", format="E5M2", max_steps=20,
                                       rank_interval=5))
    warnings = []
    trainer = Trainer(config, on_event=lambda kind, p: warnings.append(p) if kind == "warning" else None)
    build = trainer._build

    def build_then_damage():
        build()
        real_step = trainer.optimizer.step

        def step_and_collapse(*args, **kwargs):  # from step 8 on, c_proj of block 0 becomes rank 1
            out = real_step(*args, **kwargs)
            if trainer.counters["tokens"] >= 7 * config.tokens_per_step:
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
    assert summary["alerts"][name]["first_step"] == 10 and summary["alerts"][name]["count"] == 3  # steps 10, 15, 20
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
