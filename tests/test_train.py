"""The baseline trainer on the tiny preset: learning, determinism, resume, failures."""

import dataclasses
import json
import os
import signal
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.data.loader import TokenBatches
from altgrad.errors import UserError
from altgrad.provenance import code_version
from altgrad.training import Trainer, resolve_config, resume_config
from altgrad.training.checkpoint import list_checkpoints, load_checkpoint
from altgrad.training.tracking import read_metrics
from runs import tiny_config as base_config
from runs import without_rates

runner = CliRunner()


def tiny_config(tmp_path, data, **overrides):
    return base_config(tmp_path, data, **{"run_name": "run", **overrides})


def test_tiny_run_learns_and_writes_its_run_folder(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, precision="fp32")
    result = Trainer(config).run()
    assert result.status == "completed" and result.steps == config.max_steps
    records = read_metrics(result.run_dir)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] > math.log(200)  # starts near uniform over 257 byte tokens
    assert val[-1] < 0.6 * val[0]  # and learns the corpus
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in records if r["step"] > 0)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert summary["final_val_loss"] == val[-1] and summary["best_val_loss"] == min(val)
    assert summary["tokens"] == 60 * config.tokens_per_step
    assert summary["code"] == code_version() and summary["code"]["torch"] == torch.__version__  # what made it
    assert summary["code"]["altgrad"] and summary["code"]["python"] and summary["device"] == "cpu"
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["precision"] == "fp32" and saved["n_embd"] == 32
    assert "code" not in saved  # the config only: a resume or a comparison never sees the code version
    assert len(list_checkpoints(result.run_dir)) == config.keep_checkpoints


def test_bf16_autocast_is_active_on_cpu(tmp_path, tiny_data):
    seen = []
    trainer = Trainer(tiny_config(tmp_path, tiny_data, precision="bf16", max_steps=1))
    original = trainer._build

    def build_and_hook():
        original()
        trainer.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    trainer._build = build_and_hook
    trainer.run()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


def test_same_seed_gives_same_batches_and_weights(tmp_path, tiny_data):
    a = TokenBatches(tiny_data, 32, 4, seed=1, device=torch.device("cpu"))
    b = TokenBatches(tiny_data, 32, 4, seed=1, device=torch.device("cpu"))
    c = TokenBatches(tiny_data, 32, 4, seed=2, device=torch.device("cpu"))
    assert torch.equal(a.train_batch(7)[0], b.train_batch(7)[0])
    assert not torch.equal(a.train_batch(7)[0], a.train_batch(8)[0])
    assert not torch.equal(a.train_batch(7)[0], c.train_batch(7)[0])
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a.val_batches(3), c.val_batches(3)))
    # fp32 and bf16 runs with one seed start from the same weights
    states = []
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(tmp_path, tiny_data, precision=precision, run_name=precision, max_steps=1))
        trainer._build()
        states.append(trainer.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class Killed(Exception):
    """Stands for SIGKILL: no handler runs, nothing is saved."""


def _stop_at(step, exception):
    def on_event(kind, payload):
        if kind == "log" and payload["step"] == step:
            raise exception

    return on_event


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, tiny_data, precision):
    config = tiny_config(tmp_path, tiny_data, precision=precision, max_steps=40, dropout=0.1)
    reference = Trainer(dataclasses.replace(config, run_name="whole")).run()
    broken = dataclasses.replace(config, run_name="broken")
    with pytest.raises(Killed):
        Trainer(broken, on_event=_stop_at(25, Killed())).run()  # last checkpoint: step 20
    assert [p.name for p in list_checkpoints(tmp_path / "runs" / "broken")][-1] == "step_0000020.pt"
    resumed = Trainer(resume_config(tmp_path / "runs" / "broken"), resume=True).run()
    assert resumed.status == "completed"
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(read_metrics(reference.run_dir))
    ours = load_checkpoint(list_checkpoints(resumed.run_dir)[-1])["model"]
    theirs = load_checkpoint(list_checkpoints(reference.run_dir)[-1])["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _signal_at(step, signum):
    def on_event(kind, payload):
        if kind == "log" and payload["step"] == step:
            os.kill(os.getpid(), signum)

    return on_event


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_ends_the_step_checkpoints_and_resumes_exactly(tmp_path, tiny_data, signum):
    config = tiny_config(tmp_path, tiny_data, precision="fp32", max_steps=30)
    reference = Trainer(dataclasses.replace(config, run_name="whole")).run()
    before = signal.getsignal(signum)  # a job started in the background inherits SIGINT ignored
    stopped = Trainer(dataclasses.replace(config, run_name="stopped"), on_event=_signal_at(15, signum)).run()
    assert stopped.status == "interrupted" and stopped.steps == 15
    assert signal.Signals(signum).name in stopped.message
    assert list_checkpoints(stopped.run_dir)[-1].name == "step_0000015.pt"
    assert signal.getsignal(signum) == before  # handlers restored
    resumed = Trainer(resume_config(stopped.run_dir), resume=True).run()
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(read_metrics(reference.run_dir))


def test_a_forced_interrupt_writes_no_checkpoint_of_a_half_step(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, precision="fp32", max_steps=30, checkpoint_interval=10)
    reference = Trainer(dataclasses.replace(config, run_name="whole")).run()
    interrupted = Trainer(dataclasses.replace(config, run_name="ctrl-c"),
                          on_event=_stop_at(15, KeyboardInterrupt())).run()
    assert interrupted.status == "interrupted" and interrupted.steps == 15
    assert json.loads((interrupted.run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert list_checkpoints(interrupted.run_dir)[-1].name == "step_0000010.pt"  # the last whole one
    resumed = Trainer(resume_config(interrupted.run_dir), resume=True).run()
    assert without_rates(read_metrics(resumed.run_dir)) == without_rates(read_metrics(reference.run_dir))


def test_non_finite_steps_are_skipped_then_the_run_diverges(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(tmp_path, tiny_data, max_steps=40, nan_patience=3))
    real_forward_backward = trainer._forward_backward

    calls = []

    def poisoned(batches):
        step = len(calls)
        calls.append(step)
        loss = real_forward_backward(batches)
        return float("nan") if step in (5,) or step >= 12 else loss

    trainer._forward_backward = poisoned
    result = trainer.run()
    assert result.status == "diverged" and result.steps == 15
    assert result.nonfinite_steps == 4  # step 6 (skipped, recovered) and steps 13-15
    state = load_checkpoint(list_checkpoints(result.run_dir)[-1])
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "diverged"


def test_bad_config_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: tiny\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown config key.*learning_rate.*valid keys: .*lr"):
        resolve_config(path)
    path.write_text("max_steps: lots\n")
    with pytest.raises(UserError, match="max_steps .* must be int"):
        resolve_config(path)
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tiny_data):
    missing = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(tmp_path / "nope"),
                                  "--runs-dir", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and "prepare-data" in missing.output
    assert runner.invoke(app, ["train", "--precision", "fp7"]).exit_code == 2
    args = ["train", "--preset", "tiny", "--max-steps", "4", "--data", str(tiny_data), "--runs-dir",
            str(tmp_path / "runs"), "--run-name", "cli", "--checkpoint-interval", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "completed" in first.output and "best val loss" in first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    newest = list_checkpoints(tmp_path / "runs" / "cli")[-1]
    newest.write_bytes(b"not a checkpoint")
    corrupt = runner.invoke(app, [*args, "--resume", "--max-steps", "6"])
    assert corrupt.exit_code == 2 and "corrupt" in corrupt.output and "Traceback" not in corrupt.output
    newest.unlink()  # the way out the message suggests: resume from the previous checkpoint
    resumed = runner.invoke(app, [*args, "--resume", "--max-steps", "6"])
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.slow
def test_wandb_offline_needs_no_network(tmp_path, tiny_data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = Trainer(tiny_config(tmp_path, tiny_data, max_steps=5, wandb="offline")).run()
    assert result.status == "completed"
    assert list((result.run_dir / "wandb").glob("offline-run-*"))


def test_the_final_loss_is_the_last_evaluation_even_when_it_is_not_finite(tmp_path, tiny_data):
    """A run whose last evaluation is NaN reports NaN (best stays the lowest finite one), and
    `compare` never passes it."""
    from altgrad.experiments.compare import compare_runs
    from altgrad.experiments.runs import load_run

    Trainer(tiny_config(tmp_path, tiny_data, run_name="ok", max_steps=20)).run()
    trainer = Trainer(tiny_config(tmp_path, tiny_data, run_name="broken", max_steps=20))
    real = trainer.evaluate
    trainer.evaluate = lambda: float("nan") if trainer.counters["tokens"] >= 20 * trainer.config.tokens_per_step \
        else real()
    result = trainer.run()
    assert result.status == "completed" and math.isnan(result.final_val_loss)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == "nan" and math.isfinite(summary["best_val_loss"])
    row = compare_runs([load_run(tmp_path / "runs", "ok"), load_run(tmp_path / "runs", "broken")]).rows[1]
    assert row.verdict == "INVESTIGATE" and "non-finite" in row.reason and math.isnan(row.final_val_loss)


def test_compare_pairs_runs_that_differ_only_in_precision_arm_and_names(tmp_path, tiny_data):
    from altgrad.experiments.compare import pairing_difference

    base = tiny_config(tmp_path, tiny_data).to_dict()
    twin = tiny_config(tmp_path, tiny_data, run_name="other", format="E5M2", optimizer="manifold",
                       precision="fp32", stats_interval=3, use_shadow=True).to_dict()
    assert pairing_difference(base, twin) is None
    for key, value in (("lr", 1e-2), ("weight_decay", 0.0), ("dropout", 0.1), ("warmup_steps", 9), ("seed", 2),
                       ("n_embd", 64), ("eval_iters", 5)):
        other = tiny_config(tmp_path, tiny_data, **{key: value}).to_dict()
        assert pairing_difference(base, other).startswith(f"{key} "), key
    two = tiny_config(tmp_path, tiny_data, lr=1e-2, seed=3).to_dict()
    assert pairing_difference(base, two) == "seed 1337 vs 3 (and 1 more: lr)"


def test_resume_refuses_flags_that_would_change_the_run(tmp_path, tiny_data):
    args = ["train", "--preset", "tiny", "--max-steps", "4", "--data", str(tiny_data), "--runs-dir",
            str(tmp_path / "runs"), "--run-name", "r", "--checkpoint-interval", "2"]
    assert runner.invoke(app, args).exit_code == 0
    changed = runner.invoke(app, [*args, "--resume", "--lr", "0.5", "--format", "E4M3"], env={"COLUMNS": "300"})
    assert changed.exit_code == 2 and "Traceback" not in changed.output
    assert "would change it" in changed.output and "lr 0.5" in changed.output and "format 'E4M3'" in changed.output
    same = runner.invoke(app, [*args, "--resume", "--max-steps", "6"])  # the same flags, more steps: fine
    assert same.exit_code == 0, same.output
