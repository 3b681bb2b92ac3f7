"""What a matrix costs: its runs counted from the file, its time from the manifest, and an estimate
from measured step times (altgrad/experiments/scale.py), against hand counts."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from altgrad.cli.app import app
from altgrad.experiments.matrix import load_matrix
from altgrad.experiments.scale import Estimate, Work, _evaluations, measure_cell, plan, spent, step_seconds

MATRIX = """
preset: tiny
settings: {max_steps: 100, eval_interval: 30, data: DATA}
runs_dir: RUNS
seeds: [1, 2, 3]
formats: [bf16, E5M2, E4M3]
arms:
  A: {optimizer: adamw, sweep: {lr: [0.001, 0.002, 0.004]}}
  B: {optimizer: adamw, weight_storage: format, update_rounding: nearest, lr: {from: A}}
  D: {optimizer: manifold, weight_storage: format, update_rounding: stochastic, sweep: {grid_lr: [0.1, 0.2]}}
sweep: {budget: 4, max_steps: 60}
cells:
  - {formats: [bf16], arms: [A]}
  - {formats: [E5M2, E4M3], arms: [A, D]}
  - {formats: [E5M2], arms: [B], seeds: [1, 2]}
"""


@pytest.fixture
def matrix(tmp_path, tiny_data):
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX.replace("RUNS", str(tmp_path / "runs")).replace("DATA", str(tiny_data)))
    return load_matrix(path)


def test_the_runs_of_a_matrix_are_counted_per_arm_and_layer_policy(matrix):
    work = {(w.arm, w.layers): w for w in plan(matrix)}
    assert list(work) == [("A", "-"), ("A", "uniform"), ("D", "uniform"), ("B", "uniform")]
    # bf16 A: 3 seeds, one tuned group; E5M2/E4M3 A and D: 2 formats x 3 seeds, two tuned groups each
    assert (work["A", "-"].cells, work["A", "-"].tuning) == (3, 4)
    assert (work["A", "uniform"].cells, work["A", "uniform"].tuning) == (6, 8)
    assert (work["D", "uniform"].cells, work["D", "uniform"].tuning) == (6, 8)
    assert (work["B", "uniform"].cells, work["B", "uniform"].tuning) == (2, 0)  # B inherits A's lr: no tuning runs
    w = work["A", "uniform"]
    assert (w.cell, w.steps, w.tuning_steps) == ("e5m2-A-s1", 100, 60)
    assert (w.evaluations, w.tuning_evaluations) == (5, 3)  # steps 0, 30, 60, 90, 100; and 0, 30, 60


def test_evaluations_count_step_zero_every_interval_and_the_last_step():
    assert _evaluations(2000, 250) == 9
    assert _evaluations(100, 30) == 5
    assert _evaluations(60, 30) == 3


def test_hours_are_steps_and_evaluations_times_their_measured_seconds():
    w = Work("A", "uniform", "e5m2-A-s1", cells=6, tuning=8, steps=100, tuning_steps=60, evaluations=5,
             tuning_evaluations=3, step_s=0.5, evaluation_s=2.0)
    assert w.hours() == pytest.approx((6 * (100 * 0.5 + 5 * 2.0) + 8 * (60 * 0.5 + 3 * 2.0)) / 3600)
    unmeasured = Work("B", "uniform", "e5m2-B-s1", 2, 0, 100, 100, 5, 5)
    assert unmeasured.hours() is None
    estimate = Estimate("m.yaml", "tiny", "cpu", 40, "code", (w, unmeasured))
    assert estimate.hours() is None and estimate.runs == 16 and estimate.cells == 8
    measured = Estimate("m.yaml", "tiny", "cpu", 40, "code", (w,))
    assert Estimate.from_dict(json.loads(json.dumps(measured.to_dict()))) == measured
    text = "\n".join(measured.lines_md())
    assert "14 runs at most" in text and "6 evaluation runs and at most 8 tuning runs" in text
    assert "| A | uniform | e5m2-A-s1 | 6 | 8 | 100 | 0.500 | 2.00 | 0.18 |" in text


def test_a_step_time_is_the_logged_windows_time_over_their_tokens_the_first_left_out():
    records = [{"step": 0, "val_loss": 5.0},
               {"step": 10, "tokens": 100, "tokens_per_s": 10.0},  # set-up: left out
               {"step": 20, "tokens": 200, "tokens_per_s": 100.0},  # 1 s
               {"step": 25, "tokens": 250, "tokens_per_s": 25.0, "val_loss": 4.0}]  # 2 s
    assert step_seconds(records) == pytest.approx(3.0 / 150)
    with pytest.raises(ValueError, match="too few"):
        step_seconds(records[:2])


def _entry(status, started, ended, wall, sweep=None):
    return {"status": status, "started": started, "ended": ended, "wall_s": wall, "sweep": sweep}


def test_the_time_spent_counts_finished_runs_and_the_union_of_their_intervals():
    manifest = {"cells": {
        "a": _entry("completed", "2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+00:00", 3600.0),
        "b": _entry("diverged", "2026-01-01T00:30:00+00:00", "2026-01-01T01:30:00+00:00", 3600.0),  # overlaps a
        "c": _entry("completed", "2026-01-01T03:00:00+00:00", "2026-01-01T03:30:00+00:00", 1800.0, {"lr": 1e-3}),
        "d": _entry("failed", "2026-01-01T04:00:00+00:00", "2026-01-01T05:00:00+00:00", 3600.0),
        "e": {"status": "queued"}}}
    found = spent(manifest)
    assert (found.cells, found.tuning, found.unfinished) == (2, 1, 2)
    assert found.hours == pytest.approx(2.5)
    assert found.elapsed_hours == pytest.approx(1.5 + 0.5)  # 00:00-01:30 and 03:00-03:30; the gap is not counted
    assert "3 runs (2 evaluation runs, 1 tuning runs): 2.5 run-hours" in found.text
    del manifest["cells"]["c"]["started"]  # a run without its interval: no elapsed figure, never a wrong one
    assert spent(manifest).elapsed_hours is None


def test_a_cell_is_measured_with_its_own_settings(matrix, tmp_path):
    cell = next(c for c in matrix.cells() if c.arm == "D")
    step_s, evaluation_s = measure_cell(cell, steps=20, device="cpu")
    assert math.isfinite(step_s) and step_s > 0 and math.isfinite(evaluation_s) and evaluation_s > 0
    assert not (tmp_path / "runs").exists()  # the measurement leaves nothing in the matrix's runs


def test_the_estimate_command_counts_writes_and_rejects_bad_input(matrix, tmp_path):
    runner = CliRunner()
    out = tmp_path / "estimate.json"
    result = runner.invoke(app, ["matrix", "estimate", str(matrix.path), "--measure-steps", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["runs"] == 37 and data["hours"] is None
    bad = runner.invoke(app, ["matrix", "estimate", str(matrix.path), "--measure-steps", "5"])
    assert bad.exit_code == 2 and "at least 20" in bad.output
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--scale", str(broken)])
    assert result.exit_code == 2
