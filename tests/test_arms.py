"""The five arms of DESIGN §4 in real (tiny) training runs: they learn, resume exactly, are
named apart, and arm B stalls where arm C does not; plus the update diagnostics end to end."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.errors import UserError
from altgrad.training import Trainer, resolve_config
from altgrad.training.checkpoint import list_checkpoints, load_checkpoint
from altgrad.training.config import read_yaml
from altgrad.training.tracking import read_metrics
from runs import tiny_config, without_rates

runner = CliRunner()
CONFIGS = Path(__file__).parent.parent / "configs"

ARMS = {
    "A": dict(optimizer="adamw"),
    "B": dict(optimizer="adamw", weight_storage="format", update_rounding="nearest"),
    "C": dict(optimizer="adamw", weight_storage="format", update_rounding="stochastic"),
    "D": dict(optimizer="manifold"),
    "D-master": dict(optimizer="manifold", weight_storage="master"),
    "E": dict(optimizer="grid"),
    "E-master": dict(optimizer="grid", weight_storage="master"),
    "ECO": dict(optimizer="eco"),  # stored, round to nearest, error feedback into the momentum
    "C-kahan": dict(optimizer="adamw", weight_storage="format", compensation="kahan"),  # nearest + Kahan's buffer
}


def config(tmp_path, data, name=None, **overrides):
    return tiny_config(tmp_path, data, **{"run_name": name, "format": "E5M2", "stats_interval": 5, **overrides})


@pytest.fixture(scope="module")
def arm_runs(tmp_path_factory, tiny_data):
    """Every arm at E5M2 on the same seed, 60 tiny steps."""
    root = tmp_path_factory.mktemp("arms")
    return {arm: Trainer(config(root, tiny_data, **settings)).run() for arm, settings in ARMS.items()}


def val_losses(result):
    return [r["val_loss"] for r in read_metrics(result.run_dir) if "val_loss" in r]


@pytest.mark.parametrize("arm", [a for a in ARMS if a != "B"])
def test_every_arm_that_can_learn_does(arm_runs, arm):
    result = arm_runs[arm]
    assert result.status == "completed"
    losses = val_losses(result)
    assert losses[-1] < 0.75 * losses[0], losses


def test_round_to_nearest_storage_stalls_where_stochastic_rounding_does_not(arm_runs):
    """Arm B at E5M2 freezes most weights (AdamW steps are below half a grid step there); arm C,
    same seed and batches, moves them on average. Measured: val 3.93 vs 2.75, stall 0.997 vs 0.92."""
    b, c = arm_runs["B"], arm_runs["C"]
    assert b.final_val_loss > c.final_val_loss + 0.3
    stall = {arm: [r["optim/stall_ratio"] for r in read_metrics(arm_runs[arm].run_dir) if "optim/stall_ratio" in r]
             for arm in ("B", "C")}
    assert sum(stall["B"]) / len(stall["B"]) > sum(stall["C"]) / len(stall["C"]) + 0.03


def test_default_names_carry_the_arm_and_never_collide(arm_runs):
    names = [result.run_dir.name for result in arm_runs.values()]
    assert len(set(names)) == len(names)
    assert names == ["tiny-e5m2-seed1337", "tiny-e5m2-adamw-rtn-seed1337", "tiny-e5m2-adamw-sr-seed1337",
                     "tiny-e5m2-manifold-sr-seed1337", "tiny-e5m2-manifold-master-seed1337",
                     "tiny-e5m2-grid-sr-seed1337", "tiny-e5m2-grid-master-seed1337", "tiny-e5m2-eco-rtn-seed1337",
                     "tiny-e5m2-adamw-rtn-kahan-seed1337"]


def test_stored_weights_are_on_their_grid_in_every_checkpoint(arm_runs):
    from altgrad.quantization import get_format

    grid = torch.tensor(get_format("E5M2").grid(torch.float64).numpy())
    for arm in ("B", "C", "D", "E", "ECO", "C-kahan"):
        state = load_checkpoint(list_checkpoints(arm_runs[arm].run_dir)[-1])
        scales = state["optimizer"]["altgrad"]["weights"]
        assert set(scales) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                               "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
                               "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
                               "transformer.h.1.mlp.c_proj", "lm_head"}
        for name, saved in scales.items():
            key = "transformer.wte.weight" if name == "lm_head" else f"{name}.weight"  # tied: stored once
            scaled = state["model"][key].double() * float(saved["scale"])
            assert bool(torch.isin(scaled, grid).all()), (arm, name)


def test_update_diagnostics_follow_the_definitions(arm_runs):
    records = [r for r in read_metrics(arm_runs["C"].run_dir) if "optim/stall_ratio" in r]
    record = records[-1]
    layers = [k.removeprefix("optim/stall_ratio/") for k in record if k.startswith("optim/stall_ratio/")]
    assert len(layers) == 9
    for layer in layers:
        updates, flips = record[f"optim/updates/{layer}"], record[f"optim/flips/{layer}"]
        assert record[f"optim/stall_ratio/{layer}"] == pytest.approx(1 - flips / updates)
        assert 0 <= record[f"quant/bit_stall_rate/{layer}"] <= 1
        assert record[f"bit_position/std/{layer}"] > 0
    # the headline is the mean over layers; the element-weighted rate carries its own name
    assert record["optim/stall_ratio"] == pytest.approx(
        sum(record[f"optim/stall_ratio/{layer}"] for layer in layers) / len(layers))
    assert record["optim/stall_ratio_elementwise"] != pytest.approx(record["optim/stall_ratio"])
    assert isinstance(record["optim/rescales"], int)
    summary = json.loads((arm_runs["C"].run_dir / "summary.json").read_text())
    head = summary["layers"]["lm_head"]
    assert head["storage"] == "format (stochastic)" and head["optimizer"] == "adamw"
    assert head["updates"] == sum(r["optim/updates/lm_head"] for r in records)
    assert head["stall_ratio"] == pytest.approx(1 - head["flips"] / head["updates"])
    assert summary["arm"] == "adamw-sr"


def test_error_feedback_and_compensation_recover_what_round_to_nearest_loses(arm_runs):
    """The same stored grid and rounding as arm B (nearest): ECO's feedback and Kahan's buffer
    each recover a large part of B's loss to stalling. Measured at tiny, one seed: B 4.08,
    ECO 3.67, C-kahan 3.30, C (stochastic rounding) 3.30."""
    b = arm_runs["B"].final_val_loss
    assert arm_runs["ECO"].final_val_loss < b - 0.25
    assert arm_runs["C-kahan"].final_val_loss < b - 0.5
    assert abs(arm_runs["C-kahan"].final_val_loss - arm_runs["C"].final_val_loss) < 0.2


@pytest.mark.parametrize("arm", ["B", "C", "D", "D-master", "E", "E-master", "ECO", "C-kahan"])
def test_resume_after_a_kill_is_exact_for_every_arm(tmp_path, tiny_data, arm):
    settings = dict(ARMS[arm], max_steps=40, lr_decay_steps=40, dropout=0.1)
    full = Trainer(config(tmp_path, tiny_data, "full", **settings)).run()
    Trainer(config(tmp_path, tiny_data, "split", **{**settings, "max_steps": 20})).run()
    resumed = Trainer(config(tmp_path, tiny_data, "split", **settings), resume=True).run()
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(read_metrics(full.run_dir))
    a = load_checkpoint(list_checkpoints(full.run_dir)[-1])
    b = load_checkpoint(list_checkpoints(resumed.run_dir)[-1])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if torch.is_tensor(a["model"][k]))
    assert a["optimizer"]["altgrad"]["generator"].equal(b["optimizer"]["altgrad"]["generator"])
    full_summary = json.loads((full.run_dir / "summary.json").read_text())
    resumed_summary = json.loads((resumed.run_dir / "summary.json").read_text())
    assert full_summary["layers"] == resumed_summary["layers"]  # the monitors' totals resume too


def test_no_updates_leave_the_stall_ratio_undefined(tmp_path, tiny_data):
    """A layer whose gradients are all zero has no updates: its stall ratio is NaN (never 0),
    its update rate 0; weight decay still moves its stored weights, and those flips count."""
    trainer = Trainer(config(tmp_path, tiny_data, "frozen", max_steps=5, stats_interval=5, weight_storage="format",
                             update_rounding="stochastic"))
    real = trainer._forward_backward

    def zero_one_layer(batches):
        loss = real(batches)
        trainer.model.transformer.h[0].mlp.c_fc.weight.grad.zero_()
        return loss

    trainer._forward_backward = zero_one_layer
    trainer.run()
    record = [r for r in read_metrics(trainer.run_dir) if "optim/stall_ratio" in r][-1]
    layer = "transformer.h.0.mlp.c_fc"
    assert record[f"optim/stall_ratio/{layer}"] == "nan" and record[f"quant/bit_stall_rate/{layer}"] == "nan"
    assert record[f"optim/update_rate/{layer}"] == 0.0 and record[f"optim/updates/{layer}"] == 0
    assert record[f"optim/flips/{layer}"] > 0  # Adam's momentum and weight decay moved weights without a gradient
    assert math.isfinite(record["optim/stall_ratio"])  # the NaN layer is left out of the mean, not read as 0


def test_arm_configs_compose_on_the_baseline():
    a = read_yaml(CONFIGS / "arms" / "a_adamw.yaml")
    baseline = read_yaml(CONFIGS / "bf16_baseline.yaml")
    assert {k: v for k, v in a.items() if k in baseline and k != "run_name"} == \
        {k: v for k, v in baseline.items() if k != "run_name"}
    names = set()
    for path in sorted((CONFIGS / "arms").glob("*.yaml")):
        resolved = resolve_config(path, {"format": "E3M4"})
        names.add(resolved.name)
        assert resolved.format == "E3M4" and resolved.use_shadow and resolved.seed == 1337
    assert names == {"small-e3m4-seed1337", "small-e3m4-adamw-rtn-seed1337", "small-e3m4-adamw-sr-seed1337",
                     "small-e3m4-manifold-sr-seed1337", "small-e3m4-grid-sr-seed1337",
                     "small-e3m4-manifold-master-seed1337", "small-e3m4-grid-master-seed1337",
                     "small-e3m4-eco-rtn-seed1337", "small-e3m4-adamw-rtn-kahan-seed1337"}


def test_a_config_cannot_include_itself(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml not found .base of"):
        read_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "grid", "--grid-lr-unit", "octave"], "grid_lr_unit must be one of ulp, binade"),
    (["--min-lr-ratio", "2"], "need 0 <= min_lr_ratio <= 1"),
    (["--optimizer", "manifold", "--format", "bf16"], "optimizer manifold moves weights on a format's grid"),
    (["--weight-storage", "format", "--format", "bf16"], "weight_storage format needs a weight format"),
    (["--optimizer", "sgd"], "optimizer must be one of adamw, manifold, grid"),
    (["--update-rounding", "up"], "update_rounding must be one of nearest, stochastic"),
])
def test_impossible_arms_are_one_line_errors(tmp_path, tiny_data, args, message):
    base = ["train", "--preset", "tiny", "--data", str(tiny_data), "--runs-dir", str(tmp_path / "runs"),
            "--format", "E5M2"]
    result = runner.invoke(app, [*base, *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_train_cli_runs_the_geometry_arms_and_prints_the_update_table(tmp_path, tiny_data):
    common = ["train", "--preset", "tiny", "--data", str(tiny_data), "--runs-dir", str(tmp_path / "runs"),
              "--max-steps", "10", "--format", "E5M2", "--stats-interval", "5"]
    manifold = runner.invoke(app, [*common, "--optimizer", "manifold"], env={"COLUMNS": "200"})
    assert manifold.exit_code == 0, manifold.output
    assert "tiny-e5m2-manifold-sr-seed1337" in manifold.output
    assert "weights on the grid" in manifold.output and "stall ratio" in manifold.output
    grid = runner.invoke(app, [*common, "--optimizer", "grid", "--grid-lr", "1.0"], env={"COLUMNS": "200"})
    assert grid.exit_code == 0, grid.output
    stored = runner.invoke(app, [*common, "--weight-storage", "format", "--update-rounding", "nearest"],
                           env={"COLUMNS": "200"})
    assert stored.exit_code == 0 and "tiny-e5m2-adamw-rtn-seed1337" in stored.output
    saved = read_yaml(tmp_path / "runs" / "tiny-e5m2-grid-sr-seed1337" / "config.yaml")
    assert saved["optimizer"] == "grid" and saved["weight_storage"] == "format" and saved["grid_lr"] == 1.0


def test_a_checkpoint_from_before_the_optimizer_factory_resumes(tmp_path, tiny_data):
    """Runs killed before this version saved AdamW groups without ``base_lr`` and one monitor state."""
    cfg = config(tmp_path, tiny_data, "old", format=None, max_steps=20)
    Trainer(dataclasses.replace(cfg, max_steps=10)).run()
    path = list_checkpoints(tmp_path / "runs" / "old")[-1]
    state = load_checkpoint(path)
    for group in state["optimizer"]["param_groups"]:
        del group["base_lr"]
    state["monitor"] = state.pop("monitors")["quant"]
    torch.save(state, path)
    resumed = Trainer(cfg, resume=True).run()
    assert resumed.status == "completed" and resumed.steps == 20


@pytest.mark.parametrize("fmt", ["e1m6", "e0m7"])
def test_post_layernorm_policies_ship_as_configs(tmp_path, tiny_data, fmt):
    config = resolve_config(CONFIGS / f"post_ln_{fmt}.yaml", dict(preset="tiny", data=str(tiny_data), max_steps=4,
                                                                   runs_dir=str(tmp_path / "runs"), device="cpu",
                                                                   use_shadow=False))
    result = Trainer(config).run()
    assert result.status == "completed"
    layers = json.loads((result.run_dir / "summary.json").read_text())["layers"]
    assert layers["transformer.h.0.attn.c_attn"]["activation"] == fmt.upper()
    assert layers["transformer.h.1.mlp.c_fc"]["weight"] == "high precision"
    assert layers["transformer.h.0.attn.c_proj"]["activation"] == "high precision"  # not a LayerNorm output


def test_the_arm_name_follows_per_rule_storage():
    stored = resolve_config(None, dict(preset="tiny", policy=[{"layers": "*", "format": "E5M2",
                                                                "weight_storage": "format"}]))
    assert stored.arm == "adamw-rtn" and stored.name == "tiny-mixed-adamw-rtn-seed1337"
    mixed = resolve_config(None, dict(preset="tiny", optimizer="manifold", policy=[
        {"layers": "lm_head", "format": "E5M2", "weight_storage": "master"}, {"layers": "*", "format": "E5M2"}]))
    assert mixed.arm == "manifold-mixed"
