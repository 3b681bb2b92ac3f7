"""Memory per parameter (issue 21 part 4): every run's summary records the bits per weight with a
format of its training state (tiny runs of arms A, C, ECO, C-kahan, and a resumed run);
`altgrad compare` shows them per run ("not recorded" for a run from before the record); the
report gives them per group and the memory/loss frontier per format, computed on constructed
run folders against hand-computed non-dominated sets (ties, a diverged group, a group without a
record, runs that disagree), and the stored geometry arm against ECO and C-kahan beside the
question."""

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.experiments.compare import compare_runs
from altgrad.experiments.report import EFFECTS, analyse, role
from altgrad.experiments.report_files import write_report
from altgrad.experiments.report_memory import SAME_BITS, group_memory, non_dominated
from altgrad.experiments.report_runs import Cell, Group, arm_name
from altgrad.experiments.runs import RunRecord, load_run
from altgrad.training import Trainer, resume_config
from runs import tiny_config
from test_report_protocol import STEPS, established_case, run_config, sweep_entry, write_runs

runner = CliRunner()

#: The tiny runs: arm -> (its settings, its arm tag).
TINY_ARMS = {
    "A": ({}, "adamw"),
    "C": ({"weight_storage": "format", "update_rounding": "stochastic"}, "adamw-sr"),
    "ECO": ({"optimizer": "eco"}, "eco-rtn"),
    "C-kahan": ({"weight_storage": "format", "compensation": "kahan"}, "adamw-rtn-kahan"),
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_data):
    """Three steps of each arm at E5M2, and a BF16 run (no weight format)."""
    root = tmp_path_factory.mktemp("memory")
    runs = {}
    for arm, (settings, _) in TINY_ARMS.items():
        runs[arm] = Trainer(tiny_config(root, tiny_data, run_name=arm, format="E5M2", max_steps=3,
                                        eval_interval=3, **settings)).run()
    runs["bf16"] = Trainer(tiny_config(root, tiny_data, run_name="bf16", precision="bf16", max_steps=3,
                                       eval_interval=3)).run()
    return root / "runs", runs


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


# ---- summary.json ------------------------------------------------------------------------------
def test_every_runs_summary_records_its_memory_per_parameter(tiny_runs):
    _, runs = tiny_runs
    memory = {arm: summary(result.run_dir)["memory"] for arm, result in runs.items()}
    for arm, (_, tag) in TINY_ARMS.items():
        assert summary(runs[arm].run_dir)["arm"] == tag
        assert memory[arm] == runs[arm].memory  # the result and its summary say the same
    a, c, eco, kahan = (memory[arm] for arm in TINY_ARMS)
    assert memory["bf16"] is None  # no layer has a weight format: nothing to count
    assert all(m["params"] == c["params"] > 0 for m in (a, eco, kahan))  # the same weights counted
    assert all(m["moments"] == 64 for m in (a, c, eco, kahan))  # Adam's two float32 moments in every arm
    # relative, as the arms differ: C-kahan = C + 16 (its buffer), A = C + 24 (a 32-bit master, not 8 stored)
    assert kahan["compensation"] - c["compensation"] == 16 and kahan["total"] == pytest.approx(c["total"] + 16)
    assert (a["stored"] + a["master"]) - (c["stored"] + c["master"]) == 24
    assert (a["stored"], a["master"], c["stored"], c["master"]) == (0, 32, 8, 0)
    assert eco == c  # ECO's feedback lives in the moment it already has
    for m in (a, c, eco, kahan):
        assert m["total"] == pytest.approx(sum(m[k] for k in ("stored", "master", "moments", "compensation",
                                                              "other")))
        assert 0 < m["other"] < 0.1  # scales and step counters, amortised


def test_a_resumed_run_records_the_memory_of_the_state_it_restored(tiny_runs, tiny_data, tmp_path):
    _, runs = tiny_runs
    settings, _ = TINY_ARMS["C-kahan"]
    config = tiny_config(tmp_path, tiny_data, run_name="k", format="E5M2", max_steps=2, checkpoint_interval=2,
                         eval_interval=2, **settings)
    first = Trainer(config).run()
    resumed = Trainer(resume_config(first.run_dir, max_steps=3), resume=True).run()
    assert resumed.steps == 3 and summary(resumed.run_dir)["memory"] == runs["C-kahan"].memory
    again = Trainer(resume_config(first.run_dir, max_steps=3), resume=True).run()  # nothing left to train
    assert again.steps == 3 and summary(again.run_dir)["memory"] == runs["C-kahan"].memory


# ---- altgrad compare ----------------------------------------------------------------------------
def test_compare_shows_each_runs_bits_and_says_not_recorded_for_older_runs(tiny_runs, tmp_path):
    runs_dir, runs = tiny_runs
    old = tmp_path / "runs"
    shutil.copytree(runs_dir, old)
    stale = summary(old / "A")
    del stale["memory"]  # a run from before the record
    (old / "A" / "summary.json").write_text(json.dumps(stale))
    records = [load_run(old, name) for name in ("C", "A", "C-kahan", "bf16")]
    rows = compare_runs(records).rows
    assert [r.memory_recorded for r in rows] == [True, False, True, True]
    assert rows[0].memory == runs["C"].memory and rows[1].memory is None and rows[3].memory is None
    assert rows[2].memory["compensation"] == 16
    as_dict = compare_runs(records).to_dict()["runs"]
    assert as_dict[2]["memory"]["total"] == pytest.approx(runs["C-kahan"].memory["total"])
    result = runner.invoke(app, ["compare", "C", "A", "C-kahan", "bf16", "--runs-dir", str(old)],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert result.output.index("runs vs C") < result.output.index("bits per parameter")  # after the verdicts
    table = result.output[result.output.index("bits per parameter"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.split()}
    assert rows["C"][:7] == ["C", f"{runs['C'].memory['total']:.4g}", "8", "0", "64", "0",
                             f"{runs['C'].memory['other']:.4g}"]
    assert rows["C-kahan"][1:6] == [f"{runs['C-kahan'].memory['total']:.4g}", "8", "0", "64", "16"]
    assert rows["A"][1:3] == ["not", "recorded"] and "96" not in " ".join(rows["A"])  # never a guess
    assert rows["bf16"][1:4] == ["no", "weight", "format"]
    as_json = json.loads(runner.invoke(app, ["compare", "C", "A", "--runs-dir", str(old), "--json"]).output)
    assert [r["memory_recorded"] for r in as_json["runs"]] == [True, False]


# ---- the report: constructed run folders --------------------------------------------------------
def bits(stored=0.0, master=0.0, compensation=0.0, other=0.02, moments=64.0):
    parts = {"params": 32800, "stored": stored, "master": master, "moments": moments,
             "compensation": compensation, "other": other}
    return {**parts, "total": stored + master + moments + compensation + other}


A_BITS, C_BITS, KAHAN_BITS = bits(master=32, other=0.01), bits(stored=8), bits(stored=8, compensation=16)
#: arm -> (tag, config changes against run_config's arm C, bits, losses per seed)
FRONTIER = {
    "A": ("adamw", {"weight_storage": "master"}, A_BITS, {1: 1.975, 2: 1.995, 3: 1.985}),  # C-kahan + 0.005
    "B": ("adamw-rtn", {"update_rounding": "nearest"}, C_BITS, {1: 2.49, 2: 2.51, 3: 2.50}),
    "C": ("adamw-sr", {}, C_BITS, {1: 2.01, 2: 2.03, 3: 2.02}),
    "ECO": ("eco-rtn", {"optimizer": "eco", "update_rounding": "nearest"}, C_BITS,
            {1: 2.21, 2: 1.98, 3: 2.11}),  # C + 0.20, -0.05, +0.09: mean +0.08, its interval holds 0
    "C-kahan": ("adamw-rtn-kahan", {"update_rounding": "nearest", "compensation": "kahan"}, KAHAN_BITS,
                {1: 1.97, 2: 1.99, 3: 1.98}),  # C - 0.04 on every seed
    "D": ("manifold-sr", {"optimizer": "manifold", "grid_lr": 0.5}, C_BITS, {1: 2.01, 2: 2.03, 3: 2.02}),  # = C
    "E": ("grid-sr", {"optimizer": "grid", "grid_lr": 0.5}, C_BITS, {1: math.nan, 2: math.nan, 3: math.nan}),
    "Dm": ("manifold-master", {"optimizer": "manifold", "weight_storage": "master", "grid_lr": 0.5}, None,
           {1: 1.99, 2: 2.00, 3: 2.01}),  # from before the record
}


def frontier_group(arm, fmt="E5M2", losses=None, memory=..., **extra):
    tag, changes, recorded, default = FRONTIER[arm]
    losses = default if losses is None else losses
    cells = []
    for seed, loss in losses.items():
        config = {**run_config(fmt, "C", "uniform", seed), **changes, **extra}
        status = "diverged" if math.isnan(loss) else "completed"
        summary = {"arm": tag, "status": status, "final_val_loss": loss, "steps": STEPS}
        value = recorded if memory is ... else memory
        if value is not None or memory is None:
            summary["memory"] = value
        record = RunRecord(f"{fmt}-{arm}-s{seed}", None, config, summary, [{"step": 10, "loss": 2.5}])
        cells.append(Cell(record.name, seed, status, loss, record))
    return Group(fmt, arm, "uniform", tag, cells)


def frontier_case(arms=tuple(FRONTIER)):
    groups = [frontier_group(arm) for arm in arms]
    manifest = {"sweeps": {g.name: {**sweep_entry(g.format, "C"), "arm": g.arm} for g in groups},
                "protocol": established_case()[1]["protocol"]}
    return groups, manifest


def test_roles_and_names_of_the_remedies_leave_the_existing_roles_alone():
    assert [role(t) for t in ("eco-rtn", "adamw-rtn-kahan", "eco-sr", "adamw-sr-kahan", "manifold-sr-kahan")] == \
        ["ECO", "C-kahan", "other", "other", "other"]
    assert [role(t) for t in ("adamw", "adamw-rtn", "adamw-sr", "manifold-sr", "manifold-master", "grid-rtn")] == \
        ["A", "B", "C", "geometry-stored", "geometry-master", "geometry-rtn"]
    assert [arm_name(t) for t in ("adamw-rtn-kahan", "eco-rtn", "eco-sr", "manifold-sr-kahan", "grid-master",
                                  "adamw-mixed")] == ["C-kahan", "ECO", "ECO-sr", "D-kahan", "Em", "adamw-mixed"]
    folder = Group("E5M2", "adamw-rtn-kahan", "uniform", "adamw-rtn-kahan")  # read from run folders: arm = tag
    assert folder.arm_name == "C-kahan" and Group("E5M2", "Ck2", "uniform", "adamw-rtn-kahan").arm_name == "Ck2"


def test_non_dominated_is_fewer_or_equal_bits_and_a_lower_mean_loss():
    # hand-computed: (72, 2.0) beats (72, 2.1) and (96, 2.05); (88, 1.9) beats (96, 1.95); ties both stay
    points = [(72.0, 2.0), (72.0, 2.1), (88.0, 1.9), (96.0, 2.05), (96.0, 1.95), (72.0, 2.0)]
    assert non_dominated(points) == [True, False, True, False, False, True]
    assert non_dominated([(96.0, 2.0), (72.0, 2.0)]) == [True, True]  # equal loss: more bits is not dominated
    assert non_dominated([(72.0 + SAME_BITS / 2, 1.9), (72.0, 2.0)]) == [True, False]  # scalars' bits are equal
    assert non_dominated([(72.0 + 2 * SAME_BITS, 1.9), (72.0, 2.0)]) == [True, True]
    assert non_dominated([]) == [] and non_dominated([(8.0, 3.0)]) == [True]


def test_the_frontier_of_a_format_against_a_hand_computed_set():
    groups, manifest = frontier_case()
    analysis = analyse(groups, manifest)
    (found,) = analysis.frontiers
    # C and D tie (72 bits, 2.02) and neither has a lower loss; C-kahan (88, 1.98) beats every cheaper arm;
    # A (96, 1.995) loses to C-kahan, B and ECO (72) to C and D
    assert [p.name for p in found.on] == ["C", "D", "C-kahan"]
    assert [p.name for p in found.off] == ["ECO", "B", "A"]
    assert [(g.arm, why) for g, why in found.left_out] == [("E", "no finite final loss"),
                                                          ("Dm", "memory not recorded")]
    point = {p.name: p for p in found.points}
    assert {n: (p.reference.arm if p.reference else None) for n, p in point.items()} == \
        {"C": "D", "D": "C", "ECO": "C", "B": "C", "C-kahan": "C", "A": "C-kahan"}
    assert point["C-kahan"].difference.per_seed == pytest.approx({1: -0.04, 2: -0.04, 3: -0.04})
    assert {n: p.verdict for n, p in point.items()} == {
        "C": "within noise", "D": "within noise",  # the tie: 0 on every seed
        "ECO": "within noise", "B": "separated", "C-kahan": "separated",  # 0.04 > 0 + resolution 0.01
        "A": "within resolution"}  # A - C-kahan = +0.005 on every seed: beyond 0, within the resolution 0.01
    assert point["A"].difference.mean == pytest.approx(0.005) and point["A"].resolution == 0.01


def test_the_report_says_which_arms_are_on_the_frontier_and_what_rests_on_noise(tmp_path):
    groups, manifest = frontier_case()
    write_runs(tmp_path / "runs", groups, manifest)
    analysis, files = write_report(tmp_path / "runs", tmp_path / "out")
    markdown = files["report.md"].read_text()
    assert "## Memory per parameter" in markdown
    lines = markdown.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("- E5M2: on the frontier")))
    assert lines[start] == ("- E5M2: on the frontier (fewest bits first): C (72.02 bits, 2.0200), D (72.02 bits, "
                            "2.0200), C-kahan (88.02 bits, 1.9800). Off it: ECO (72.02 bits, 2.1000), B (72.02 bits, "
                            "2.5000), A (96.01 bits, 1.9850). Not on it: E (no finite final loss); Dm (memory not "
                            "recorded).")
    claims = lines[start + 1:start + 6]
    assert claims[0] == "  - C and D tie on mean loss (C - D = +0.0000 [+0.0000, +0.0000] n=3)."  # said once
    assert claims[1].startswith("  - C's lead over ECO is within noise (the interval holds 0): not established "
                                "(ECO - C = +0.0800 [")
    assert claims[2] == ("  - C's lead over B is beyond its interval and the tuning resolution 0.0100 (B - C = "
                         "+0.4800 [+0.4800, +0.4800] n=3).")
    assert claims[3].startswith("  - C-kahan's lead over C is beyond its interval and the tuning resolution 0.0100 "
                                "(C-kahan - C = -0.0400")
    assert claims[4] == ("  - C-kahan's lead over A is beyond its interval but within the tuning resolution 0.0100: "
                         "not established (A - C-kahan = +0.0050 [+0.0050, +0.0050] n=3).")
    assert lines[start + 6] == ""
    # the group tables: every arm, the remedies with readable names, their bits
    assert "| E5M2 | C-kahan | adamw-rtn-kahan | 88.02 | 8 | 0 | 64 | 16 | 0.02 |" in markdown
    assert "| E5M2 | ECO | eco-rtn | 72.02 | 8 | 0 | 64 | 0 | 0.02 |" in markdown
    assert "| E5M2 | Dm | manifold-master | not recorded | - | - | - | - | - |" in markdown
    cells = [line for line in markdown.splitlines() if line.startswith("| E5M2 | C-kahan | adamw-rtn-kahan | 1.9800")]
    assert len(cells) == 1 and "| 88.02 |" in cells[0]
    assert (tmp_path / "out" / "memory_frontier.png").stat().st_size > 1000 and "](memory_frontier.png)" in markdown
    data = json.loads(files["report.json"].read_text())
    (frontier,) = data["memory_frontier"]
    assert frontier["on_frontier"] == ["C", "D", "C-kahan"] and frontier["summary"] == lines[start][2:]
    assert frontier["claims"] == [claim[4:] for claim in claims]
    assert {p["name"]: p["verdict"] for p in frontier["points"]}["A"] == "within resolution"
    groups_json = {g["arm"]: g for g in data["groups"]}
    assert groups_json["C-kahan"]["memory"]["bits"] == KAHAN_BITS and groups_json["C-kahan"]["role"] == "C-kahan"
    assert groups_json["Dm"]["memory"] == {"status": "not recorded", "bits": None, "total": None, "per_seed": {},
                                           "not_recorded": [1, 2, 3], "text": "not recorded"}
    assert any("3 cells recorded no memory per parameter" in n and "E5M2 Dm" in n for n in data["notes"])
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "cli")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "memory/loss frontier:" in result.output and "C-kahan's lead over C" in result.output


def test_runs_that_disagree_or_lack_a_record_are_said_never_averaged():
    groups, manifest = frontier_case(("C", "ECO", "B"))
    groups[1].cells[2].run.summary["memory"] = KAHAN_BITS  # one ECO run says otherwise
    del groups[2].cells[0].run.summary["memory"]  # one B run from before the record
    memory = group_memory(groups[1])
    assert memory.status == "runs disagree" and memory.bits is None and math.isnan(memory.total)
    assert memory.text == "runs disagree: 72.02 = stored 8 + moments 64 + other 0.02 (seeds 1, 2); " \
                          "88.02 = stored 8 + moments 64 + compensation 16 + other 0.02 (seed 3)"
    b = group_memory(groups[2])
    assert b.status == "recorded" and b.not_recorded == (1,) and b.short == "72.02 (not recorded: seed 1)"
    analysis = analyse(groups, manifest)
    (found,) = analysis.frontiers
    assert [p.name for p in found.points] == ["C", "B"]
    assert [(g.arm, why) for g, why in found.left_out] == [("ECO", "memory runs disagree")]
    assert any(n.startswith("The runs of a group disagree on their bits per parameter") and "E5M2 ECO" in n
               for n in analysis.notes)
    bf16 = Group("bf16", "A", "-", "adamw", [Cell("b", 1, "completed", 2.0, RunRecord(
        "b", None, {}, {"memory": None, "status": "completed"}, []))])
    assert group_memory(bf16).status == "no weight format" and group_memory(bf16).short == "-"
    assert group_memory(Group("E5M2", "A", "uniform", "adamw", [Cell("x", 1, "missing", math.nan, None)])).status \
        == "not recorded"


def test_a_place_on_too_few_seeds_or_against_the_means_sign_is_not_established():
    one = frontier_case(("C", "C-kahan"))[0]
    one[1].cells = one[1].cells[:1]  # C-kahan: seed 1 alone
    (found,) = analyse(one).frontiers
    kahan = found.points[1]
    assert kahan.on_frontier and kahan.verdict == "too few seeds"
    assert kahan.claim() == "C-kahan's lead over C: 1 paired seed (at least 2 needed): not established " \
                            "(C-kahan - C = -0.0400 (n=1))"
    groups = [frontier_group("C", losses={1: 1.9, 2: 1.9}),
              frontier_group("C-kahan", losses={1: 2.0, 2: 2.0, 3: 1.0})]  # mean 1.667 < 1.9, paired +0.1
    (found,) = analyse(groups).frontiers
    kahan = found.points[1]
    assert kahan.on_frontier and kahan.verdict == "other sign"
    # without a tuning record: beyond the interval, but the resolution is unknown
    (found,) = analyse(frontier_case(("C", "C-kahan"))[0]).frontiers
    assert found.points[1].verdict == "resolution unknown"
    assert "the tuning resolution is unknown: not established" in found.text


def test_a_matrix_without_any_memory_record_has_no_frontier(tmp_path):
    groups = [frontier_group(arm, memory=...) for arm in ("C", "Dm")]
    for g in groups[:1]:
        for cell in g.cells:
            del cell.run.summary["memory"]
    analysis = analyse(groups)
    assert analysis.frontiers == []
    write_runs(tmp_path / "runs", groups, {})
    _, files = write_report(tmp_path / "runs", tmp_path / "out")
    assert "No group recorded its memory per parameter: no frontier." in files["report.md"].read_text()
    assert "memory_frontier.png" not in files


# ---- beside the question: the stored geometry arm against the remedies ---------------------------
def with_remedies(eco=(0.03, 0.03, 0.03), kahan=(0.0, 0.01, -0.005)):
    """The established case (E3M4 ManifoldAdamW) with ECO and C-kahan: D - ECO and D - C-kahan per seed."""
    groups, manifest = established_case()
    d = next(g for g in groups if (g.format, g.arm) == ("E3M4", "D"))
    for arm, offsets, extra in (("ECO", eco, {}), ("C-kahan", kahan, {})):
        losses = {c.seed: c.final_val_loss + o for c, o in zip(d.cells, offsets)}
        group = frontier_group(arm, fmt="E3M4", losses=losses, lr=0.003, grid_lr=1.0, **extra)
        groups.append(group)
        manifest["sweeps"][group.name] = {**sweep_entry("E3M4", "C"), "arm": arm}
    return groups, manifest


def test_stored_geometry_against_eco_and_c_kahan_are_claims_under_the_same_checks():
    groups, manifest = with_remedies()
    analysis = analyse(groups, manifest)
    c = next(x for x in analysis.comparisons if x.format == "E3M4")
    assert list(c.effects) == list(EFFECTS)
    eco, kahan = c.effects["geometry_vs_eco"], c.effects["geometry_vs_kahan"]
    assert eco.paired.per_seed == pytest.approx({1: -0.03, 2: -0.03, 3: -0.03})
    assert kahan.paired.per_seed == pytest.approx({1: 0.0, 2: -0.01, 3: 0.005})
    assert [check.name for check in eco.checks] == [check.name for check in c.question.checks]
    assert eco.established and eco.family == 1 and eco.holm_p == pytest.approx(eco.paired.p)
    assert not kahan.established and {ch.name for ch in kahan.checks if not ch.ok} == {"significant", "beyond_noise"}
    assert c.label(eco) == "E3M4 ManifoldAdamW stored vs ECO (D - ECO)"
    assert c.label(kahan) == "E3M4 ManifoldAdamW stored vs C-kahan (D - C-kahan)"
    assert "E3M4 ManifoldAdamW stored vs ECO (D - ECO) -0.0300 [-0.0300, -0.0300] over n=3 seeds, Holm-adjusted " \
           "p = " in analysis.answer
    # the existing effects do not change their meaning: the same numbers and verdicts as without the remedies
    before = next(x for x in analyse(*established_case()).comparisons if x.format == "E3M4")
    for name in list(EFFECTS)[:4]:
        assert c.effects[name].paired == before.effects[name].paired
        assert c.effects[name].holm_p == before.effects[name].holm_p
        assert [ch.ok for ch in c.effects[name].checks] == [ch.ok for ch in before.effects[name].checks]
    assert analysis.null_control.status == "passes" and c.established


def test_a_remedy_that_differs_in_more_than_its_arm_is_not_paired(tmp_path):
    groups, manifest = with_remedies()
    for cell in groups[-2].cells:  # ECO
        cell.run.config["weight_decay"] = 0.0
    c = next(x for x in analyse(groups, manifest).comparisons if x.format == "E3M4")
    eco = c.effects["geometry_vs_eco"]
    assert {ch.name for ch in eco.checks if not ch.ok} == {"paired"}
    assert next(ch.detail for ch in eco.checks if ch.name == "paired").startswith(
        "D (stored) and ECO differ in more than their arms and the keys both tuned (seed 1: weight_decay 0.1 vs 0.0)")
    assert c.effects["geometry_vs_kahan"].checks[4].ok  # only its own pair is checked
    # in the files: the beside table has both rows
    groups, manifest = with_remedies()
    write_runs(tmp_path / "runs", groups, manifest)
    _, files = write_report(tmp_path / "runs", tmp_path / "out")
    markdown = files["report.md"].read_text()
    assert "| E3M4 ManifoldAdamW stored vs ECO (D - ECO) | the stored geometry arm against error feedback (ECO) | " \
           "-0.0300 " in markdown
    assert "| E3M4 ManifoldAdamW stored vs C-kahan (D - C-kahan) |" in markdown
    data = json.loads(files["report.json"].read_text())
    effects = next(x for x in data["comparisons"] if x["format"] == "E3M4")["effects"]
    assert effects["geometry_vs_eco"]["established"] and not effects["geometry_vs_kahan"]["established"]


def test_remedy_effects_appear_only_where_the_format_has_the_remedy():
    groups, manifest = with_remedies()
    groups = [g for g in groups if g.arm != "C-kahan"]
    c = next(x for x in analyse(groups, manifest).comparisons if x.format == "E3M4")
    assert "geometry_vs_eco" in c.effects and "geometry_vs_kahan" not in c.effects
