"""Collapse analysis on constructed records and on real runs that fail."""

import json
import math

from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.training import Trainer, resolve_config
from altgrad.training.collapse import collapse_analysis

runner = CliRunner()


def records():
    stats = {"optim/update_rate/a": 1.0, "optim/update_rate/b": 0.25, "optim/update_rate/c": 0.5,
             "optim/stall_ratio/a": 0.9, "optim/stall_ratio/b": 0.99, "optim/stall_ratio/c": float("nan"),
             "quant/underflow_rate/gradient/a": 0.0, "quant/underflow_rate/gradient/b": 0.7,
             "quant/underflow_rate/gradient/c": 0.2}
    return [{"step": 0, "val_loss": 5.0}, {"step": 10, "loss": 4.0, **stats}, {"step": 20, "val_loss": 4.5},
            {"step": 30, "loss": 9.0, **{k: v / 2 for k, v in stats.items()}}, {"step": 40, "val_loss": 5.5},
            {"step": 50, "loss": 9.0, "optim/update_rate/a": 0.0}]


def test_collapse_is_the_first_evaluation_above_step_zero_with_the_layer_picture_there():
    found = collapse_analysis(records(), "completed", 60)
    assert found["step"] == 40 and "above its step-0 value 5" in found["reason"]
    assert found["measured_at"] == 30  # the last statistics at or before the collapse, not after
    assert found["gradient_sparsity"] == {"a": 0.5, "b": 0.875, "c": 0.75}
    assert found["highest_stall"] == [["b", 0.495], ["a", 0.45]]  # undefined (NaN) layers are left out
    assert [name for name, _ in found["highest_underflow"]] == ["b", "c", "a"]


def test_no_collapse_nan_evaluations_and_divergence():
    healthy = [{"step": 0, "val_loss": 5.0}, {"step": 10, "val_loss": 4.0}]
    assert collapse_analysis(healthy, "completed", 10) is None
    nan = collapse_analysis(healthy + [{"step": 20, "val_loss": "nan"}], "completed", 20)
    assert nan["step"] == 20 and nan["reason"] == "validation loss nan" and nan["highest_stall"] == []
    diverged = collapse_analysis(records(), "diverged", 35)  # diverged before the evaluation at 40
    assert diverged["step"] == 35 and diverged["reason"].startswith("diverged") and diverged["measured_at"] == 30


def test_a_diverging_run_reports_its_collapse_and_compare_shows_it(tmp_path, tiny_data):
    common = dict(preset="tiny", data=str(tiny_data), runs_dir=str(tmp_path / "runs"), device="cpu", format="E5M2",
                  max_steps=30, nan_patience=3, stats_interval=5)
    Trainer(resolve_config(None, dict(common, run_name="healthy"))).run()
    trainer = Trainer(resolve_config(None, dict(common, run_name="broken")))
    real = trainer._forward_backward
    trainer._forward_backward = lambda batches: float("nan") if trainer.counters["tokens"] >= \
        12 * trainer.config.tokens_per_step else real(batches)
    result = trainer.run()
    assert result.status == "diverged" and result.steps == 15
    summary = json.loads((result.run_dir / "summary.json").read_text())
    collapse = summary["collapse"]
    assert collapse["step"] == 15 and collapse["measured_at"] == 10 and len(collapse["gradient_sparsity"]) == 9
    assert math.isclose(sum(collapse["gradient_sparsity"].values()), 0.0, abs_tol=0.05)  # dense gradients here
    assert json.loads((tmp_path / "runs" / "healthy" / "summary.json").read_text())["collapse"] is None
    shown = runner.invoke(app, ["compare", "healthy", "broken", "--runs-dir", str(tmp_path / "runs")],
                          env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "collapse: broken at step 15" in shown.output
    assert "highest stall" in shown.output and "zero gradients" in shown.output
    assert "no collapse (validation loss stayed below its step-0 value, no divergence): healthy" in \
        " ".join(shown.output.split())


def test_collapse_is_measured_against_the_step_zero_loss_not_the_best_so_far():
    """A rise from the best value that stays below the step-0 loss is not a collapse; rising above
    step 0 is; equal to it is not (strictly above); without a step-0 evaluation only a non-finite
    loss counts, and a non-finite step-0 value is no reference."""
    def evals(*losses):
        return [{"step": 10 * i, "val_loss": v} for i, v in enumerate(losses)]
    assert collapse_analysis(evals(3.0, 2.0, 2.9), "completed", 20) is None
    assert collapse_analysis(evals(3.0, 2.0, 3.0), "completed", 20) is None
    above = collapse_analysis(evals(3.0, 2.0, 2.9, 3.1), "completed", 30)
    assert above["step"] == 30 and above["reason"] == "validation loss 3.1 above its step-0 value 3"
    later = [{"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": 9.0}, {"step": 30, "val_loss": "nan"}]
    assert collapse_analysis(later, "completed", 30)["step"] == 30  # no step 0: only the nan
    assert collapse_analysis(evals("nan", 2.0, 9.0), "completed", 20) is None


def test_a_divergence_and_an_evaluation_collapse_count_whichever_comes_first():
    """Diverged status: the collapse is at the divergence step unless an evaluation collapsed
    earlier (at the same step, the evaluation's reason); a completed run with healthy evaluations
    and a diverged one with no step-0 evaluation are told apart by the status alone."""
    rise = [{"step": 0, "val_loss": 3.0}, {"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": 3.1}]
    assert collapse_analysis(rise, "diverged", 35)["step"] == 20  # the evaluation came first
    assert collapse_analysis(rise, "diverged", 20)["reason"].startswith("validation loss 3.1 above")
    first = collapse_analysis(rise, "diverged", 15)
    assert first["step"] == 15 and first["reason"].startswith("diverged")
    healthy = [{"step": 0, "val_loss": 3.0}, {"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": 2.9}]
    assert collapse_analysis(healthy, "completed", 20) is None
    assert collapse_analysis(healthy, "diverged", 25)["step"] == 25  # below step 0, but it diverged
    assert collapse_analysis([], "diverged", 7)["step"] == 7 and collapse_analysis([], "completed", 7) is None
    infinite = collapse_analysis(healthy + [{"step": 30, "val_loss": float("inf")}], "completed", 30)
    assert infinite["step"] == 30 and infinite["reason"] == "validation loss inf"  # non-finite, not "above"
    assert collapse_analysis(healthy + [{"step": 30, "val_loss": 2.5}], "stopped", 30) is None
