"""The report (experiments/stats.py, report.py, report_files.py): the paired interval against a
hand computation, the answer on constructed results (an untuned interaction, formats not
compared, too few seeds, diverged runs), and the whole report on a tiny real matrix. The
protocol's conditions one by one: tests/test_report_protocol.py."""

import json
import shutil
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.errors import UserError
from altgrad.experiments.launch import MatrixRunner
from altgrad.experiments.matrix import load_matrix
from altgrad.experiments.report import Cell, Group, analyse, collect, role
from altgrad.experiments.report_runs import geometry_optimizer
from altgrad.experiments.stats import paired_difference, sample_sd, t_quantile

runner = CliRunner()


def test_the_paired_interval_is_the_hand_computed_t_interval():
    a = {1: 2.00, 2: 2.10, 3: 1.95, 4: 9.0}
    b = {1: 2.05, 2: 2.12, 3: 2.01, 5: 1.0}  # seeds 4 and 5 have no partner
    paired = paired_difference(a, b)
    diffs = [-0.05, -0.02, -0.06]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2} from a table
    assert paired.n == 3 and paired.per_seed == pytest.approx({1: -0.05, 2: -0.02, 3: -0.06})
    assert paired.mean == pytest.approx(m) and paired.sd == pytest.approx(sd)
    assert (paired.low, paired.high) == pytest.approx((m - half, m + half))
    assert not paired.excludes_zero  # high = +0.0084: three seeds are not enough here
    assert t_quantile(9) == pytest.approx(2.2621571627409915)


def test_undefined_intervals_are_nan_and_non_finite_losses_are_not_paired():
    one = paired_difference({1: 2.0, 2: math.nan}, {1: 1.5, 2: 1.0})
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low) and not one.excludes_zero
    none = paired_difference({}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean)
    assert math.isnan(sample_sd([1.0]))


def test_arm_roles_come_from_the_runs_own_arm_tag():
    """Geometry on FP32 masters, stored with stochastic rounding and stored with round-to-nearest
    are different roles: the interaction needs the first two apart."""
    tags = ("adamw", "adamw-rtn", "adamw-sr", "manifold-sr", "manifold-master", "manifold-rtn", "grid-sr",
            "grid-master", "grid-momentum-sr", "grid-momentum-master", "adamw-mixed", "manifold-mixed")
    assert [role(t) for t in tags] == \
        ["A", "B", "C", "geometry-stored", "geometry-master", "geometry-rtn", "geometry-stored",
         "geometry-master", "geometry-stored", "geometry-master", "other", "other"]
    assert [geometry_optimizer(t) for t in ("adamw-sr", "manifold-sr", "grid-master", "grid-momentum-sr")] == \
        [None, "manifold", "grid", "grid-momentum"]


def group(fmt, arm, tag, losses, statuses=None, layers="uniform"):
    statuses = statuses or {}
    return Group(fmt, arm, layers if fmt != "bf16" else "-", tag,
                 [Cell(f"{fmt}-{arm}-s{s}", s, statuses.get(s, "completed"), v, None) for s, v in losses.items()])


BF16 = group("bf16", "A", "adamw", {1: 2.000, 2: 2.010, 3: 1.995})


def four(fmt, gs, c, gm, a, optimizer="grid"):
    return [group(fmt, "A", "adamw", a), group(fmt, "C", "adamw-sr", c),
            group(fmt, "Em" if optimizer == "grid" else "Dm", f"{optimizer}-master", gm),
            group(fmt, "E" if optimizer == "grid" else "D", f"{optimizer}-sr", gs)]


def test_a_clear_interaction_without_a_tuning_record_is_computed_but_not_established():
    """What used to be 'E5M2 benefits most' (a geometry arm beating C beyond the BF16 spread) is
    now the interaction with its interval, and blocked: nothing says the groups were tuned."""
    groups = [BF16, *four("E5M2", gs={1: 2.05, 2: 2.06, 3: 2.045}, c={1: 2.10, 2: 2.12, 3: 2.09},
                          gm={1: 2.00, 2: 2.01, 3: 2.00}, a={1: 2.00, 2: 2.00, 3: 1.99})]
    analysis = analyse(groups)
    assert analysis.noise_floor == pytest.approx(sample_sd([2.000, 2.010, 1.995]))  # context only now
    (c,) = analysis.comparisons
    assert c.interaction.per_seed == pytest.approx({1: -0.05, 2: -0.07, 3: -0.055})
    assert c.stored_vs_control.per_seed == pytest.approx({1: -0.05, 2: -0.06, 3: -0.045})  # the old 'benefit'
    assert not c.established
    assert {"tuned_interior", "same_horizon", "equal_budget", "tuning_seed_apart", "null_control"} <= \
        {check.name for check in c.checks if not check.ok}
    assert analysis.answer.split("\n\n", 1)[1].startswith("Not established for any format:\n\n- E5M2 GridOptim, "
                                                         "interaction -0.0583")
    assert "E has no sweep: its values were not tuned" not in analysis.answer  # groups are named by role
    assert "E (stored) has no sweep: its values were not tuned" in analysis.answer
    assert analysis.vs_baseline["E5M2/C/uniform"].per_seed == pytest.approx({1: 0.10, 2: 0.11, 3: 0.095})


def test_a_format_without_a_master_control_is_not_compared_never_ranked():
    """The old answer ranked E5M2 E against C alone; without E on masters there is no interaction."""
    groups = [BF16, group("E5M2", "C", "adamw-sr", {1: 2.10, 2: 2.12, 3: 2.09}),
              group("E5M2", "E", "grid-sr", {1: 2.05, 2: 2.06, 3: 2.045}),
              group("E3M4", "A", "adamw", {1: 2.0, 2: 2.1})]
    analysis = analyse(groups)
    assert analysis.comparisons == []
    assert [n.text for n in analysis.not_compared] == [
        "E5M2 GridOptim (no GridOptim on FP32 masters, no arm A)",
        "E3M4 geometry (no geometry stored, no geometry on masters, no arm C)"]
    assert analysis.answer.startswith("No answer: no format has the four groups")
    assert "Not compared (a group of the four is missing):\n\n- E5M2 GridOptim" in analysis.answer


def test_diverged_runs_are_counted_apart_and_never_averaged():
    g = group("E7M0", "E", "grid-sr", {1: 2.5, 2: math.nan, 3: 9.0}, statuses={3: "diverged"})
    assert g.losses() == {1: 2.5} and g.mean_loss() == 2.5 and g.diverged == 2
    analysis = analyse([BF16, g])
    assert analysis.vs_baseline[g.key].n == 1


def test_diverged_seeds_leave_the_interaction():
    groups = four("E5M2", gs={1: 2.0, 2: math.nan, 3: 2.0}, c={1: 2.1, 2: 2.1, 3: 2.1},
                  gm={1: 2.0, 2: 2.0, 3: 2.0}, a={1: 2.0, 2: 2.0, 3: 2.0})
    groups[3].cells[1].status = "diverged"
    (c,) = analyse(groups).comparisons
    assert c.interaction.n == 2 and sorted(c.interaction.per_seed) == [1, 3]


def test_one_seed_cannot_establish_anything():
    groups = four("E5M2", gs={1: 1.5}, c={1: 2.1}, gm={1: 2.0}, a={1: 2.0})
    (c,) = analyse(groups).comparisons
    assert not c.established and c.interaction.n == 1 and math.isnan(c.interaction.low)
    reasons = {check.name: check.detail for check in c.checks if not check.ok}
    assert reasons["enough_seeds"] == "1 paired seed with all four groups finite (at least 2 needed)"
    assert reasons["significant"] == "no p-value (fewer than 2 paired seeds)"


def test_master_and_stored_geometry_arms_are_told_apart_and_duplicates_are_an_error():
    groups = [BF16, *four("E5M2", gs={1: 2.2, 2: 2.3}, c={1: 2.3, 2: 2.4}, gm={1: 2.0, 2: 2.1},
                          a={1: 2.1, 2: 2.2}, optimizer="manifold")]
    (c,) = analyse(groups).comparisons
    assert (c.groups["gs"].arm, c.groups["gm"].arm) == ("D", "Dm")
    assert c.update_rule.per_seed == pytest.approx({1: -0.1, 2: -0.1})  # Dm - A
    assert c.storage_geometry.per_seed == pytest.approx({1: 0.2, 2: 0.2})  # D - Dm
    with pytest.raises(UserError, match="are all arm C"):
        analyse(groups + [group("E5M2", "C2", "adamw-sr", {1: 2.3, 2: 2.4})])
    with pytest.raises(UserError, match="are all arm geometry-stored ManifoldAdamW"):
        analyse(groups + [group("E5M2", "D2", "manifold-sr", {1: 2.3, 2: 2.4})])


@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("report")
    spec = {"preset": "tiny",
            "settings": {"data": str(tiny_data), "max_steps": 20, "eval_interval": 10, "checkpoint_interval": 10,
                         "stats_interval": 5, "rank_interval": 10, "device": "cpu"},
            "runs_dir": str(root / "runs"), "seeds": [1, 2, 3], "formats": ["bf16", "E5M2"],
            "arms": {"A": {"optimizer": "adamw"},
                     "B": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "nearest"},
                     "C": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic"},
                     "D": {"optimizer": "manifold"}, "Dm": {"optimizer": "manifold", "weight_storage": "master"},
                     "E": {"optimizer": "grid"}},
            "cells": [{"formats": ["bf16"], "arms": ["A"]},
                      {"formats": ["E5M2"], "arms": ["A", "B", "C", "D", "Dm", "E"]}]}
    path = root / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    MatrixRunner(load_matrix(path), jobs=2).run()
    return path


def test_the_report_on_a_tiny_real_matrix(tiny_matrix, tiny_data, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(tiny_matrix), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "answer:" in result.output
    data = json.loads((out / "report.json").read_text())
    groups = {(g["format"], g["arm"]): g for g in data["groups"]}
    assert set(groups) == {("bf16", "A"), ("E5M2", "A"), ("E5M2", "B"), ("E5M2", "C"), ("E5M2", "D"), ("E5M2", "Dm"),
                           ("E5M2", "E")}
    for g in data["groups"]:  # every number is backed by its per-seed values
        losses = {r["seed"]: r["final_val_loss"] for r in g["runs"]}
        assert g["mean_final_val_loss"] == pytest.approx(sum(losses.values()) / 3)
        if g["vs_bf16"]:
            base = {r["seed"]: r["final_val_loss"] for r in groups[("bf16", "A")]["runs"]}
            diffs = {str(s): losses[s] - base[s] for s in losses}
            assert g["vs_bf16"]["per_seed"] == pytest.approx(diffs)
            assert g["vs_bf16"]["mean"] == pytest.approx(sum(diffs.values()) / 3)
    (comparison,) = data["comparisons"]  # ManifoldAdamW: all four groups; GridOptim lacks its masters arm
    assert (comparison["format"], comparison["optimizer"]) == ("E5M2", "manifold")
    per = {arm: {r["seed"]: r["final_val_loss"] for r in groups[("E5M2", arm)]["runs"]}
           for arm in ("A", "C", "D", "Dm")}
    assert comparison["interaction"]["per_seed"] == pytest.approx(
        {str(s): (per["D"][s] - per["C"][s]) - (per["Dm"][s] - per["A"][s]) for s in (1, 2, 3)})
    assert comparison["groups"]["gm"]["arm_tag"] == "manifold-master"
    assert not comparison["established"]  # nothing was tuned, and there is no null control
    assert {c["name"] for c in comparison["checks"] if not c["ok"]} >= {"tuned_interior", "null_control"}
    assert data["not_compared"] == [{"format": "E5M2", "layers": "uniform", "optimizer": "grid",
                                     "missing": ["GridOptim on FP32 masters"]}]
    assert data["null_control"]["status"] == "absent" and data["tuning"] == []
    assert "sweet_spot" not in data and "failure_stages" not in data  # no layer type alone: no such sections
    assert data["answer"].split("\n\n", 1)[1].startswith("Not established for any format:\n\n- E5M2 ManifoldAdamW")
    assert groups[("E5M2", "D")]["step_sizes"]["optim/rel_update_intended"]["n"] == 3  # measured by the runs
    assert data["noise_floor"]["bf16_seed_sd"] == pytest.approx(
        sample_sd([r["final_val_loss"] for r in groups[("bf16", "A")]["runs"]]))
    markdown = (out / "report.md").read_text()
    assert data["answer"] in markdown and "Student-t" in markdown and "n=3" in markdown
    for name in ("loss_curves.png", "heatmaps.png", "flips_updates.png", "rank_vs_bf16.png", "memory_frontier.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in markdown
    memory = {arm: groups[("E5M2", arm)]["memory"] for arm in ("A", "B", "C", "D", "Dm", "E")}
    assert {arm: m["status"] for arm, m in memory.items()} == dict.fromkeys(memory, "recorded")  # every run's own
    assert memory["A"]["bits"]["master"] == 32 and memory["C"]["bits"]["stored"] == 8
    assert groups[("bf16", "A")]["memory"]["status"] == "no weight format"
    (frontier,) = data["memory_frontier"]
    assert frontier["format"] == "E5M2" and len(frontier["points"]) == 6 and frontier["on_frontier"]
    assert frontier["summary"] in markdown and not [n for n in data["notes"] if "memory" in n]
    assert "20 steps" in data["limits"] and "byte tokens" in data["limits"]
    assert f"on {tiny_data} (byte tokens)" in data["limits"]  # the data each run recorded it trained on
    assert [v["cells"] for v in data["code_versions"]] == [21] and data["code_versions"][0]["code"]["torch"]
    assert f"Code: {data['code_versions'][0]['label']} (21 cells)." in markdown
    same = collect(load_matrix(tiny_matrix).runs_dir)  # the runs directory works as well as the file
    assert len(same[1]) == 7


def test_a_completed_cell_whose_folder_is_gone_is_missing_not_a_crash(tiny_matrix, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(load_matrix(tiny_matrix).runs_dir, runs)
    manifest = json.loads((runs / "manifest.json").read_text())
    gone = next(e for e in manifest["cells"].values() if e["format"] == "E5M2" and e["arm"] == "E" and e["seed"] == 2)
    shutil.rmtree(runs / gone["folder"])
    _, groups, _ = collect(runs)
    group = next(g for g in groups if (g.format, g.arm) == ("E5M2", "E"))
    assert [c.status for c in group.cells if c.seed == 2] == ["missing"] and group.failed == 1
    assert len(group.losses()) == 2  # the other seeds still count


def test_a_report_of_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        collect(tmp_path / "empty")
    result = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_notes_explain_identical_formats_and_sweeps_at_the_edge():
    same = {1: 2.2, 2: 2.3}
    groups = [BF16, group("E1M6", "E", "grid-sr", same, layers="post-ln"),
              group("E0M7", "E", "grid-sr", dict(same), layers="post-ln"),
              group("E4M3", "E", "grid-sr", dict(same))]  # same numbers, other layers: no note
    sweeps = {"e5m2-D": {"key": "grid_lr", "losses": {"0.25": 2.1, "0.5": 2.0, "1.0": 2.2}, "best": 0.5},
              "e3m4-D": {"key": "grid_lr", "losses": {"0.25": 2.4, "0.5": 2.3, "1.0": 2.1}, "best": 1.0}}
    notes = analyse(groups, {"sweeps": sweeps}).notes  # legacy sweeps: the interior is derived
    assert len(notes) == 2
    assert notes[0] == ("E1M6 and E0M7 (E, post-ln) give bit-identical final losses on every seed: their grids are "
                        "the same up to a power of two, which power-of-two scaling absorbs.")
    assert "are not interior optima" in notes[1] and "e3m4-D grid_lr = 1.0" in notes[1]
    assert "e5m2-D" not in notes[1]


def test_the_report_says_what_the_matrix_spent_and_what_a_larger_one_needs(tiny_matrix, tmp_path):
    from altgrad.experiments.report_files import write_report
    from altgrad.experiments.scale import Estimate, Work

    runs_dir = Path(tiny_matrix).parent / "runs"
    estimate = tmp_path / "paper.json"
    estimate.write_text(json.dumps(Estimate("configs/matrix/paper.yaml", "paper", "GPU-X (cuda)", 40, "code", (
        Work("A", "uniform", "e5m2-A-s1337", 20, 40, 2000, 2000, 9, 9, 0.1, 1.0),)).to_dict()))
    write_report(runs_dir, tmp_path / "out", estimate)
    text = (tmp_path / "out" / "report.md").read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    manifest = json.loads((runs_dir / "manifest.json").read_text())
    finished = [e for e in manifest["cells"].values() if e.get("status") in ("completed", "diverged")]
    assert data["compute"]["runs"] == len(finished)
    assert data["compute"]["hours"] == pytest.approx(sum(e["wall_s"] for e in finished) / 3600)
    assert "## Compute" in text and f"{len(finished)} runs (" in text
    assert "## What a larger scale would need" in text and "60 runs at most" in text
    assert "Measured on GPU-X (cuda)" in text
    assert data["scale"]["hours"] == pytest.approx(60 * (2000 * 0.1 + 9 * 1.0) / 3600)
