"""The layer-type sections of the report (issue 23 §2-3): the sweet spot's verdicts
(experiments/report_sweet_spot.py) at their edges on constructed groups, the best format and its
lead against hand computations, "not established" from the protocol, the failure map's reading of
a stage beside the loss (experiments/report_failures.py), and both sections on a tiny real matrix
with two layer types. The stage rules alone: tests/test_failure_stage.py."""

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.experiments.launch import MatrixRunner
from altgrad.experiments.matrix import load_matrix
from altgrad.experiments.report import analyse
from altgrad.experiments.report_failures import format_sentences
from altgrad.experiments.report_runs import Cell, Group
from altgrad.experiments.report_sweet_spot import classify
from altgrad.experiments.runs import RunRecord
from altgrad.experiments.stats import Paired, from_differences, paired_difference

runner = CliRunner()
STEPS = 100
SEEDS = (1, 2, 3)
TUNING_SEED = 9
TAGS = {"A": ("adamw", "master", None), "C": ("adamw-sr", "format", "stochastic")}
BASE = {1: 2.000, 2: 2.010, 3: 1.990}


def run(fmt, arm, layers, seed, loss, metrics=None, collapse=None):
    tag, storage, rounding = TAGS[arm]
    config = {"preset": "tiny", "seed": seed, "max_steps": STEPS, "lr": 0.004, "optimizer": "adamw",
              "weight_storage": storage, "update_rounding": rounding, "format": None,
              "policy": [{"layers": [f"*.{layers}.*"], "format": fmt}]}
    summary = {"arm": tag, "status": "completed", "final_val_loss": loss, "steps": STEPS}
    if collapse is not None:
        summary["collapse"] = collapse
    return RunRecord(f"{fmt}-{arm}-{layers}-s{seed}", Path("."), config, summary, metrics or [])


def group(fmt, arm, layers, losses, metrics=None, collapse=None, statuses=None):
    """A group whose seed s ends at ``losses[s]``; ``metrics``: seed -> records; ``collapse``:
    seed -> the summary's collapse record."""
    metrics, collapse, statuses = metrics or {}, collapse or {}, statuses or {}
    cells = [Cell(f"{fmt}-{arm}-{layers}-s{s}", s, statuses.get(s, "completed"), loss,
                  run(fmt, arm, layers, s, loss, metrics.get(s), collapse.get(s))) for s, loss in losses.items()]
    return Group(fmt, arm, layers, TAGS[arm][0], cells)


def baseline(losses=BASE):
    cells = [Cell(f"bf16-s{s}", s, "completed", loss,
                  RunRecord(f"bf16-s{s}", Path("."), {"seed": s, "max_steps": STEPS, "lr": 0.004},
                            {"arm": "adamw", "status": "completed", "final_val_loss": loss, "steps": STEPS}, []))
             for s, loss in losses.items()]
    return Group("bf16", "BF16", "-", "adamw", cells)


def shifted(delta):
    """Seed -> BF16's loss plus ``delta[seed]`` (or a constant)."""
    return {s: BASE[s] + (delta[s] if isinstance(delta, dict) else delta) for s in SEEDS}


def manifest(groups, **baseline_changes):
    """The baseline tuned at the cells' horizon on its own seed, interior, resolution 0.004; every
    other group inheriting its lr."""
    base = {"format": "bf16", "arm": "BF16", "layers": "-", "keys": ["lr"], "seed": TUNING_SEED,
            "max_steps": STEPS, "horizon": "final", "budget": 5, "spent": 5, "hit_budget": False,
            "trials": [{"values": {"lr": v}, "status": "completed", "final_val_loss": 2.0 + abs(v - 0.004)}
                       for v in (0.002, 0.004, 0.008)],
            "best": {"lr": 0.004}, "best_loss": 2.0, "interior": {"lr": True}, "resolution": 0.004,
            "stopped": "interior", "inherited": {}, "settled": True, **baseline_changes}
    sweeps = {"bf16-BF16": base}
    for g in groups:
        if not g.baseline:
            sweeps[g.name] = {"format": g.format, "arm": g.arm, "layers": g.layers, "keys": [], "seed": TUNING_SEED,
                              "max_steps": STEPS, "horizon": "final", "budget": 5, "spent": 0, "hit_budget": False,
                              "trials": [], "best": None, "interior": {}, "resolution": math.nan,
                              "stopped": "interior", "settled": True,
                              "inherited": {"lr": {"from": "BF16", "group": "bf16-BF16", "value": 0.004,
                                                   "interior": base["interior"]["lr"]}}}
    return {"sweeps": sweeps, "protocol": {"tuning_seed": TUNING_SEED, "eval_seeds": list(SEEDS), "budget": 5,
                                           "horizon": "final", "sweep_max_steps": STEPS, "cell_max_steps": STEPS}}


def interval(low, high, mean=None, n=3):
    mean = (low + high) / 2 if mean is None else mean
    return Paired(mean, low, high, n, math.nan)


# ---- the verdict of one cell -------------------------------------------------------------------
def test_each_verdict_at_its_edge():
    g = group("E5M2", "A", "attention", shifted(0.0))
    # the floor is the interval's half-width plus the resolution: exactly at it is within noise
    assert classify(g, interval(0.25, 0.5), 0.25)[0] == "within noise"  # |0.375| = 0.125 + 0.25
    assert classify(g, interval(0.25, 0.5, mean=0.375), 0.25)[1].endswith("the tuning resolution 0.2500")
    assert classify(g, interval(0.375, 0.625), 0.25)[0] == "worse"  # 0.5 > 0.125 + 0.25
    assert classify(g, interval(-0.625, -0.375), 0.25)[0] == "better"
    assert classify(g, interval(-0.5, 0.5, mean=0.0), math.nan) == ("within noise",
                                                                   "+0.0000 [-0.5000, +0.5000] n=3: the interval "
                                                                   "holds 0")
    assert classify(g, interval(0.375, 0.625), math.nan)[0] == "resolution unknown"  # beyond its interval
    assert classify(g, Paired(0.5, math.nan, math.nan, 1, math.nan), 0.25)[0] == "too few seeds"
    collapsed = group("E7M0", "A", "attention", shifted(0.0), collapse={2: {"step": 40, "reason": "val loss up"}})
    assert classify(collapsed, interval(-0.1, 0.1), 0.25) == ("collapsed", "collapsed: seed 2 at step 40")
    # a diverged run comes first, even beside a collapse
    diverged = group("E7M0", "A", "attention", {1: math.nan, 2: 2.0, 3: 2.0}, collapse={2: {"step": 40}})
    assert classify(diverged, interval(-0.1, 0.1), 0.25)[0] == "diverged"


# ---- the sweet spot of a layer type ------------------------------------------------------------
def attention_case():
    """Arm A, attention alone: E5M2 and E3M4 within noise, E4M3 worse, E7M0 collapsed; the MLP
    quantized alone too, and every Linear (uniform)."""
    cells = [group("E5M2", "A", "attention", shifted({1: 0.001, 2: 0.003, 3: 0.002})),
             group("E3M4", "A", "attention", shifted({1: 0.004, 2: 0.006, 3: 0.005})),
             group("E4M3", "A", "attention", shifted({1: 0.20, 2: 0.21, 3: 0.22})),
             group("E7M0", "A", "attention", shifted(0.3), collapse={1: {"step": 60, "reason": "val loss up"}}),
             group("E5M2", "A", "mlp", shifted({1: -0.002, 2: 0.001, 3: 0.0})),
             group("E5M2", "A", "uniform", shifted({1: 0.05, 2: 0.06, 3: 0.07}))]
    return [baseline(), *cells]


def line(analysis, arm, layers):
    return next(x for x in analysis.sweet_spot.lines if (x.arm, x.layers) == (arm, layers))


def test_the_sweet_spot_of_a_layer_type_against_hand_computations():
    groups = attention_case()
    analysis = analyse(groups, manifest(groups))
    spot = analysis.sweet_spot
    assert (spot.arms, spot.columns) == (["A"], ["attention", "mlp", "uniform"])
    assert spot.formats == ["E5M2", "E3M4", "E4M3", "E7M0"]
    attention = line(analysis, "A", "attention")
    verdicts = {c.group.format: c.verdict for c in attention.cells}
    assert verdicts == {"E5M2": "within noise", "E3M4": "within noise", "E4M3": "worse", "E7M0": "collapsed"}
    e5m2 = spot.cell("A", "attention", "E5M2")
    hand = from_differences({1: 0.001, 2: 0.003, 3: 0.002})  # the per-seed differences against BF16
    assert e5m2.paired.per_seed == pytest.approx(hand.per_seed)
    assert (e5m2.paired.mean, e5m2.paired.low, e5m2.paired.high) == pytest.approx((hand.mean, hand.low, hand.high))
    assert e5m2.paired.mean == pytest.approx(0.002) and e5m2.resolution == 0.004  # the baseline's resolution
    assert attention.established and attention.best is e5m2 and attention.runner_up.group.format == "E3M4"
    assert attention.lead.per_seed == pytest.approx({1: -0.003, 2: -0.003, 3: -0.003})
    # a constant lead of 0.003 has a zero-width interval beyond 0, but is within the resolution 0.004: a tie
    assert attention.lead_verdict == "tied"
    sentence = attention.sentence
    assert sentence.startswith("Attention, arm A (FP32 masters): within noise of BF16: E5M2 (+0.0020 [")
    assert "best: E5M2" in sentence and "tied within noise with E3M4" in sentence
    assert "fails: E4M3 (+0.2100" in sentence and "E7M0 (collapsed: seed 1 at step 60)" in sentence
    assert line(analysis, "A", "uniform").named("worse")[0].group.format == "E5M2"  # +0.06, beyond 0.004 + ~0.025
    data = spot.to_dict()
    assert data["lines"][0]["best"] == "E5M2" and data["lines"][0]["fails"] == ["E4M3", "E7M0"]
    assert "1 of the 6 groups" not in spot.inheritance and "6 of the 6 groups inherit lr = 0.004" in \
        spot.inheritance


def test_a_lead_beyond_its_floor_is_ahead_and_a_format_better_than_bf16_is_said():
    groups = [baseline(), group("E5M2", "A", "attention", shifted({1: -0.030, 2: -0.031, 3: -0.029})),
              group("E3M4", "A", "attention", shifted({1: 0.001, 2: 0.002, 3: 0.003}))]
    analysis = analyse(groups, manifest(groups))
    attention = line(analysis, "A", "attention")
    assert [c.verdict for c in attention.cells] == ["better", "within noise"]
    assert attention.best.group.format == "E5M2" and attention.lead_verdict == "ahead"
    assert attention.lead.mean == pytest.approx(-0.032)
    assert "ahead of E3M4 beyond noise" in attention.sentence
    assert "better than BF16 beyond noise: E5M2" in attention.sentence


def test_every_format_failing_leaves_no_best():
    groups = [baseline(), group("E7M0", "A", "mlp", shifted(0.5)),
              group("E4M3", "A", "mlp", {1: math.nan, 2: 2.0, 3: 2.0})]
    attention = line(analyse(groups, manifest(groups)), "A", "mlp")
    assert attention.best is None and "best: none" in attention.sentence
    assert [c.verdict for c in attention.cells] == ["worse", "diverged"]


@pytest.mark.parametrize("changes, reason", [
    ({"interior": {"lr": False}, "stopped": "budget", "hit_budget": True}, "is not interior"),
    ({"seed": 2}, "tuned on seed 2, an evaluation seed"),
    ({"max_steps": STEPS // 2}, f"the baseline bf16-BF16"),
    ({"settled": False, "stopped": None}, "is not settled"),
])
def test_the_protocol_failing_on_the_baseline_makes_a_line_not_established(changes, reason):
    groups = attention_case()
    analysis = analyse(groups, manifest(groups, **changes))
    attention = line(analysis, "A", "attention")
    assert not attention.established and any(reason in r for r in attention.reasons)
    assert attention.sentence.startswith("Attention, arm A (FP32 masters): not established (")
    assert "Measured at that lr: within noise of BF16: E5M2" in attention.sentence  # what was measured stays


def test_without_a_layer_type_alone_neither_section_exists():
    groups = [baseline(), group("E5M2", "A", "uniform", shifted(0.01)), group("E5M2", "C", "uniform", shifted(0.02))]
    analysis = analyse(groups, manifest(groups))
    assert analysis.sweet_spot is None and analysis.failures is None


# ---- where each format fails -------------------------------------------------------------------
def records(changes=None, steps=(0, 50, 100)):
    """Quiet records; ``changes``: step -> metrics on top."""
    quiet = {"quant/overflow_rate/activation": 0.0, "quant/underflow_rate/activation": 0.0,
             "quant/snr_db/activation": 30.0, "quant/overflow_rate/gradient": 0.0,
             "quant/underflow_rate/gradient": 0.0, "quant/snr_db/gradient": 30.0, "grad_cos_sim/mean": 0.99,
             "quant/overflow_rate/weight": 0.0, "quant/underflow_rate/weight": 0.0, "quant/snr_db/weight": 30.0,
             "quant/dead_fraction_sampled": 0.0, "val_loss": 2.5}
    changes = changes or {}
    return [{"step": s, **quiet, **changes.get(s, {})} for s in steps]


def test_a_crossing_is_a_failure_only_where_the_loss_fails():
    noisy = {s: records({50: {"quant/snr_db/activation": 12.0}}) for s in SEEDS}
    late = {s: records({100: {"grad_cos_sim/mean": 0.5}}) for s in SEEDS}
    groups = [baseline(),
              group("E7M0", "A", "attention", shifted(0.3), metrics=noisy),  # worse, forward crossed
              group("E7M0", "A", "mlp", shifted({1: 0.0, 2: 0.001, 3: -0.001}), metrics=noisy),  # within noise
              group("E4M3", "A", "attention", shifted(0.3), metrics={s: records() for s in SEEDS}),  # worse, quiet
              group("E5M2", "A", "attention", shifted({1: 0.0, 2: 0.001, 3: -0.001}), metrics=late),
              group("E5M2", "A", "mlp", shifted({1: 0.0, 2: 0.001, 3: -0.001}), metrics={s: records() for s in SEEDS})]
    failures = analyse(groups, manifest(groups)).failures
    e7m0 = failures.find("E7M0", "attention", "A")
    assert e7m0.fails and e7m0.stage.stage == "forward" and e7m0.stage.step == 50
    assert e7m0.reading == "fails in the forward pass" and e7m0.cost_text.startswith("worse: +0.3000")
    quiet = failures.find("E7M0", "mlp", "A")
    assert not quiet.fails and quiet.stage.stage == "forward"
    assert quiet.reading == "does not fail: forward crossed first without a loss cost (within noise)"
    unexplained = failures.find("E4M3", "attention", "A")
    assert unexplained.fails and unexplained.stage.stage == "none"
    assert unexplained.reading.startswith("fails; no measured metric crossed")
    assert failures.find("E5M2", "attention", "A").stage.stage == "backward"
    assert failures.find("E5M2", "mlp", "A").reading == "does not fail, nothing crossed (within noise)"
    sentences = dict(s.split(": ", 1) for s in format_sentences(failures))
    assert sentences["E7M0"].startswith("fails in attention arm A (worse: +0.3000")
    assert "crossed a threshold without a loss cost in mlp arm A (forward at step 50 (3 of 3 seeds))" in \
        sentences["E7M0"]
    assert sentences["E5M2"].startswith("fails nowhere it ran; crossed a threshold without a loss cost in "
                                        "attention arm A (backward at step 100") and \
        sentences["E5M2"].endswith("neither failed nor crossed in mlp arm A.")


def test_a_stored_arm_reads_its_own_seeds_arm_a_run_for_the_a_vs_c_rule():
    base = {s: records() for s in SEEDS}
    behind = {s: records({50: {"val_loss": 2.5 + (0.1 if s == 2 else 0.01)}}) for s in SEEDS}
    groups = [baseline(), group("E5M2", "A", "attention", shifted(0.0), metrics=base),
              group("E5M2", "C", "attention", shifted(0.0), metrics=behind)]
    failures = analyse(groups, manifest(groups)).failures
    stored = failures.find("E5M2", "attention", "C")
    assert stored.stored and stored.reference == "e5m2-A-attention"
    assert stored.stage.counts == {"optimizer": 1, "none": 2} and stored.stage.stage == "none"  # the vote
    assert stored.stage.per_seed[2].stage == "optimizer" and stored.stage.per_seed[2].step == 50
    master = failures.find("E5M2", "attention", "A")
    assert master.reference is None and master.stage.per_seed[1].stages["optimizer"].status == "not applicable"
    weight = [r for r in stored.stage.per_seed[1].stages["forward"].rules if r.rule.metric.endswith("/weight")]
    assert {r.status for r in weight} == {"not applicable"}  # a stored weight's cast is exact


# ---- both sections on a tiny real matrix -------------------------------------------------------
@pytest.fixture(scope="module")
def layer_matrix(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("layers")
    spec = {"preset": "tiny",
            "settings": {"data": str(tiny_data), "max_steps": 20, "eval_interval": 10, "checkpoint_interval": 10,
                         "stats_interval": 5, "rank_interval": 10, "device": "cpu", "use_shadow": True,
                         "shadow_interval": 5},
            "runs_dir": str(root / "runs"), "seeds": [1, 2], "formats": ["bf16", "E5M2", "E7M0"],
            "arms": {"BF16": {"optimizer": "adamw", "sweep": {"lr": [0.002, 0.004, 0.008]}},
                     "A": {"optimizer": "adamw", "lr": {"from": "BF16", "format": "bf16"}},
                     "C": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic",
                           "lr": {"from": "BF16", "format": "bf16"}}},
            "layers": {"attention": {"policy": [{"layers": ["*.attn.c_attn", "*.attn.c_proj"],
                                                 "format": "{format}"}]},
                       "mlp": {"policy": [{"layers": ["*.mlp.c_fc", "*.mlp.c_proj"], "format": "{format}"}]}},
            "sweep": {"refine": False, "budget": 3},
            "cells": [{"formats": ["bf16"], "arms": ["BF16"]},
                      {"formats": ["E5M2"], "arms": ["A", "C"], "layers": ["attention", "mlp"]},
                      {"formats": ["E7M0"], "arms": ["A"], "layers": ["attention"]}]}
    path = root / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    MatrixRunner(load_matrix(path), jobs=2).run()
    return path


def test_the_layer_sections_on_a_tiny_real_matrix(layer_matrix, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(layer_matrix), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sweet spot: Attention, arm A (FP32 masters): " in result.output
    assert "where it fails: E7M0: " in result.output
    data = json.loads((out / "report.json").read_text())
    groups = {(g["format"], g["arm"], g["layers"]): g for g in data["groups"]}
    base = {r["seed"]: r["final_val_loss"] for r in groups[("bf16", "BF16", "-")]["runs"]}
    spot = data["sweet_spot"]
    assert spot["arms"] == ["A", "C"] and spot["layers"] == ["attention", "mlp"]
    assert spot["formats"] == ["E5M2", "E7M0"]
    for entry in spot["lines"]:
        for cell in entry["cells"]:  # every difference is the runs' own, paired by seed
            runs = {r["seed"]: r["final_val_loss"] for r in groups[(cell["format"], cell["arm"], cell["layers"])]["runs"]}
            hand = paired_difference(runs, base)
            assert cell["vs_bf16"]["per_seed"] == pytest.approx({str(s): runs[s] - base[s] for s in runs})
            assert cell["vs_bf16"]["mean"] == pytest.approx(hand.mean)
            assert cell["resolution"] == pytest.approx(data["sweeps"]["bf16-BF16"]["resolution"])
    assert [(x["arm"], x["layers"]) for x in spot["lines"]] == [("A", "attention"), ("A", "mlp"), ("C", "attention"),
                                                                  ("C", "mlp")]
    assert "inherit lr = " in spot["inheritance"] and "from bf16-BF16" in spot["inheritance"]
    stages = {(g["format"], g["layers"], g["arm"]): g for g in data["failure_stages"]["groups"]}
    assert set(stages) == {("E5M2", "attention", "A"), ("E5M2", "attention", "C"), ("E5M2", "mlp", "A"),
                           ("E5M2", "mlp", "C"), ("E7M0", "attention", "A")}
    assert stages[("E5M2", "attention", "C")]["reference"] == "e5m2-A-attention"
    assert stages[("E5M2", "attention", "C")]["stored"] and not stages[("E5M2", "attention", "A")]["stored"]
    for g in stages.values():  # the shadow ran: the backward stage's cosine was measured in every run
        for seed in g["stage"]["per_seed"].values():
            cos = next(r for r in seed["stages"]["backward"]["rules"] if r["metric"] == "grad_cos_sim/mean")
            assert cos["measured"] >= 4
    e7m0 = stages[("E7M0", "attention", "A")]  # one binade per step: its SNR is ~14 dB, below 20 from the start
    assert e7m0["stage"]["stage"] == "forward" and e7m0["stage"]["step"] == 5
    markdown = (out / "report.md").read_text()
    assert "## The sweet spot per layer type" in markdown and "## Where each format fails" in markdown
    assert "### E7M0 and the collapses" in markdown
    for name in ("sweet_spot.png", "failure_stages.png"):
        assert (out / name).stat().st_size > 1000 and markdown.count(f"]({name})") == 1  # in its section only
    for entry in spot["lines"]:
        assert entry["sentence"] in markdown
    again = tmp_path / "again"
    assert runner.invoke(app, ["report", str(layer_matrix), "--out", str(again)]).exit_code == 0
    assert (again / "report.md").read_text() == markdown  # the same report from the same runs
