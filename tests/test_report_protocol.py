"""The report's protocol (DESIGN §5.1, §5.2; issue 19 §3): the t-test, Holm and the interaction
against hand computations; a fully established constructed comparison, then each condition of
an established claim broken on its own; the null control; legacy manifests; formats not
compared; a report written from run folders on disk."""

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.experiments.report import CHECKS, EFFECTS, Cell, Group, analyse, uniform_grid
from altgrad.experiments.report_files import write_report
from altgrad.experiments.report_sweeps import read_protocol, read_sweep
from altgrad.experiments.runs import RunRecord
from altgrad.experiments.stats import holm, interaction, paired_difference, t_test_p

T_975_2 = 4.302652729911275  # t_{0.975, 2}, from a table


def p_df2(t):
    """Two-sided p of Student's t with 2 degrees of freedom, closed form: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


# ---- stats against hand computations ----------------------------------------------------------
def test_the_paired_t_test_is_the_hand_computed_one():
    diffs = [-0.035, -0.05, -0.065]  # mean -0.05, sd 0.015
    t = -0.05 / (0.015 / math.sqrt(3))  # -5.7735
    assert t_test_p(diffs) == pytest.approx(p_df2(t))  # 0.0287
    assert t_test_p(diffs) == pytest.approx(0.028714, abs=1e-6)
    # one degree of freedom: p = 1 - (2/pi) atan(|t|); diffs 1, 3: mean 2, sd sqrt(2), t = 2
    assert t_test_p([1.0, 3.0]) == pytest.approx(1 - 2 / math.pi * math.atan(2.0))
    assert paired_difference({1: 2.0, 2: 4.0}, {1: 1.0, 2: 1.0}).p == pytest.approx(0.2951672353)
    assert math.isnan(t_test_p([0.1])) and math.isnan(t_test_p([]))  # n < 2: undefined
    assert t_test_p([0.5, 0.5, 0.5]) == 0.0  # sd 0, a non-zero constant difference
    assert t_test_p([0.1, 0.1, 0.1]) == pytest.approx(0.0, abs=1e-12)  # sd 1e-17 from rounding: t huge
    assert t_test_p([0.0, 0.0]) == 1.0  # nothing differs


def test_holm_is_the_hand_computed_step_down_adjustment():
    # sorted finite p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06)
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02],
                                                                      nan_ok=True)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 0.6 x 2 = 1.2 capped at 1; the next no lower
    assert holm([0.02]) == [0.02] and holm([]) == []
    assert all(math.isnan(p) for p in holm([math.nan, math.nan]))


def test_the_interaction_is_the_hand_computed_per_seed_difference_of_differences():
    gs = {1: 2.00, 2: 2.10, 3: 1.90, 4: 2.0, 5: 2.0}
    c = {1: 2.05, 2: 2.20, 3: 1.95, 4: math.nan, 5: 2.0}  # seed 4: C not finite; seed 5: A missing
    gm = {1: 2.10, 2: 2.10, 3: 2.00, 4: 2.0, 5: 2.0}
    a = {1: 2.08, 2: 2.12, 3: 1.99, 4: 2.0}
    # seed 1: (2.00 - 2.05) - (2.10 - 2.08) = -0.07; seed 2: -0.10 + 0.02 = -0.08; seed 3: -0.05 - 0.01 = -0.06
    result = interaction(gs, c, gm, a)
    assert result.n == 3 and result.per_seed == pytest.approx({1: -0.07, 2: -0.08, 3: -0.06})
    assert result.mean == pytest.approx(-0.07) and result.sd == pytest.approx(0.01)
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert (result.low, result.high) == pytest.approx((-0.07 - half, -0.07 + half))
    assert result.half_width == pytest.approx(half)
    assert result.p == pytest.approx(p_df2(-0.07 / (0.01 / math.sqrt(3))))


def test_uniform_grids_are_e0m7_and_e1m6():
    assert [f for f in ("E0M7", "E1M6", "E2M5", "E3M4", "E4M3", "E5M2", "E7M0") if uniform_grid(f)] == \
        ["E0M7", "E1M6"]
    assert not uniform_grid("bf16")


# ---- constructed matrices ---------------------------------------------------------------------
SEEDS = (1, 2, 3)
TUNING_SEED = 99
STEPS = 200
ARMS = {  # arm -> (optimizer, weight_storage, update_rounding, tag)
    "A": ("adamw", "master", "stochastic", "adamw"),
    "C": ("adamw", "format", "stochastic", "adamw-sr"),
    "D": ("manifold", "format", "stochastic", "manifold-sr"),
    "Dm": ("manifold", "master", "stochastic", "manifold-master"),
    "E": ("grid", "format", "stochastic", "grid-sr"),
    "Em": ("grid", "master", "stochastic", "grid-master"),
}
LAYERS = {"uniform": None, "post-ln": [{"layers": ["*.attn.c_attn", "*.mlp.c_fc"], "format": "{format}"}]}
#: Each arm's tuned lr: different on purpose (each group tuned its own), with each arm's grid_lr.
LR = {"A": 0.002, "C": 0.003, "D": 0.001, "Dm": 0.0015, "E": 0.001, "Em": 0.0012}


def run_config(fmt, arm, layers, seed, **changes):
    optimizer, storage, rounding, _ = ARMS[arm]
    policy = [{**r, "format": fmt} for r in LAYERS[layers]] if LAYERS[layers] else []
    config = {"preset": "tiny", "data": "data/x", "seed": seed, "max_steps": STEPS, "lr": LR[arm],
              "min_lr_ratio": 0.1, "warmup_ratio": 0.05, "weight_decay": 0.1, "batch_size": 4,
              "format": None if policy else fmt, "policy": policy, "optimizer": optimizer,
              "weight_storage": storage, "update_rounding": rounding, "grid_lr": 0.5 if arm not in "AC" else 1.0,
              "grid_lr_unit": "binade", "stats_interval": 10}
    return {**config, **changes}


def make_group(fmt, arm, losses, layers="uniform", **changes):
    tag = ARMS[arm][3]
    cells = []
    for seed, loss in losses.items():
        config = run_config(fmt, arm, layers, seed, **changes)
        summary = {"arm": tag, "status": "completed", "final_val_loss": loss, "steps": STEPS}
        record = RunRecord(f"{fmt}-{arm}-s{seed}", Path("."), config, summary,
                           [{"step": 10, "optim/rel_update_intended": 0.01, "optim/rel_update_realized": 0.008,
                             "optim/decay_applied": 0.5}, {"step": 20, "optim/rel_update_intended": 0.03}])
        cells.append(Cell(record.name, seed, "completed", loss, record))
    return Group(fmt, arm, layers, tag, cells)


def sweep_entry(fmt, arm, layers="uniform", **changes):
    keys = ["lr"] if arm in ("A", "C") else ["grid_lr", "lr"]
    best = {"lr": LR[arm]} if arm in ("A", "C") else {"grid_lr": 0.5, "lr": LR[arm]}
    entry = {"format": fmt, "arm": arm, "layers": layers, "keys": keys, "seed": TUNING_SEED, "max_steps": STEPS,
             "horizon": "final", "budget": 10, "spent": 7, "hit_budget": False,
             "trials": [{"values": {**best, k: v * f}, "folder": f"sweep-{k}{f}", "status": "completed",
                         "final_val_loss": 2.0 + abs(math.log2(f)) * 0.01}
                        for k, v in best.items() for f in (0.5, 1.0, 2.0)],
             "best": best, "best_loss": 2.0, "interior": {k: True for k in keys},
             "neighbours": {k: {"below": {"value": v / 2, "loss": 2.01, "status": "completed"},
                                "above": {"value": v * 2, "loss": None, "status": "diverged"}}
                            for k, v in best.items()},
             "resolution": 0.01, "stopped": "interior", "inherited": {}, "settled": True}
    return {**entry, **changes}


def name(fmt, arm, layers="uniform"):
    return f"{fmt.lower()}-{arm}" + ("" if layers == "uniform" else f"-{layers}")


def established_case():
    """E3M4 ManifoldAdamW with a clear negative interaction, and a passing null control on E1M6."""
    base = {1: 2.000, 2: 2.020, 3: 1.990}
    e3m4 = {"A": base, "C": {s: v + 0.05 for s, v in base.items()},
            "Dm": {s: v + 0.01 for s, v in base.items()},
            "D": {1: 2.000 - 0.000, 2: 2.020 + 0.002, 3: 1.990 - 0.002}}  # interaction -0.06, -0.058, -0.062
    groups = [make_group("E3M4", arm, losses) for arm, losses in e3m4.items()]
    null = {"C": {1: 2.30, 2: 2.31, 3: 2.29}, "D": {1: 2.301, 2: 2.309, 3: 2.290}}  # D - C: +0.001, -0.001, 0
    groups += [make_group("E1M6", arm, losses, layers="post-ln") for arm, losses in null.items()]
    manifest = {"sweeps": {name(g.format, g.arm, g.layers): sweep_entry(g.format, g.arm, g.layers) for g in groups},
                "protocol": {"tuning_seed": TUNING_SEED, "eval_seeds": list(SEEDS), "budget": 10, "horizon": "final",
                             "sweep_max_steps": STEPS, "cell_max_steps": STEPS, "max_extensions": 4, "refine": True,
                             "rounds": 2, "grid_lr_unit": "binade"}}
    return groups, manifest


def the_comparison(analysis, fmt="E3M4", optimizer="manifold"):
    return next(c for c in analysis.comparisons if (c.format, c.optimizer) == (fmt, optimizer))


def failed(comparison):
    return {c.name for c in comparison.checks if not c.ok}


def detail(comparison, check):
    return next(c.detail for c in comparison.checks if c.name == check)


def test_a_comparison_that_meets_every_condition_is_established_and_said():
    groups, manifest = established_case()
    analysis = analyse(groups, manifest)
    c = the_comparison(analysis)
    assert [check.name for check in c.checks] == list(CHECKS)
    assert c.established and failed(c) == set()
    assert c.interaction.per_seed == pytest.approx({1: -0.06, 2: -0.058, 3: -0.062})
    assert c.update_rule.mean == pytest.approx(0.01) and c.storage_adamw.mean == pytest.approx(0.05)
    assert c.storage_geometry.mean == pytest.approx(-0.01) and c.stored_vs_control.mean == pytest.approx(-0.05)
    assert c.resolution == 0.01 and c.holm_p == pytest.approx(c.interaction.p)
    assert analysis.null_control.status == "passes"
    short, claims = analysis.answer.split("\n\n", 1)
    assert short == "In short: E3M4 (ManifoldAdamW -0.0600) benefits from geometry-aware updates (interaction)."
    assert claims.startswith("E3M4 benefits from geometry-aware updates (ManifoldAdamW): the interaction "
                             "(stored - C) - (masters - A) is -0.0600")
    assert "established." in analysis.answer and "Not established" not in analysis.answer
    assert "grid_lr is in binade units" in analysis.answer
    assert f"the sweeps ran at the cells' own horizon ({STEPS} steps)" in analysis.answer
    assert "Null control (uniform grid, ManifoldAdamW stored vs C): passes" in analysis.answer
    # the null-control format lacks masters: it is listed as not compared, never ranked
    assert [n.text for n in analysis.not_compared] == ["E1M6 (post-ln) ManifoldAdamW (no ManifoldAdamW on FP32 "
                                                       "masters, no arm A)"]
    assert "Not compared (a group of the four is missing):\n\n- E1M6 (post-ln) ManifoldAdamW" in analysis.answer


def broken(mutate, fmt="E3M4", optimizer="manifold"):
    """The established case with one thing changed by ``mutate(groups, manifest)``."""
    groups, manifest = established_case()
    mutate(groups, manifest)
    analysis = analyse(groups, manifest)
    return analysis, the_comparison(analysis, fmt, optimizer)


def set_sweep(group, **changes):
    def mutate(groups, manifest):
        manifest["sweeps"][group].update(changes)
    return mutate


def test_an_optimum_at_the_edge_blocks_the_claim():
    analysis, c = broken(set_sweep("e3m4-C", interior={"lr": False}))
    assert not c.established and failed(c) == {"tuned_interior"}
    assert detail(c, "tuned_interior").startswith("C's lr = 0.003 is not interior (tried [0.0015, 0.003, "
                                                  "0.006])")
    short, claims = analysis.answer.split("\n\n", 1)
    assert short == ("In short: no format benefits from geometry-aware updates beyond noise; not established for "
                     "E3M4 (ManifoldAdamW -0.0600).")
    assert claims.startswith("Not established for any format:\n\n- E3M4 ManifoldAdamW")
    assert "C's lr = 0.003 is not interior" in analysis.answer


def test_a_budget_cap_that_stopped_the_sweep_is_named():
    _, c = broken(set_sweep("e3m4-D", interior={"grid_lr": False, "lr": True}, hit_budget=True, stopped="budget"))
    assert failed(c) == {"tuned_interior"}
    assert "D (stored)'s grid_lr = 0.5 is not interior" in detail(c, "tuned_interior")
    assert "the budget cap of 10 runs stopped it before its optimum was interior" in detail(c, "tuned_interior")


def test_an_unsettled_or_missing_sweep_blocks_the_claim():
    _, c = broken(set_sweep("e3m4-A", settled=False, best=None, stopped="running"))
    assert "tuned_interior" in failed(c)
    assert "A's sweep is not settled (stopped: running)" in detail(c, "tuned_interior")

    def drop(groups, manifest):
        del manifest["sweeps"]["e3m4-Dm"]
    _, c = broken(drop)
    assert "Dm (on masters) has no sweep: its values were not tuned" in detail(c, "tuned_interior")


def test_an_inherited_value_counts_with_its_sources_interior_flag():
    def inherit(interior):
        def mutate(groups, manifest):
            manifest["sweeps"]["e3m4-D"].update(keys=["grid_lr"], interior={"grid_lr": True}, inherited={
                "lr": {"from": "C", "group": "e3m4-C", "value": 0.003, "interior": interior}})
            for cell in groups[3].cells:  # D takes C's lr
                cell.run.config["lr"] = 0.003
        return mutate
    _, c = broken(inherit(True))
    assert c.established
    def inherit_only(groups, manifest):  # a group that tunes nothing of its own: best is None, settled
        inherit(True)(groups, manifest)
        manifest["sweeps"]["e3m4-D"].update(keys=[], interior={}, best=None, trials=[], resolution=math.nan)
    _, c = broken(inherit_only)
    assert c.established and c.resolution == 0.01  # its resolution is its source's, already in the comparison
    _, c = broken(inherit(False))
    assert failed(c) == {"tuned_interior"}
    assert detail(c, "tuned_interior") == ("D (stored)'s lr = 0.003, inherited from e3m4-C, is not interior "
                                           "there")


def test_a_short_tuning_horizon_blocks_the_claim_and_the_answer_says_so():
    def short(groups, manifest):
        for entry in manifest["sweeps"].values():
            entry.update(horizon="short", max_steps=50)
        manifest["protocol"].update(horizon="short", sweep_max_steps=50)
    analysis, c = broken(short)
    assert failed(c) == {"same_horizon"}
    assert "C was tuned on a short horizon (50 steps; its cells run 200)" in detail(c, "same_horizon")
    assert f"the answer rests on a tuning horizon of 50 steps, shorter than the cells' {STEPS}" in analysis.answer


def test_a_sweep_at_other_steps_than_its_cells_blocks_the_claim_even_if_called_final():
    _, c = broken(set_sweep("e3m4-A", max_steps=100))
    assert failed(c) == {"same_horizon"}
    assert detail(c, "same_horizon") == "A was tuned at 100 steps, its cells run 200"


def test_unequal_or_unrecorded_budgets_block_the_claim():
    _, c = broken(set_sweep("e3m4-C", budget=8))
    assert failed(c) == {"equal_budget"}
    assert detail(c, "equal_budget") == ("unequal tuning budgets: D (stored) 10, C 8, Dm (on masters) 10, A 10 runs")
    _, c = broken(set_sweep("e3m4-A", budget=None))
    assert failed(c) == {"equal_budget"} and detail(c, "equal_budget") == "A's tuning budget is not recorded"


def test_tuning_on_an_evaluation_seed_blocks_the_claim():
    _, c = broken(set_sweep("e3m4-Dm", seed=2))
    assert failed(c) == {"tuning_seed_apart"}
    assert detail(c, "tuning_seed_apart") == "Dm (on masters) was tuned on seed 2, an evaluation seed"


def test_a_geometry_arm_that_kept_a_preset_lr_beside_a_tuned_control_is_not_paired():
    """The classic unfair case: D tunes only grid_lr and keeps lr 1e-3, C tuned its lr to 3e-3."""
    _, c = broken(set_sweep("e3m4-D", keys=["grid_lr"], interior={"grid_lr": True}, best={"grid_lr": 0.5}))
    assert failed(c) == {"paired"}
    assert detail(c, "paired").startswith("D (stored) and C differ in more than their arms and the "
                                          "keys both tuned (seed 1: lr 0.001 vs 0.003)")


def test_any_other_setting_that_differs_unpairs_the_runs():
    def decay(groups, manifest):
        for cell in groups[2].cells:  # Dm
            cell.run.config["weight_decay"] = 0.0
    _, c = broken(decay)
    assert failed(c) == {"paired"}
    assert detail(c, "paired").startswith("Dm (on masters) and A differ")  # and gs vs gm
    assert "D (stored) and Dm (on masters) differ" in detail(c, "paired")
    assert "weight_decay 0.0 vs 0.1" in detail(c, "paired")

    def policy(groups, manifest):  # a precision setting differs within one format: not paired either
        for cell in groups[1].cells:  # C
            cell.run.config["grad_format"] = "E4M3"
    _, c = broken(policy)
    assert failed(c) == {"paired"} and "grad_format None vs 'E4M3'" in detail(c, "paired")


def test_one_paired_seed_cannot_establish_anything():
    def one_seed(groups, manifest):
        for g in groups[:4]:
            g.cells = g.cells[:1]
    analysis, c = broken(one_seed)
    assert "enough_seeds" in failed(c) and detail(c, "enough_seeds").startswith("1 paired seed with all four")
    assert failed(c) <= {"enough_seeds", "significant", "beyond_noise"}


def test_holm_over_the_comparisons_can_block_what_one_alone_would_establish():
    """Interaction -0.035, -0.05, -0.065: raw p = 0.0287, established alone; two such comparisons
    have Holm-adjusted p = 0.0574 each, and only `significant` fails."""
    diffs = {1: -0.035, 2: -0.05, 3: -0.065}

    def second_format(copies):
        def mutate(groups, manifest):
            base = {1: 2.0, 2: 2.02, 3: 1.99}
            made = []
            for fmt in copies:
                for arm, losses in (("A", base), ("C", base), ("Dm", base),
                                    ("D", {s: v + diffs[s] for s, v in base.items()})):
                    made.append(make_group(fmt, arm, losses))
                    manifest["sweeps"][name(fmt, arm)] = sweep_entry(fmt, arm, resolution=0.0001)
            groups[:4] = [g for g in made if g.format == "E3M4"]
            groups += [g for g in made if g.format != "E3M4"]
        return mutate
    analysis, alone = broken(second_format(["E3M4"]))
    assert alone.interaction.p == pytest.approx(0.028714, abs=1e-6) and alone.established
    analysis, c = broken(second_format(["E3M4", "E2M5"]))
    assert c.holm_p == pytest.approx(2 * 0.028714, abs=2e-6)
    assert failed(c) == {"significant"}
    assert detail(c, "significant").startswith("Holm-adjusted p = 0.0574, not below 0.05 (raw p = 0.0287, over 2 "
                                               "comparisons)")
    assert failed(the_comparison(analysis, "E2M5")) == {"significant"}


def test_an_effect_within_the_tuning_resolution_is_not_established():
    _, c = broken(set_sweep("e3m4-A", resolution=0.1))
    assert failed(c) == {"beyond_noise"} and c.resolution == 0.1
    assert detail(c, "beyond_noise").startswith("|interaction| 0.0600 is within its noise floor: interval "
                                                "half-width 0.0050 + tuning resolution 0.1000")
    _, c = broken(set_sweep("e3m4-A", resolution=math.nan))
    assert failed(c) == {"beyond_noise"} and "resolution is unknown" in detail(c, "beyond_noise")


def test_without_a_passing_null_control_nothing_is_established():
    def no_null(groups, manifest):
        del groups[4:]
    analysis, c = broken(no_null)
    assert failed(c) == {"null_control"} and analysis.null_control.status == "absent"
    assert detail(c, "null_control").startswith("the null control absent: the matrix has no uniform-grid format")
    assert "Null control: absent" in analysis.answer and "the protocol is suspect" in analysis.answer

    def disagree(groups, manifest):
        for cell in groups[5].cells:  # E1M6 D
            cell.final_val_loss += 0.05
    analysis, c = broken(disagree)
    assert failed(c) == {"null_control"} and analysis.null_control.status == "fails"
    assert "D - C = +0.0500 exceeds its interval half-width" in detail(c, "null_control")


def test_the_null_control_passes_fails_or_is_not_evaluable():
    groups, manifest = established_case()
    null = analyse(groups, manifest).null_control
    assert null.status == "passes" and [n.status for n in null.checks] == ["passes"]
    check = null.checks[0]
    assert (check.format, check.layers, check.geometry.arm, check.control.arm) == ("E1M6", "post-ln", "D", "C")
    assert check.paired.per_seed == pytest.approx({1: 0.001, 2: -0.001, 3: 0.0})
    # agreeing losses with an optimum at the edge: fails
    manifest["sweeps"]["e1m6-D-post-ln"]["interior"] = {"grid_lr": False, "lr": True}
    null = analyse(groups, manifest).null_control
    assert null.status == "fails" and "D's grid_lr = 0.5 is not interior" in null.checks[0].reasons[0]
    # one seed: not evaluable, and the protocol is suspect
    groups, manifest = established_case()
    for g in groups[4:]:
        g.cells = g.cells[:1]
    analysis = analyse(groups, manifest)
    assert analysis.null_control.status == "not evaluable"
    assert failed(the_comparison(analysis)) == {"null_control"}
    # the resolution widens the agreement: D - C = +0.02 on every seed passes with a resolution of 0.03
    groups, manifest = established_case()
    for cell in groups[5].cells:
        cell.final_val_loss = groups[4].cells[[c.seed for c in groups[4].cells].index(cell.seed)].final_val_loss + 0.02
    assert analyse(groups, manifest).null_control.status == "fails"
    for group in ("e1m6-D-post-ln", "e1m6-C-post-ln"):
        manifest["sweeps"][group]["resolution"] = 0.03
    assert analyse(groups, manifest).null_control.status == "passes"


def test_one_established_and_one_blocked_comparison_are_both_said():
    """The issue's closing case: E3M4 established, E5M2 blocked by an optimum at the edge."""
    def add_e5m2(groups, manifest):
        base = {1: 2.1, 2: 2.12, 3: 2.09}
        losses = {"A": base, "C": {s: v + 0.05 for s, v in base.items()}, "Dm": base,
                  "D": {1: 2.1, 2: 2.121, 3: 2.089}}
        for arm, values in losses.items():
            groups.append(make_group("E5M2", arm, values))
            manifest["sweeps"][name("E5M2", arm)] = sweep_entry("E5M2", arm)
        manifest["sweeps"]["e5m2-D"]["interior"] = {"grid_lr": False, "lr": True}
    analysis, c = broken(add_e5m2)
    assert c.established
    e5m2 = the_comparison(analysis, "E5M2")
    assert failed(e5m2) == {"tuned_interior"}
    assert [x.format for x in analysis.comparisons] == ["E3M4", "E5M2"]  # the established first
    assert analysis.answer.startswith("In short: E3M4 (ManifoldAdamW -0.0600) benefits from geometry-aware updates "
                                      "(interaction); not established for E5M2 (ManifoldAdamW -0.0500).")
    assert analysis.answer.split("\n\n", 1)[1].startswith("E3M4 benefits from geometry-aware updates (ManifoldAdamW)")
    assert "Not established:\n\n- E5M2 ManifoldAdamW, interaction -0.0500" in analysis.answer
    assert "D (stored)'s grid_lr = 0.5 is not interior" in analysis.answer


def test_every_effect_beside_the_question_is_a_claim_under_the_same_checks():
    """In the established case: C - A = +0.05 on every seed is beyond its noise floor (half-width
    0 + resolution 0.01): established; Dm - A = +0.01 exactly equals it (not beyond); D - Dm =
    -0.010 with half-width 0.0050 + 0.01: within. Each names its own arms and checks."""
    groups, manifest = established_case()
    analysis = analyse(groups, manifest)
    c = the_comparison(analysis)
    assert list(c.effects) == list(EFFECTS)[:4] and c.question is c.effects["interaction"]  # no ECO, no C-kahan
    verdicts = {name: e.established for name, e in c.effects.items()}
    assert verdicts == {"interaction": True, "update_rule": False, "storage_adamw": True, "storage_geometry": False}
    for name in ("update_rule", "storage_adamw", "storage_geometry"):
        assert [check.name for check in c.effects[name].checks] == list(CHECKS)
    assert failed(c.effects["update_rule"]) == {"beyond_noise"}
    assert c.effects["update_rule"].reasons == ["|Dm - A| 0.0100 is within its noise floor: interval half-width "
                                                "0.0000 + tuning resolution 0.0100"]
    assert failed(c.effects["storage_geometry"]) == {"beyond_noise"}
    half = T_975_2 * 0.002 / math.sqrt(3)
    assert c.effects["storage_geometry"].noise_floor == pytest.approx(half + 0.01)
    assert [c.label(e) for e in c.effects.values()] == [
        "E3M4 ManifoldAdamW interaction ((D - C) - (Dm - A))", "E3M4 ManifoldAdamW update rule (Dm - A)",
        "E3M4 storage under AdamW (C - A)", "E3M4 storage under ManifoldAdamW (D - Dm)"]
    assert ("Beside the question, under the same checks (Holm over each effect's comparisons):\n\n- E3M4 storage under "
            "AdamW (C - A) +0.0500 [+0.0500, +0.0500] over n=3 seeds, Holm-adjusted p = ") in analysis.answer
    assert "E3M4 ManifoldAdamW update rule (Dm - A) +0.0100 [+0.0100, +0.0100] over n=3 seeds: not established " \
           "(beyond_noise)" in analysis.answer


def test_an_effect_is_gated_only_by_the_groups_it_involves():
    """D's grid_lr at the edge blocks the interaction and D - Dm, never Dm - A or C - A: one
    comparison blocked, one established, in one matrix (the issue's closing case, constructed)."""
    analysis, c = broken(set_sweep("e3m4-D", interior={"grid_lr": False, "lr": True}))
    assert failed(c) == {"tuned_interior"}
    assert failed(c.effects["storage_geometry"]) == {"tuned_interior", "beyond_noise"}
    assert "tuned_interior" not in failed(c.effects["update_rule"])
    assert c.effects["storage_adamw"].established
    assert analysis.answer.split("\n\n", 1)[1].startswith("Not established for any format:\n\n- E3M4 ManifoldAdamW, "
                                                         "interaction -0.0600")
    assert "E3M4 storage under AdamW (C - A) +0.0500" in analysis.answer and ": established" in analysis.answer

    def decay(groups, manifest):  # Dm differs in weight decay: unpairs Dm - A and D - Dm, not C - A
        for cell in groups[2].cells:
            cell.run.config["weight_decay"] = 0.0
    _, c = broken(decay)
    assert "paired" in failed(c.effects["update_rule"]) and "paired" in failed(c.effects["storage_geometry"])
    assert detail(c.effects["update_rule"], "paired").startswith("Dm (on masters) and A differ")
    assert "D (stored)" not in detail(c.effects["update_rule"], "paired")  # only its own pair is checked
    assert c.effects["storage_adamw"].established

    def budget(groups, manifest):  # only Dm's budget differs: the interaction and Dm's effects
        manifest["sweeps"]["e3m4-Dm"]["budget"] = 8
    _, c = broken(budget)
    assert detail(c.effects["update_rule"], "equal_budget") == "unequal tuning budgets: Dm (on masters) 8, A 10 runs"
    assert "equal_budget" not in failed(c.effects["storage_adamw"])


def test_holm_runs_within_each_effect_over_its_distinct_comparisons():
    """ManifoldAdamW and GridOptim on one format: two interactions (Holm over 2), but C - A is one
    comparison shared by both (Holm over 1, said once)."""
    def add_grid(groups, manifest):
        base = {1: 2.000, 2: 2.020, 3: 1.990}
        for arm, losses in (("Em", {s: v + 0.01 for s, v in base.items()}),
                            ("E", {1: 2.000, 2: 2.022, 3: 1.988})):
            groups.append(make_group("E3M4", arm, losses))
            manifest["sweeps"][name("E3M4", arm)] = sweep_entry("E3M4", arm)
    analysis, manifold = broken(add_grid)
    grid = the_comparison(analysis, optimizer="grid")
    assert manifold.effects["interaction"].family == grid.effects["interaction"].family == 2
    raw = [manifold.interaction.p, grid.interaction.p]
    assert sorted([manifold.holm_p, grid.holm_p]) == pytest.approx(sorted(holm(raw)))
    shared = manifold.effects["storage_adamw"]
    assert shared.family == 1 and shared.holm_p == pytest.approx(shared.paired.p)
    assert grid.effects["storage_adamw"].holm_p == shared.holm_p
    assert analysis.answer.count("storage under AdamW (C - A)") == 1
    assert "E3M4 storage under GridOptim (E - Em)" in analysis.answer


def test_geometry_that_hurts_beyond_noise_is_established_as_harm_not_benefit():
    def flip(groups, manifest):
        for cell in groups[3].cells:  # D: +0.06 above C instead of at A
            cell.final_val_loss += 0.11
    analysis, c = broken(flip)
    assert c.established and c.interaction.mean == pytest.approx(0.05)
    short, claims = analysis.answer.split("\n\n", 1)
    assert short == ("In short: no format benefits from geometry-aware updates beyond noise; E3M4 (ManifoldAdamW "
                     "+0.0500) is hurt by them: storing weights on the grid costs more under the geometry rule than "
                     "under AdamW.")
    assert claims.startswith("E3M4 is hurt by storing weights on its grid under geometry-aware updates, "
                             "more than under AdamW (ManifoldAdamW)")
    assert "benefits" not in claims


def test_formats_without_a_group_of_the_four_are_not_compared():
    groups, manifest = established_case()
    e5m2 = [make_group("E5M2", "C", {1: 2.1, 2: 2.2}), make_group("E5M2", "E", {1: 2.0, 2: 2.1}),
            make_group("E5M2", "A", {1: 2.0, 2: 2.1})]
    e4m3 = [make_group("E4M3", "A", {1: 2.0, 2: 2.1})]
    analysis = analyse(groups + e5m2 + e4m3, manifest)
    texts = [n.text for n in analysis.not_compared]
    assert "E5M2 GridOptim (no GridOptim on FP32 masters)" in texts
    assert "E4M3 geometry (no geometry stored, no geometry on masters, no arm C)" in texts
    assert [(c.format, c.optimizer) for c in analysis.comparisons] == [("E3M4", "manifold")]
    assert the_comparison(analysis).holm_p == pytest.approx(the_comparison(analysis).interaction.p)  # m = 1


def test_without_any_comparison_there_is_no_answer():
    analysis = analyse([make_group("E5M2", "A", {1: 2.1, 2: 2.2}), make_group("E5M2", "C", {1: 2.2, 2: 2.3})])
    assert analysis.answer.startswith("No answer: no format has the four groups the question compares")
    assert "Tuning: grid_lr is in binade units" not in analysis.answer  # no geometry run
    assert "no group was tuned" in analysis.answer


def test_step_sizes_are_means_over_seeds_of_run_means_and_absent_metrics_are_nan():
    groups, manifest = established_case()
    analysis = analyse(groups, manifest)
    sizes = analysis.step_sizes[groups[0].key]
    assert sizes["optim/rel_update_intended"]["mean"] == pytest.approx(0.02)  # (0.01 + 0.03) / 2 per run
    assert sizes["optim/rel_update_realized"]["mean"] == pytest.approx(0.008)
    assert sizes["optim/decay_applied"] == {"mean": 0.5, "n": 3, "per_seed": {1: 0.5, 2: 0.5, 3: 0.5}}
    for cell in groups[0].cells:
        cell.run.metrics.clear()
    sizes = analyse(groups, manifest).step_sizes[groups[0].key]
    assert sizes["optim/decay_applied"]["n"] == 0 and math.isnan(sizes["optim/decay_applied"]["mean"])


# ---- legacy manifests -------------------------------------------------------------------------
LEGACY = {  # the schema of docs/results/report.json's sweeps (before the tuning protocol)
    "key": "lr", "losses": {"0.0005": 2.376, "0.001": 2.236, "0.002": 2.089},
    "statuses": {"0.0005": "completed", "0.001": "completed", "0.002": "completed"},
    "best": 0.002, "seed": 1337, "max_steps": 500}


def test_a_legacy_sweep_is_read_with_interior_resolution_and_horizon_derived():
    sweep = read_sweep("e5m2-A", LEGACY, cell_max_steps=2000)
    assert sweep.legacy and sweep.keys == ("lr",) and sweep.best == {"lr": 0.002}
    assert sweep.tried("lr") == [0.0005, 0.001, 0.002] and sweep.interior == {"lr": False}  # best at the max
    assert sweep.horizon == "short" and sweep.budget is None and sweep.stopped is None
    assert sweep.resolution == pytest.approx(2.236 - 2.089)  # the only neighbour
    inner = read_sweep("e5m2-D", {"key": "grid_lr", "losses": {"0.25": 2.1, "0.5": 2.0, "1.0": 2.3},
                                  "statuses": {"0.25": "completed", "0.5": "completed", "1.0": "diverged"},
                                  "best": 0.5, "seed": 7, "max_steps": 2000}, 2000)
    assert inner.interior == {"grid_lr": True} and inner.horizon == "final"
    assert inner.resolution == pytest.approx(0.1)  # min(2.1 - 2.0, 2.3 - 2.0)
    edge_failed = read_sweep("x", {**LEGACY, "statuses": {**LEGACY["statuses"], "0.002": "failed"},
                                   "best": 0.001, "losses": {"0.0005": 2.5, "0.001": 2.2, "0.002": None}}, 500)
    assert edge_failed.interior == {"lr": False}  # a neighbour with no loss that did not diverge: not worse
    assert read_sweep("x", None).settled is False  # an unreadable entry: unsettled, not a crash


def test_a_legacy_manifest_still_reports_and_establishes_nothing():
    groups, manifest = established_case()
    legacy = {"cells": {}, "sweeps": {name(g.format, g.arm, g.layers): {
        "key": "lr", "losses": {"0.001": 2.1, "0.002": 2.0, "0.004": 2.2}, "best": 0.002, "seed": 1,
        "max_steps": 50} for g in groups}}
    analysis = analyse(groups, legacy)
    c = the_comparison(analysis)
    assert not analysis.protocol.recorded and analysis.protocol.budget is None
    assert analysis.protocol.grid_lr_unit == "binade"  # from the runs' configs
    assert {"same_horizon", "equal_budget", "tuning_seed_apart"} <= failed(c)
    assert "tuned_interior" not in failed(c)  # 0.002 has worse neighbours on both sides
    assert "A's tuning budget is not recorded" in detail(c, "equal_budget")
    assert "the answer rests on a tuning horizon of 50 steps, shorter than the cells' 200" in analysis.answer
    assert "a manifest from before the tuning protocol" in analysis.answer


def test_the_legacy_report_sweeps_are_all_read():
    data = json.loads((Path(__file__).parent / "data/legacy_report_sweeps.json").read_text())
    sweeps = {g: read_sweep(g, raw, 2000) for g, raw in data["sweeps"].items()}
    edges = [g for g, s in sweeps.items() if not s.interior[s.keys[0]]]
    assert len(sweeps) == 16 and len(edges) == 14  # the count: 14 of 16 chose the edge
    assert sorted(set(sweeps) - set(edges)) == ["e5m2-D", "e5m2-E"]
    assert {s.horizon for s in sweeps.values()} == {"short"}


def test_the_committed_answer_rests_on_interior_optima_at_the_final_horizon():
    """docs/results/report.json: every tuned group of the committed answer chose an interior value,
    at the cells' horizon, on the tuning seed, within the one budget (issue 22's done criterion)."""
    data = json.loads((Path(__file__).parent.parent / "docs/results/report.json").read_text())
    tuned = [t for t in data["tuning"] if t["keys"]]
    assert tuned and all(all(t["interior"].values()) for t in tuned)
    assert {t["horizon"] for t in tuned} == {"final"} and len({t["seed"] for t in data["tuning"]}) == 1
    assert {t["budget"] for t in data["tuning"]} == {data["protocol"]["budget"]}
    assert data["null_control"]["status"] == "passes"


# ---- a report written from run folders ----------------------------------------------------------
def write_runs(root, groups, manifest):
    """Run folders (config, metrics, summary) and a manifest for constructed groups."""
    cells = {}
    for g in groups:
        for cell in g.cells:
            folder = root / cell.folder
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(yaml.safe_dump(cell.run.config))
            metrics = [{"step": 0, "val_loss": 3.0}, *cell.run.metrics,
                       {"step": STEPS, "val_loss": cell.final_val_loss}]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
            (folder / "summary.json").write_text(json.dumps(cell.run.summary | {"final_val_loss":
                                                                                cell.final_val_loss}))
            cells[cell.folder] = {"name": cell.folder, "format": g.format, "arm": g.arm, "layers": g.layers,
                                  "seed": cell.seed, "folder": cell.folder, "status": "completed", "sweep": None}
    (root / "manifest.json").write_text(json.dumps({**manifest, "cells": cells, "matrix": "m.yaml",
                                                    "runs_dir": str(root)}))


def test_report_files_and_cli_from_run_folders(tmp_path):
    groups, manifest = established_case()
    blocked = copy.deepcopy(manifest)
    write_runs(tmp_path / "runs", groups, manifest)
    analysis, files = write_report(tmp_path / "runs", tmp_path / "out")
    assert the_comparison(analysis).established
    data = json.loads(files["report.json"].read_text())
    comparison = data["comparisons"][0]
    assert comparison["established"] and comparison["reasons"] == []
    assert comparison["interaction"]["per_seed"] == pytest.approx({"1": -0.06, "2": -0.058, "3": -0.062})
    assert [c["name"] for c in comparison["checks"]] == list(CHECKS) == data["checks"]
    assert comparison["groups"]["gs"] == {"arm": "D", "arm_tag": "manifold-sr", "group": "e3m4-D"}
    effects = comparison["effects"]
    assert list(effects) == list(EFFECTS)[:4] and effects["interaction"]["established"]
    assert effects["storage_adamw"]["label"] == "E3M4 storage under AdamW (C - A)"
    assert effects["storage_adamw"]["established"] and effects["storage_adamw"]["family"] == 1
    assert effects["update_rule"]["reasons"][0].startswith("|Dm - A| 0.0100 is within its noise floor")
    assert data["null_control"]["status"] == "passes" and data["protocol"]["grid_lr_unit"] == "binade"
    assert {t["group"] for t in data["tuning"]} == set(manifest["sweeps"])
    assert data["not_compared"] == [{"format": "E1M6", "layers": "post-ln", "optimizer": "manifold",
                                     "missing": ["ManifoldAdamW on FP32 masters", "arm A"]}]
    group = next(g for g in data["groups"] if g["group"] == "e3m4-A")
    assert group["step_sizes"]["optim/rel_update_intended"]["mean"] == pytest.approx(0.02)
    markdown = files["report.md"].read_text()
    for heading in ("## The question", "### Beside it", "## Null control", "## Tuning", "## Step sizes",
                    "## Every cell"):
        assert heading in markdown
    assert "| E3M4 storage under AdamW (C - A) | storing weights on the grid, under AdamW | +0.0500 " in markdown
    assert "- E3M4 ManifoldAdamW update rule (Dm - A): `beyond_noise`: |Dm - A| 0.0100" in markdown
    assert "| e3m4-C | lr | lr: 0.0015, 0.003, 0.006 | lr = 0.003 | lr yes | 7 / 10 | interior |" in markdown
    assert data["answer"] in markdown

    blocked["sweeps"]["e3m4-C"]["interior"] = {"lr": False}
    write_runs(tmp_path / "runs2", groups, blocked)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs2"), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert "not established" in result.output and "tuned_interior" in result.output
    assert "E3M4 storage under AdamW (C - A)" in result.output and "established" in result.output
    data = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert data["comparisons"][0]["reasons"][0].startswith("C's lr = 0.003 is not interior")
    assert "| e3m4-C | lr | lr: 0.0015, 0.003, 0.006 | lr = 0.003 | lr no |" in \
        (tmp_path / "out2" / "report.md").read_text()


def test_the_protocol_of_a_manifest_is_read_back():
    groups, manifest = established_case()
    protocol = read_protocol(manifest, groups, {})
    assert protocol.recorded and protocol.tuning_seed == TUNING_SEED and protocol.eval_seeds == SEEDS
    assert protocol.budget == 10 and protocol.horizon == "final" and protocol.rounds == 2


def test_the_limits_name_the_data_each_run_recorded_and_admit_what_was_not():
    groups, manifest = established_case()
    for g in groups:
        for cell in g.cells:
            cell.run.config.update(n_layer=2, n_embd=32, block_size=32, data=None)
            cell.run.summary["data"] = {"dir": "data/builtin", "name": "builtin", "tokenizer": "byte",
                                        "train_tokens": 455268}
    limits = analyse(groups, manifest).limits
    assert limits.startswith("It holds for a 2-layer, 32-wide GPT (block 32), trained 200 steps on data/builtin "
                             "(byte tokens), 3 seeds")
    for g in groups:  # runs from before the record, no configured folder: said, never guessed
        for cell in g.cells:
            del cell.run.summary["data"]
    assert "on data/eurlex or the built-in corpus (not recorded) (unknown tokens)" in analyse(groups, manifest).limits


def test_against_bf16_a_tuned_key_both_tuned_is_not_a_mismatch_but_any_other_setting_is():
    groups, manifest = established_case()
    bf16 = make_group("bf16", "A", {1: 1.9, 2: 1.91, 3: 1.92}, format=None)
    for cell in bf16.cells:
        cell.run.config["lr"] = 0.006  # tuned to another value than E3M4's A: the same protocol, no note
    manifest["sweeps"]["bf16-A"] = sweep_entry("bf16", "A")
    notes = analyse(groups + [bf16], manifest).notes
    assert not [n for n in notes if n.startswith("Against the BF16 baseline")]
    del manifest["sweeps"]["bf16-A"]  # an untuned baseline at another lr: said
    notes = analyse(groups + [bf16], manifest).notes
    assert any(n.startswith("Against the BF16 baseline") and "(lr 0.002 vs 0.006)" in n for n in notes)


def test_the_report_lists_the_code_versions_of_its_cells_and_warns_when_they_are_mixed():
    groups, manifest = established_case()
    same = {"altgrad": "0.1.0", "commit": "a" * 40, "dirty": False, "torch": "2.13.0+cpu", "python": "3.11.7"}
    for g in groups:
        for cell in g.cells:
            cell.run.summary["code"] = dict(same)
    analysis = analyse(groups, manifest)
    assert not [n for n in analysis.notes if "code version" in n or "uncommitted" in n]
    groups[0].cells[0].run.summary["code"] = {**same, "commit": "b" * 40, "dirty": True}
    del groups[1].cells[0].run.summary["code"]  # a run from before the record
    analysis = analyse(groups, manifest)
    assert ("The cells come from 3 code versions (altgrad 0.1.0 @ aaaaaaaa, torch 2.13.0+cpu: 16 cells; "
            "altgrad 0.1.0 @ bbbbbbbb (dirty), torch 2.13.0+cpu: 1 cell; not recorded: 1 cell)") in analysis.notes[0]
    assert analysis.notes[1].startswith("1 cell ran from a checkout with uncommitted changes")



def test_the_plain_sentence_names_benefit_harm_the_open_formats_and_the_rule_alone():
    from types import SimpleNamespace as NS

    from altgrad.experiments.report import _in_short

    def comparison(where, optimizer, interaction, established, rule=0.0, rule_established=False):
        return NS(where=where, optimizer_name=optimizer, interaction=NS(mean=interaction), established=established,
                  effects={"update_rule": NS(established=rule_established, paired=NS(mean=rule))})

    passes = NS(status="passes")
    found = [comparison("E5M2", "GridOptim", 0.093, True), comparison("E5M2", "ManifoldAdamW", 0.1006, True),
             comparison("E3M4", "ManifoldAdamW", 0.0099, False, -0.0362, True),
             comparison("E4M3", "ManifoldAdamW", 0.0353, False)]
    assert _in_short(found, passes) == (
        "In short: no format benefits from geometry-aware updates beyond noise; E5M2 (GridOptim +0.0930, "
        "ManifoldAdamW +0.1006) is hurt by them: storing weights on the grid costs more under the geometry rule "
        "than under AdamW; not established for E3M4 (ManifoldAdamW +0.0099) and E4M3 (ManifoldAdamW +0.0353). "
        "The geometry update rule itself, on FP32 masters against arm A, is established at E3M4 (ManifoldAdamW "
        "-0.0362): that effect is the rule's, not the format's.")
    two = [comparison("E3M4", "GridOptim", -0.05, True), comparison("E4M3", "GridOptim", -0.04, True)]
    assert _in_short(two, passes) == ("In short: E3M4 (GridOptim -0.0500) and E4M3 (GridOptim -0.0400) benefit from "
                                      "geometry-aware updates (interaction).")
    assert _in_short(two, NS(status="fails")) == "In short: nothing is established, because the null control fails."
    assert _in_short(two, NS(status="absent")).endswith("because the null control is absent.")
