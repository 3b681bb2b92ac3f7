"""Where a run fails (experiments/failure_stage.py, issue 23 §3) on constructed metric streams:
each rule crossing alone, exactly at its threshold (not crossed), missing and non-finite values
(not crossed, and said), the rules that apply only to stored weights or with an arm-A partner,
ties between stages and between rules, a run that fails nowhere, and the vote over seeds."""

import math

import pytest

from altgrad.experiments.failure_stage import (NAMES, RULES, STAGES, Attribution, Thresholds, aggregate, attribute,
                                               judge)
from altgrad.training.config import TrainConfig

#: Thresholds whose derived quantities (a ratio, a loss difference) can sit exactly on them in binary.
EXACT = Thresholds(storage_gap=0.0625)
QUIET = {"quant/overflow_rate/weight": 0.0, "quant/overflow_rate/activation": 0.0,
         "quant/underflow_rate/weight": 0.0, "quant/underflow_rate/activation": 0.0,
         "quant/snr_db/weight": 30.0, "quant/snr_db/activation": 30.0, "quant/dead_fraction_sampled": 0.0,
         "quant/overflow_rate/gradient": 0.0, "quant/underflow_rate/gradient": 0.0, "quant/snr_db/gradient": 30.0,
         "grad_cos_sim/mean": 0.99, "optim/stall_ratio": 0.5, "quant/bit_stall_rate": 0.5,
         "optim/rel_update_realized": 0.25, "optim/rel_update_intended": 0.25, "val_loss": 3.0}
REFERENCE = [{"step": s, "val_loss": 3.0} for s in (0, 10, 20, 30)]


def stream(changes=None, steps=(0, 10, 20, 30)):
    """Quiet records at ``steps``; ``changes``: step -> {metric: value} on top."""
    changes = changes or {}
    return [{"step": s, **QUIET, **changes.get(s, {})} for s in steps]


def at(rule, thresholds=EXACT):
    """The rule's quantity exactly at its threshold, as record values."""
    t = getattr(thresholds, rule.threshold)
    if rule.over:
        return {rule.metric: t * 0.25, rule.over: 0.25}
    if rule.paired:
        return {rule.metric: 3.0 + t}
    return {rule.metric: t}


def beyond(rule, thresholds=EXACT):
    t = getattr(thresholds, rule.threshold)
    step = 0.01 * (1 if rule.above else -1)
    if rule.over:
        return {rule.metric: (t + step) * 0.25, rule.over: 0.25}
    if rule.paired:
        return {rule.metric: 3.0 + t + step}
    return {rule.metric: t + step}


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_each_rule_crosses_strictly_beyond_its_threshold_and_names_its_stage(rule):
    stored = rule.storage != "master"  # where the rule applies
    records = stream({10: at(rule), 20: beyond(rule)})  # exactly at the threshold at step 10: no crossing
    result = attribute(records, EXACT, stored=stored, reference=REFERENCE)
    assert (result.stage, result.step) == (rule.stage, 20)
    first = result.stages[rule.stage].first
    assert first.rule is rule and first.step == 20
    assert [s for s in STAGES if result.stages[s].status == "crossed"] == [rule.stage]
    only_at = attribute(stream({10: at(rule), 20: at(rule)}), EXACT, stored=stored, reference=REFERENCE)
    assert only_at.stage == "none" and judge(rule, stream({10: at(rule)}), EXACT, stored=stored,
                                             reference={s: 3.0 for s in (0, 10, 20, 30)}).status == "not crossed"


def test_the_config_thresholds_are_the_runs_own_and_default_to_trainconfigs():
    assert Thresholds() == Thresholds.of_run({})
    assert (Thresholds().overflow, Thresholds().underflow, Thresholds().bit_stall, Thresholds().grad_cos) == \
        (TrainConfig.overflow_threshold, TrainConfig.underflow_threshold, TrainConfig.bit_stall_threshold,
         TrainConfig.grad_cos_threshold)
    own = Thresholds.of_run({"overflow_threshold": 0.05, "grad_cos_threshold": 0.5, "underflow_threshold": None})
    assert own.overflow == 0.05 and own.grad_cos == 0.5 and own.underflow == TrainConfig.underflow_threshold
    records = stream({10: {"quant/overflow_rate/activation": 0.01}})
    assert attribute(records).stage == "forward"  # 0.01 > 0.001
    assert attribute(records, own).stage == "none"  # 0.01 < the run's own 0.05


def test_missing_and_non_finite_values_are_not_crossings_and_unmeasured_metrics_are_said():
    cos = "grad_cos_sim/mean"
    records = [{k: v for k, v in r.items() if k != cos} for r in stream()]
    records[1][cos] = math.nan
    records[2][cos] = "nan"  # as JSON can hold it
    records[3][cos] = None
    result = attribute(records, stored=True)
    backward = result.stages["backward"]
    assert result.stage == "none" and backward.status == "not crossed"
    assert backward.not_measured == [cos] and cos in backward.text
    nothing = attribute([{"step": 0, "loss": 5.0}], stored=True)  # no metric at all
    assert nothing.stage == "none" and {s.status for s in nothing.stages.values()} == {"not measured"}
    late = [{"step": 10, cos: math.nan}, {"step": 20, cos: 0.5}]  # a NaN before a crossing: the crossing counts
    assert attribute(late).stages["backward"].step == 20
    zero = stream({10: {"optim/rel_update_realized": 0.0, "optim/rel_update_intended": 0.0}})
    ratio = next(r for r in RULES if r.over)
    assert judge(ratio, zero, Thresholds(), stored=True).measured == 3  # no intended update: no ratio there


def test_the_stall_and_update_rules_apply_to_stored_weights_and_the_a_vs_c_rule_needs_arm_a():
    stalled = stream({10: {"quant/bit_stall_rate": 0.999, "optim/stall_ratio": 0.999,
                           "optim/rel_update_realized": 0.01}})
    master = attribute(stalled, stored=False)
    assert master.stage == "none" and master.stages["optimizer"].status == "not applicable"
    stored = attribute(stalled, stored=True)
    assert (stored.stage, stored.step) == ("optimizer", 10)
    assert stored.stages["optimizer"].first.rule.metric == "optim/stall_ratio"  # a tie of rules: RULES order
    behind = stream({20: {"val_loss": 3.2}})
    assert attribute(behind, stored=True).stage == "none"  # no partner: the A-vs-C rule does not apply
    assert attribute(behind, stored=True, reference=REFERENCE).stage == "optimizer"
    assert attribute(behind, stored=True, reference=[{"step": 30, "val_loss": 3.0}]).stage == "none"  # no pair at 20



def test_the_weights_cast_rules_apply_under_masters_only():
    """A stored weight is its grid value: its cast is exact (no SNR logged), so its cast rules do
    not apply; the activation's still do."""
    noisy = stream({10: {"quant/snr_db/weight": 10.0, "quant/underflow_rate/weight": 0.9,
                         "quant/overflow_rate/weight": 0.5}})
    assert (attribute(noisy, stored=False).stage, attribute(noisy, stored=False).step) == ("forward", 10)
    on_grid = attribute(noisy, stored=True)
    assert on_grid.stage == "none"
    weight_rules = [r for r in on_grid.stages["forward"].rules if r.rule.metric.endswith("/weight")]
    assert len(weight_rules) == 3 and {r.status for r in weight_rules} == {"not applicable"}
    no_snr = [{k: v for k, v in r.items() if k != "quant/snr_db/weight"} for r in stream()]
    assert "quant/snr_db/weight" not in attribute(no_snr, stored=True).stages["forward"].not_measured
    assert "quant/snr_db/weight" in attribute(no_snr, stored=False).stages["forward"].not_measured
    activation = stream({10: {"quant/snr_db/activation": 10.0}})
    assert attribute(activation, stored=True).stage == "forward"

def test_the_earliest_stage_is_attributed_and_a_tie_goes_upstream():
    forward = {"quant/snr_db/activation": 10.0}
    backward = {"grad_cos_sim/mean": 0.5}
    optimizer = {"quant/bit_stall_rate": 0.999}
    same = attribute(stream({20: {**forward, **backward, **optimizer}}), stored=True)
    assert (same.stage, same.step) == ("forward", 20)
    assert {s: same.stages[s].step for s in STAGES} == {"forward": 20, "backward": 20, "optimizer": 20}
    assert attribute(stream({20: {**backward, **optimizer}}), stored=True).stage == "backward"
    earlier = attribute(stream({10: optimizer, 20: forward, 30: backward}), stored=True)
    assert (earlier.stage, earlier.step) == ("optimizer", 10)  # upstream only breaks ties in step
    assert earlier.text.startswith("optimizer at step 10 (quant/bit_stall_rate = 0.999 > 0.99")


def test_a_run_that_fails_nowhere_is_none():
    result = attribute(stream(), stored=True, reference=REFERENCE)
    assert result.stage == "none" and result.step is None and result.text.startswith("none")
    assert {s.status for s in result.stages.values()} == {"not crossed"}


def run(stage, step):
    """An attribution naming ``stage`` at ``step`` (none: nothing crossed)."""
    changes = {"forward": {"quant/snr_db/activation": 10.0}, "backward": {"grad_cos_sim/mean": 0.5},
               "optimizer": {"quant/bit_stall_rate": 0.999}}
    return attribute(stream({step: changes[stage]} if stage != "none" else {}), stored=True)


def test_over_seeds_the_stage_most_seeds_name_with_its_earliest_step_and_the_counts():
    group = aggregate({3: run("forward", 30), 1: run("forward", 20), 2: run("optimizer", 10)})
    assert (group.stage, group.step, group.counts) == ("forward", 20, {"forward": 2, "optimizer": 1})
    assert group.text == "forward at step 20 (2 of 3 seeds; optimizer 1)"
    assert list(group.per_seed) == [1, 2, 3]
    tie = aggregate({1: run("optimizer", 10), 2: run("backward", 30)})
    assert tie.stage == "backward"  # equal counts: upstream first
    assert aggregate({1: run("none", 0), 2: run("optimizer", 20)}).stage == "optimizer"  # none loses a tie
    quiet = aggregate({1: run("none", 0), 2: run("none", 0), 3: run("forward", 10)})
    assert (quiet.stage, quiet.step) == ("none", None) and quiet.text == "none (2 of 3 seeds; forward 1)"
    assert aggregate({}) is None
    assert NAMES == ("forward", "backward", "optimizer", "none")
    assert isinstance(group.per_seed[1], Attribution)
