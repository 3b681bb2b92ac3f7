"""The schedule's shape (DESIGN §5.1): the floor as a fraction of the peak (min_lr_ratio, or the
absolute min_lr of older configs), warmup in steps or as a fraction of the run."""

import math

import pytest
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.errors import UserError
from altgrad.training import resolve_config
from altgrad.training.config import DEFAULT_MIN_LR_RATIO, PRESETS, TrainConfig, config_from_dict
from altgrad.training.setup import learning_rate
from altgrad.training.tracking import read_metrics

runner = CliRunner()
STEPS = [0, 1, 4, 5, 6, 50, 99, 100, 101, 333, 1000, 1500, 1999, 2000, 2001, 2500]


def old_learning_rate(step, lr, min_lr, warmup, decay_steps):
    """The schedule as it was before min_lr_ratio (copied from setup.py at 42390c0)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def test_the_small_preset_schedule_is_bit_for_bit_what_it_was():
    """small set min_lr 1e-4 with lr 1e-3: 1e-3 * 0.1 is the same double, so every lr is identical."""
    config = resolve_config(None, {"preset": "small"})
    assert config.min_lr is None and config.min_lr_ratio is None and "min_lr" not in PRESETS["small"]
    assert config.floor_lr == 1e-4
    for step in STEPS:
        assert learning_rate(step, config) == old_learning_rate(step, 1e-3, 1e-4, 100, 2000), step


@pytest.mark.parametrize("preset, lr, floor", [("tiny", 3e-3, 3e-4), ("paper", 6e-4, 6e-5)])
def test_the_other_presets_keep_their_ratio(preset, lr, floor):
    """tiny and paper had floors of 0.1 * lr too; as lr * 0.1 they differ from the decimal
    literal by at most one double rounding (3e-3 * 0.1 = 3.0000000000000003e-4)."""
    config = resolve_config(None, {"preset": preset})
    assert config.floor_lr == lr * DEFAULT_MIN_LR_RATIO == pytest.approx(floor, rel=1e-15)
    for step in STEPS:
        old = old_learning_rate(step, lr, floor, config.warmup, config.decay_steps)
        assert learning_rate(step, config) == pytest.approx(old, rel=1e-15, abs=0), step


def test_an_absolute_min_lr_keeps_working():
    config = TrainConfig(lr=1e-3, min_lr=2e-4, warmup_steps=10, max_steps=110)
    assert config.floor_lr == 2e-4
    assert learning_rate(110, config) == 2e-4 and learning_rate(500, config) == 2e-4
    assert learning_rate(60, config) == pytest.approx(2e-4 + 0.5 * (1e-3 - 2e-4), rel=1e-15)  # half way: cos = 0
    saved = config_from_dict({"min_lr": 1e-4, "lr": 1e-3, "warmup_steps": 100, "preset": "small"}, "config.yaml")
    assert saved.floor_lr == 1e-4  # a run saved before min_lr_ratio resumes with its schedule


def test_the_floor_is_a_fraction_of_each_peak():
    """Two arms with different peaks decay alike: lr(step) / lr is one curve."""
    low = TrainConfig(lr=1e-3, min_lr_ratio=0.05, warmup_steps=10, max_steps=110)
    high = TrainConfig(lr=8e-3, min_lr_ratio=0.05, warmup_steps=10, max_steps=110)
    assert low.floor_lr == 1e-3 * 0.05 and high.floor_lr == 8e-3 * 0.05
    assert learning_rate(200, high) == 8e-3 * 0.05
    assert learning_rate(60, high) == pytest.approx(8e-3 * (0.05 + 0.5 * 0.95), rel=1e-15)
    for step in range(0, 130, 7):
        assert learning_rate(step, low) / 1e-3 == pytest.approx(learning_rate(step, high) / 8e-3, rel=1e-14)
    # with an absolute floor they would not: the default ratio is what makes the shapes equal
    fixed = TrainConfig(lr=8e-3, min_lr=1e-3 * 0.05, warmup_steps=10, max_steps=110)
    assert learning_rate(100, fixed) / 8e-3 != pytest.approx(learning_rate(100, low) / 1e-3, rel=1e-3)
    zero = TrainConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, max_steps=10)
    assert learning_rate(10, zero) == 0.0 and learning_rate(0, zero) == 1e-3


def test_warmup_as_a_fraction_of_the_run():
    by_ratio = TrainConfig(max_steps=2000, warmup_ratio=0.05, warmup_steps=7)  # warmup_steps is ignored
    by_steps = TrainConfig(max_steps=2000, warmup_steps=100)
    assert by_ratio.warmup == 100 and by_steps.warmup == 100
    for step in STEPS:
        assert learning_rate(step, by_ratio) == learning_rate(step, by_steps), step
    assert learning_rate(0, by_ratio) == 1e-3 / 101  # the first step of the linear warmup
    assert TrainConfig(max_steps=60, warmup_ratio=0.0125).warmup == 1  # round(0.75)
    assert TrainConfig(max_steps=60, warmup_ratio=0.0).warmup == 0
    assert learning_rate(0, TrainConfig(max_steps=60, warmup_ratio=0.0)) == 1e-3  # no warmup: the peak at once


@pytest.mark.parametrize("values, message", [
    ({"min_lr": 1e-4, "min_lr_ratio": 0.1}, "min_lr (absolute) or min_lr_ratio"),
    ({"min_lr_ratio": 1.5}, "0 <= min_lr_ratio <= 1"),
    ({"min_lr_ratio": -0.1}, "0 <= min_lr_ratio <= 1"),
    ({"min_lr": 1.0}, "0 <= min_lr <= lr"),
    ({"warmup_ratio": 1.0}, "0 <= warmup_ratio < 1"),
    ({"warmup_ratio": -0.01}, "0 <= warmup_ratio < 1"),
    ({"warmup_steps": -1}, "warmup_steps >= 0"),
    ({"lr": 0.0}, "lr > 0"),
])
def test_bad_schedules_are_one_line_errors(values, message):
    with pytest.raises(UserError, match="bad config") as caught:
        TrainConfig(**values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_both_floors_from_a_file_and_the_command_line_are_an_error(tmp_path):
    (tmp_path / "old.yaml").write_text("min_lr: 0.0001\n")
    assert resolve_config(tmp_path / "old.yaml", {"preset": "tiny"}).floor_lr == 1e-4
    with pytest.raises(UserError, match="not both"):
        resolve_config(tmp_path / "old.yaml", {"preset": "tiny", "min_lr_ratio": 0.2})
    (tmp_path / "new.yaml").write_text("base: old.yaml\nmin_lr: null\nmin_lr_ratio: 0.2\n")  # a child unsets it
    assert resolve_config(tmp_path / "new.yaml", {"preset": "tiny"}).floor_lr == 3e-3 * 0.2


def test_a_run_logs_the_schedule_it_was_given(tmp_path, tiny_data):
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(tiny_data), "--runs-dir",
                                 str(tmp_path / "runs"), "--max-steps", "10", "--run-name", "shape", "--lr", "0.002",
                                 "--min-lr-ratio", "0.25", "--warmup-ratio", "0.2", "--device", "cpu"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    config = resolve_config(None, {"preset": "tiny", "max_steps": 10, "lr": 0.002, "min_lr_ratio": 0.25,
                                   "warmup_ratio": 0.2})
    assert config.warmup == 2 and config.floor_lr == 0.002 * 0.25
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "shape") if "lr" in r}
    assert logged[0] == learning_rate(0, config) == 0.002 / 3
    assert logged[10] == learning_rate(9, config)  # the record of step n carries the lr its update used
    assert logged[5] == learning_rate(4, config)
