"""Tuning that finds an interior optimum (experiments/tuning.py, and the matrix's tuning loop in
launch.py): a fake runner whose loss is a known function of the values drives the bracketing
(it extends at either edge, stops at divergence, at max_extensions and at the budget, refines),
coordinate descent, inheritance between groups and the equal budget; then the matrix runs the
same loop with fake cells and records what the report reads."""

import json
import math
import re

import pytest
import yaml

from altgrad.errors import UserError
from altgrad.experiments import tuning
from altgrad.experiments.launch import MatrixRunner
from altgrad.experiments.tuning_runs import swept_values
from altgrad.experiments.matrix import load_matrix
from altgrad.experiments.tuning import COMPLETED, DIVERGED, FAILED, Outcome, Protocol, plan, trial_key
from altgrad.training.tracking import SUMMARY_FILE


def bowl(optimum: float, diverge_above: float = math.inf, key: str = "lr"):
    """Loss 1 + (log2 v - log2 optimum)^2; diverged at or above ``diverge_above``."""
    def loss(values):
        v = values[key]
        if v >= diverge_above:
            return Outcome(DIVERGED)
        return Outcome(COMPLETED, 1.0 + (math.log2(v) - math.log2(optimum)) ** 2)
    return loss


def drive(grids, protocol, loss, batches=None):
    """Run a search to the end with ``loss`` as the runner; returns the plan (and the batches)."""
    results = {}
    for _ in range(100):
        step = plan(grids, protocol, results)
        if step.settled:
            return step
        assert step.next, "an unsettled search always has trials to run"
        assert all(trial_key(v) not in results for v in step.next), "no trial runs twice"
        if batches is not None:
            batches.append([v[next(iter(grids))] for v in step.next])
        for values in step.next:
            results[trial_key(values)] = loss(values)
    raise AssertionError("the search never settled")


GRID = {"lr": (0.001, 0.002, 0.004)}


def tried(result, key="lr"):
    return [t[key] for t in result.trials]


def test_an_interior_best_settles_on_the_grid_itself():
    result = drive(GRID, Protocol(budget=10), bowl(0.002))
    assert tried(result) == [0.001, 0.002, 0.004] and result.best == {"lr": 0.002}
    assert result.interior == {"lr": True} and result.stopped == "interior" and not result.hit_budget
    below, above = result.neighbours["lr"]["below"], result.neighbours["lr"]["above"]
    assert (below.value, above.value) == (0.001, 0.004) and below.loss == above.loss == 2.0
    assert result.resolution == pytest.approx(1.0)  # the smaller rise to a neighbour: 2 - 1


def test_the_grid_extends_at_the_upper_edge_one_value_at_a_time_until_the_best_is_bracketed():
    batches = []
    result = drive(GRID, Protocol(budget=10), bowl(0.011), batches)
    assert batches == [[0.001, 0.002, 0.004], [0.008], [0.016]]  # the same ratio beyond the edge
    assert result.best == {"lr": 0.008} and result.interior == {"lr": True} and result.spent == 5
    assert result.best_loss == pytest.approx(1 + math.log2(8 / 11) ** 2)


def test_the_grid_extends_at_the_lower_edge():
    result = drive(GRID, Protocol(budget=10), bowl(0.0004))
    assert tried(result) == [0.001, 0.002, 0.004, 0.0005, 0.00025]
    assert result.best == {"lr": 0.0005} and result.interior == {"lr": True}


def test_a_diverged_value_beyond_the_edge_is_a_worse_neighbour_and_stops_the_extension():
    result = drive(GRID, Protocol(budget=10), bowl(1.0, diverge_above=0.006))
    assert tried(result) == [0.001, 0.002, 0.004, 0.008] and result.best == {"lr": 0.004}
    assert result.interior == {"lr": True} and result.neighbours["lr"]["above"].status == DIVERGED
    assert result.resolution == pytest.approx((math.log2(0.002)) ** 2 - (math.log2(0.004)) ** 2)  # below only


def test_max_extensions_ends_a_search_whose_best_is_still_at_the_edge():
    result = drive(GRID, Protocol(budget=20, max_extensions=2), bowl(1.0))
    assert tried(result) == [0.001, 0.002, 0.004, 0.008, 0.016]
    assert result.best == {"lr": 0.016} and result.interior == {"lr": False}
    assert result.stopped == "max_extensions" and not result.hit_budget
    assert result.neighbours["lr"]["above"] is None


def test_the_budget_caps_the_runs_and_is_flagged_when_it_stopped_an_edge_search():
    result = drive(GRID, Protocol(budget=4, max_extensions=4), bowl(1.0))
    assert result.spent == 4 and tried(result) == [0.001, 0.002, 0.004, 0.008]
    assert result.stopped == "budget" and result.hit_budget and result.interior == {"lr": False}
    enough = drive(GRID, Protocol(budget=4), bowl(0.002))
    assert not enough.hit_budget and enough.spent == 3


def test_refinement_tries_the_geometric_midpoints_and_sharpens_the_resolution():
    coarse = drive(GRID, Protocol(budget=10), bowl(0.0015))
    fine = drive(GRID, Protocol(budget=10, refine=True), bowl(0.0015))
    assert tried(fine)[-2:] == [tuning.canonical(math.sqrt(0.001 * 0.002)), tuning.canonical(math.sqrt(0.002 * 0.004))]
    assert fine.best == {"lr": 0.00141421} and fine.interior == {"lr": True}
    assert fine.best_loss < coarse.best_loss and fine.resolution < coarse.resolution
    assert fine.neighbours["lr"]["below"].value == 0.001 and fine.neighbours["lr"]["above"].value == 0.002


def test_a_line_where_everything_diverges_extends_downwards():
    result = drive(GRID, Protocol(budget=10), bowl(0.0001, diverge_above=0.0007))
    assert tried(result) == [0.001, 0.002, 0.004, 0.0005, 0.00025, 0.000125, 6.25e-05]
    assert result.best == {"lr": 0.000125} and result.interior == {"lr": True}
    nothing = drive(GRID, Protocol(budget=10, max_extensions=1), bowl(1.0, diverge_above=0.0))
    assert nothing.best is None and nothing.stopped == "no_usable_value" and nothing.settled


def test_a_failed_trial_stops_the_search_and_says_so():
    def loss(values):
        return Outcome(FAILED) if values["lr"] == 0.004 else bowl(0.01)(values)
    result = drive(GRID, Protocol(budget=10), loss)
    assert result.stopped == "failed" and result.interior == {"lr": False} and result.best == {"lr": 0.002}


def test_coordinate_descent_tunes_each_key_in_turn_and_reuses_runs():
    def loss(values):  # optimum at grid_lr 1.0, lr 0.004, with an interaction between them
        x, y = math.log2(values["grid_lr"]), math.log2(values["lr"] / 0.004)
        return Outcome(COMPLETED, 1 + x * x + y * y + 0.5 * x * y)
    grids = {"grid_lr": (0.25, 0.5, 1.0), "lr": (0.001, 0.002, 0.004)}
    result = drive(grids, Protocol(budget=30, rounds=3), loss)
    assert result.best == {"grid_lr": 1.0, "lr": 0.004} and result.interior == {"grid_lr": True, "lr": True}
    keys = [trial_key(t) for t in result.trials]
    assert len(keys) == len(set(keys)) == result.spent
    first = result.trials[:3]  # round one starts with grid_lr on its grid, lr at its grid's middle value
    assert [t["grid_lr"] for t in first] == [0.25, 0.5, 1.0] and {t["lr"] for t in first} == {0.002}
    one_round = drive(grids, Protocol(budget=30, rounds=1), loss)
    assert one_round.spent < result.spent


def test_a_replay_resumes_the_same_search_from_partial_outcomes():
    """What a killed matrix sees: some trials done, one still pending."""
    results = {trial_key({"lr": 0.001}): Outcome(COMPLETED, 3.0), trial_key({"lr": 0.002}): Outcome(COMPLETED, 2.0)}
    step = plan(GRID, Protocol(budget=10), results)
    assert not step.settled and step.next == [{"lr": 0.004}]
    results[trial_key({"lr": 0.004})] = Outcome(COMPLETED, 1.0)
    assert plan(GRID, Protocol(budget=10), results).next == [{"lr": 0.008}]


# ---- the matrix's tuning loop, with fake cells -------------------------------------------------
class FakeRunner(MatrixRunner):
    """Cells "run" instantly: summary.json with a loss that is a known function of the config."""

    def __init__(self, matrix, loss, **kwargs):
        super().__init__(matrix, **kwargs)
        self.loss = loss
        self.batches = []

    def _run_local(self, cells, progress, notify):
        self.batches.append([c.name for c in cells])
        for cell in cells:
            folder = self.runs_dir / cell.folder
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.yaml").write_text(yaml.safe_dump(cell.config.to_dict()))
            status, loss = self.loss(cell.config)
            summary = {"status": status, "steps": cell.config.max_steps, "final_val_loss": loss,
                       "arm": cell.config.arm}
            (folder / SUMMARY_FILE).write_text(json.dumps(summary))
            yield cell, {"status": status, "final_val_loss": loss, "steps": cell.config.max_steps}


def fake_loss(config):
    """AdamW arms: best lr 0.008 (beyond the grid); manifold: best grid_lr 0.5, and best when its lr
    is the control's; diverged beyond lr 0.03."""
    if config.lr > 0.03:
        return "diverged", None
    loss = 2 + (math.log2(config.lr) - math.log2(0.008)) ** 2
    if config.optimizer == "manifold":
        loss += (math.log2(config.grid_lr) - math.log2(0.5)) ** 2
    return "completed", loss


def fake_matrix(tmp_path, **changes):
    spec = {"preset": "tiny", "settings": {"max_steps": 12, "device": "cpu"}, "runs_dir": str(tmp_path / "runs"),
            "seeds": [1, 2], "formats": ["bf16", "E5M2"],
            "arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, 0.002, 0.004]}},
                     "C": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic",
                           "sweep": {"lr": [0.001, 0.002, 0.004]}},
                     "D": {"optimizer": "manifold", "lr": {"from": "C"}, "sweep": {"grid_lr": [0.25, 0.5, 1.0]}}},
            "cells": [{"formats": ["bf16"], "arms": ["A"]}, {"formats": ["E5M2"], "arms": ["A", "C", "D"]}],
            **changes}
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_matrix_tunes_every_group_and_an_inheriting_group_waits_for_its_source(tmp_path):
    matrix = load_matrix(fake_matrix(tmp_path))
    runner = FakeRunner(matrix, fake_loss)
    manifest = runner.run()
    sweeps = manifest["sweeps"]
    assert set(sweeps) == {"bf16-A", "e5m2-A", "e5m2-C", "e5m2-D"}
    for group in ("bf16-A", "e5m2-A", "e5m2-C"):
        assert sweeps[group]["best"] == {"lr": 0.008} and sweeps[group]["interior"] == {"lr": True}
        assert [t["values"]["lr"] for t in sweeps[group]["trials"]] == [0.001, 0.002, 0.004, 0.008, 0.016]
        assert sweeps[group]["spent"] == 5 and sweeps[group]["seed"] == 3 and sweeps[group]["horizon"] == "final"
    d = sweeps["e5m2-D"]
    assert d["best"] == {"grid_lr": 0.5} and d["inherited"]["lr"] == {"from": "C", "group": "e5m2-C", "value": 0.008,
                                                                      "interior": True}
    assert all(t["values"] == {"grid_lr": t["values"]["grid_lr"]} for t in d["trials"])
    d_first = next(i for i, b in enumerate(runner.batches) if any(n.startswith("sweep-e5m2-D") for n in b))
    c_last = max(i for i, b in enumerate(runner.batches) if any(n.startswith("sweep-e5m2-C") for n in b))
    assert d_first > c_last, "D's trials wait for C's tuning"
    for trial in d["trials"]:
        config = yaml.safe_load((tmp_path / "runs" / trial["folder"] / "config.yaml").read_text())
        assert config["lr"] == 0.008 and config["seed"] == 3 and config["max_steps"] == 12
    protocol = manifest["protocol"]
    assert protocol["tuning_seed"] == 3 and protocol["eval_seeds"] == [1, 2] and protocol["horizon"] == "final"
    assert protocol["budget"] == 3 + 4 and {s["budget"] for s in sweeps.values()} == {7}
    main = [e for e in manifest["cells"].values() if not e.get("sweep")]
    assert len(main) == 8
    for entry in main:
        config = yaml.safe_load((tmp_path / "runs" / entry["folder"] / "config.yaml").read_text())
        assert config["lr"] == 0.008 and config["seed"] in (1, 2)
        if entry["arm"] == "D":
            assert config["grid_lr"] == 0.5
    assert swept_values(manifest)["e5m2-D"] == {"grid_lr": 0.5, "lr": 0.008}
    again = FakeRunner(matrix, fake_loss)
    again.run()
    assert again.batches == [], "a finished matrix runs nothing again"


def test_a_short_tuning_horizon_is_only_what_the_matrix_asks_for_and_is_recorded(tmp_path):
    manifest = FakeRunner(load_matrix(fake_matrix(tmp_path, sweep={"max_steps": 6})), fake_loss).run()
    assert manifest["protocol"]["horizon"] == "short" and manifest["sweeps"]["e5m2-C"]["horizon"] == "short"
    assert manifest["sweeps"]["e5m2-C"]["max_steps"] == 6


@pytest.mark.parametrize("change, message", [
    ({"sweep": {"seed": 2}}, "sweep seed 2 is also an evaluation seed"),
    ({"sweep": {"budget": 1}}, "more than the tuning budget of 1"),
    ({"sweep": {"rounds": 0}}, "rounds must be an integer >= 1"),
    ({"sweep": {"steps": 5}}, "sweep: unknown key(s) steps"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001]}}}}, "at least two positive numbers"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, -1]}}}}, "at least two positive numbers"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"rung_clip": [2, 4]}}}}, "only real-valued settings"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, 0.002]}},
               "D": {"optimizer": "manifold", "lr": {"from": "B"}}}}, "names no other arm"),
    ({"arms": {"A": {"optimizer": "adamw"}, "D": {"optimizer": "manifold", "lr": {"from": "A"}}}},
     "arm A does not tune lr"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, 0.002]}},
               "D": {"optimizer": "manifold", "lr": {"from": "A", "to": 1}}}}, "is a value or {from: ARM}"),
])
def test_protocol_mistakes_are_errors_before_anything_runs(tmp_path, change, message):
    spec = {"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, 0.002]}},
                     "D": {"optimizer": "manifold", "sweep": {"grid_lr": [0.25, 0.5]}}},
            "cells": [{"formats": ["E5M2"], "arms": ["A", "D"]}], **change}
    with pytest.raises(UserError, match=re.escape(message)):
        load_matrix(fake_matrix(tmp_path, **spec))


def test_an_inherited_value_needs_its_source_group_in_the_matrix(tmp_path):
    with pytest.raises(UserError, match=r"cell e5m2-D: lr: \{from: C\} needs group e5m2-C"):
        load_matrix(fake_matrix(tmp_path, cells=[{"formats": ["E5M2"], "arms": ["A", "D"]}]))


def test_every_group_gets_the_same_default_budget(tmp_path):
    matrix = load_matrix(fake_matrix(tmp_path, sweep={"refine": True, "max_extensions": 2}))
    assert matrix.budget == 3 + 2 + 2 and matrix.protocol.budget == 7
    assert matrix.tuning_seed == 3
    assert {c.config.seed for c in matrix.sweep_cells()} == {3}


def test_a_diverged_trial_with_a_low_finite_loss_is_never_chosen():
    """A run can diverge (non-finite steps past its patience) and still end with a finite, even low,
    last loss: diverged is worse than any completed neighbour, whatever its number."""
    def loss(values):
        if values["lr"] == 0.004:
            return Outcome(DIVERGED, 0.01)  # the lowest loss of all, but diverged
        return bowl(0.004)(values)
    result = drive(GRID, Protocol(budget=10), loss)
    assert result.best == {"lr": 0.002} and result.interior == {"lr": True}  # bracketed by the diverged one
    assert result.best_loss == pytest.approx(2.0)
    assert result.resolution == pytest.approx(5.0 - 2.0)  # the completed neighbour's gap, not 0.01 - 2.0
    every = drive(GRID, Protocol(budget=10, max_extensions=2), lambda values: Outcome(DIVERGED, 0.01))
    assert every.best is None and every.stopped == "no_usable_value" and math.isnan(every.resolution)


def test_the_matrix_reads_a_diverged_run_as_diverged_whatever_its_last_loss(tmp_path):
    """The same rule where outcomes come from disk: a summary that says diverged with a finite,
    lowest final_val_loss is a diverged trial; a matrix whose every trial diverged chooses nothing."""
    def loss(config):
        if config.lr == 0.004:
            return "diverged", 0.01
        return fake_loss(config)
    matrix = load_matrix(fake_matrix(tmp_path))
    manifest = FakeRunner(matrix, loss).run()
    sweep = manifest["sweeps"]["bf16-A"]
    assert sweep["best"] == {"lr": 0.002} and sweep["best_loss"] != 0.01
    assert {t["status"] for t in sweep["trials"] if t["values"]["lr"] == 0.004} == {"diverged"}
    (tmp_path / "all").mkdir()
    everything = load_matrix(fake_matrix(tmp_path / "all", sweep={"max_extensions": 1}))
    manifest = FakeRunner(everything, lambda config: ("diverged", 0.01)).run()
    assert manifest["sweeps"]["bf16-A"]["best"] is None
    assert manifest["sweeps"]["bf16-A"]["stopped"] == "no_usable_value"


def test_the_report_never_takes_a_diverged_trial_as_the_choice(tmp_path):
    """Where the report reads (or, for legacy manifests, re-derives) a sweep: a diverged trial with
    a low finite loss is never the best, and a diverged neighbour is worse for interiority."""
    from altgrad.experiments.report_sweeps import read_sweep

    def loss(config):
        return ("diverged", 0.01) if config.lr == 0.004 else fake_loss(config)
    manifest = FakeRunner(load_matrix(fake_matrix(tmp_path)), loss).run()
    read = read_sweep("bf16-A", manifest["sweeps"]["bf16-A"])
    assert read.settled and read.best == {"lr": 0.002} and read.interior == {"lr": True}
    # a record that names its diverged trial as best (a hand edit, an older planner): nothing is chosen
    forged = {**manifest["sweeps"]["bf16-A"], "best": {"lr": 0.004}, "best_loss": 0.01, "interior": {"lr": True}}
    forged["trials"] = [t | ({"final_val_loss": 0.01} if t["values"]["lr"] == 0.004 else {})
                        for t in forged["trials"]]
    read = read_sweep("bf16-A", forged)
    assert read.best is None and not read.settled and read.stopped == "no_usable_value"
    assert read.interior == {"lr": False} and math.isnan(read.resolution) and math.isnan(read.best_loss)
    # the legacy schema, whose interior the report derives itself
    legacy = {"key": "lr", "losses": {"0.001": 2.5, "0.002": 2.0, "0.004": 0.01},
              "statuses": {"0.001": "completed", "0.002": "completed", "0.004": "diverged"}, "best": 0.002}
    read = read_sweep("x", legacy)
    assert read.best == {"lr": 0.002} and read.interior == {"lr": True}  # the diverged 0.004 lost
    assert read.resolution == pytest.approx(0.5)  # to the completed neighbour only, not 0.01 - 2.0
    read = read_sweep("x", {**legacy, "best": 0.004})
    assert read.best is None and not read.settled and read.interior == {"lr": False}
    every = {"key": "lr", "losses": {"0.001": 0.01, "0.002": 0.02}, "best": None,
             "statuses": {"0.001": "diverged", "0.002": "diverged"}}
    assert read_sweep("x", every).best is None and not read_sweep("x", every).settled


def test_a_value_inherited_from_another_format_is_that_formats_tuned_choice(tmp_path):
    """``lr: {from: A, format: bf16}``: every FP8 cell at the BF16 baseline's tuned lr (the FP8
    recipe's practice); its trials and cells wait for that tuning, and the record names the group."""
    arms = {"A": {"optimizer": "adamw", "sweep": {"lr": [0.001, 0.002, 0.004]}},
            "Af": {"optimizer": "adamw", "lr": {"from": "A", "format": "bf16"}},
            "Cf": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic",
                   "lr": {"from": "A", "format": "bf16"}}}
    matrix = load_matrix(fake_matrix(tmp_path, arms=arms, cells=[{"formats": ["bf16"], "arms": ["A"]},
                                                                {"formats": ["E5M2"], "arms": ["Af", "Cf"]}]))
    assert {t.group: t.inherits for t in matrix.tunings()} == {"bf16-A": {}, "e5m2-Af": {"lr": "bf16-A"},
                                                               "e5m2-Cf": {"lr": "bf16-A"}}
    manifest = FakeRunner(matrix, fake_loss).run()
    assert manifest["sweeps"]["bf16-A"]["best"] == {"lr": 0.008}
    assert manifest["sweeps"]["e5m2-Af"]["inherited"]["lr"]["group"] == "bf16-A"
    for entry in manifest["cells"].values():
        if not entry.get("sweep") and entry["format"] == "E5M2":
            config = yaml.safe_load((tmp_path / "runs" / entry["folder"] / "config.yaml").read_text())
            assert config["lr"] == 0.008
    with pytest.raises(UserError, match=r"cell e5m2-Af: lr: \{from: A\} needs group e3m4-A-post-ln"):
        load_matrix(fake_matrix(tmp_path, arms={**arms, "Af": {"optimizer": "adamw", "lr": {
            "from": "A", "format": "E3M4", "layers": "post-ln"}}}, cells=[{"formats": ["bf16"], "arms": ["A"]},
                                                                          {"formats": ["E5M2"], "arms": ["Af"]}]))
