"""The experiment matrix (experiments/matrix.py, launch.py, status.py): expansion and validation
before anything runs, skip-completed and resume-interrupted, failure isolation, the submitit
path with its debug executor, and the CLI."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.errors import UserError
from altgrad.experiments.launch import MatrixRunner, read_manifest, run_cell
from altgrad.experiments.ownership import CellBusy, cell_lock
from altgrad.experiments.matrix import config_hash, load_matrix, with_settings
from altgrad.experiments.status import cell_status
from altgrad.provenance import code_version
from altgrad.training.checkpoint import list_checkpoints
from altgrad.training.tracking import read_metrics
from runs import without_rates

runner = CliRunner()
CONFIGS = Path(__file__).parent.parent / "configs"


def write_matrix(tmp_path, data, **changes):
    spec = {
        "preset": "tiny",
        "settings": {"data": str(data), "max_steps": 12, "eval_interval": 6, "checkpoint_interval": 6,
                     "log_interval": 3, "stats_interval": 3, "rank_interval": 6, "device": "cpu"},
        "runs_dir": str(tmp_path / "runs"),
        "seeds": [1, 2],
        "formats": ["bf16", "E5M2", "E3M4"],
        "arms": {"A": {"optimizer": "adamw"},
                 "C": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic"},
                 "E": {"optimizer": "grid", "sweep": {"grid_lr": [0.5, 1.0]}}},
        "layers": {"uniform": {"format": "{format}"},
                   "post-ln": {"policy": [{"layers": ["*.attn.c_attn", "*.mlp.c_fc"], "format": "{format}"}]}},
        "sweep": {"max_steps": 6},
        "cells": [{"formats": ["bf16"], "arms": ["A"]},
                  {"formats": ["E5M2"], "arms": ["A", "C", "E"]},
                  {"formats": ["E3M4"], "arms": ["E"], "layers": ["post-ln"], "expected_failure": "a test"}],
    }
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / "matrix.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- expansion and validation ----------------------------------------------------------------
def test_cells_are_every_combination_and_seed_with_their_resolved_configs(tmp_path, tiny_data):
    matrix = load_matrix(write_matrix(tmp_path, tiny_data))
    cells = matrix.cells()
    assert [c.name for c in cells] == ["bf16-A-s1", "bf16-A-s2", "e5m2-A-s1", "e5m2-A-s2", "e5m2-C-s1", "e5m2-C-s2",
                                       "e5m2-E-s1", "e5m2-E-s2", "e3m4-E-post-ln-s1", "e3m4-E-post-ln-s2"]
    by_name = {c.name: c for c in cells}
    assert by_name["bf16-A-s1"].config.format is None and by_name["bf16-A-s1"].config.quant_policy() is None
    assert by_name["bf16-A-s1"].layers == "-"
    c = by_name["e5m2-C-s2"].config
    assert (c.format, c.seed, c.arm, c.max_steps, c.data) == ("E5M2", 2, "adamw-sr", 12, str(tiny_data))
    post = by_name["e3m4-E-post-ln-s1"]
    assert post.config.policy == ({"layers": ["*.attn.c_attn", "*.mlp.c_fc"], "format": "E3M4"},)
    assert post.expected_failure == "a test" and post.config.arm == "grid-sr"
    assert by_name["e5m2-E-s1"].config.grid_lr == 0.5  # the arm's own value until the sweep has run
    swept = matrix.cells({"e5m2-E": {"grid_lr": 1.0}})
    assert {c.name: c.config.grid_lr for c in swept}["e5m2-E-s2"] == 1.0
    sweeps = matrix.sweep_cells()
    assert [(c.name, c.seed, c.config.max_steps, c.config.grid_lr) for c in sweeps] == [
        ("sweep-e5m2-E-grid_lr0.5", 3, 6, 0.5), ("sweep-e5m2-E-grid_lr1", 3, 6, 1.0),
        ("sweep-e3m4-E-post-ln-grid_lr0.5", 3, 6, 0.5), ("sweep-e3m4-E-post-ln-grid_lr1", 3, 6, 1.0)]


def test_a_folder_is_named_by_the_cell_and_a_hash_of_what_it_computes(tmp_path, tiny_data):
    matrix = load_matrix(write_matrix(tmp_path, tiny_data))
    cell = matrix.cells()[2]
    assert cell.folder == f"e5m2-A-s1-{config_hash(cell.config)}" and len(cell.folder.rsplit("-", 1)[1]) == 8
    elsewhere = with_settings(matrix, runs_dir=tmp_path / "elsewhere").cells()[2]
    assert elsewhere.folder == cell.folder  # places are not part of the hash
    fixed = dataclasses.replace(cell.config, adapt_threads=False)
    assert config_hash(fixed) == config_hash(cell.config)  # nor the CPU thread policy: it changes no result
    other_data = with_settings(matrix, data=str(tmp_path / "other")).cells()[2]
    assert other_data.folder != cell.folder  # the data is
    assert load_matrix(write_matrix(tmp_path, tiny_data, seeds=[1, 2])).cells()[2].folder == cell.folder


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key(s) bogus"),
    ({"arms": {"A": {"optimiser": "adamw"}}}, "arm A: unknown key(s) optimiser"),
    ({"cells": [{"formats": ["E9M9"], "arms": ["A"]}]}, "unknown format(s) E9M9"),
    ({"cells": [{"formats": ["E5M2"], "arms": ["Z"]}]}, "unknown arm(s) Z"),
    ({"cells": [{"formats": ["bf16"], "arms": ["E"]}]}, "cell bf16-E-s1: optimizer grid moves weights"),
    ({"cells": [{"formats": ["E5M2"], "arms": ["A"]}, {"formats": ["E5M2"], "arms": ["A"]}]}, "listed twice"),
    ({"layers": {"uniform": {"format": "E4M3"}}}, "never uses {format}"),
    ({"arms": {"A": {"optimizer": "adamw", "sweep": {"lr": 0.1}}}}, "at least two positive numbers"),
    ({"cells": [{"formats": ["E5M2"], "arms": ["A"], "color": 1}]}, "unknown key(s) color"),
    ({"cells": None}, "no cells"),
    ({"formats": ["bf16", "E5M2", "E3M4", "E10M9"], "cells": [{"formats": ["E10M9"], "arms": ["A"]}]},
     "cell e10m9-A-s1"),
])
def test_bad_matrices_are_errors_before_anything_runs(tmp_path, tiny_data, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_matrix(write_matrix(tmp_path, tiny_data, **change))
    assert not (tmp_path / "runs").exists()


def test_the_shipped_matrices_load():
    small = load_matrix(CONFIGS / "matrix" / "small.yaml")
    groups = {(c.format, c.arm, c.layers) for c in small.cells()}
    for fmt in ("E5M2", "E3M4"):
        assert {(fmt, arm, "uniform") for arm in ("A", "B", "C", "ECO", "C-kahan", "D", "Dm", "E", "Em")} <= groups
    assert {("E4M3", "A", "uniform"), ("E4M3", "Dm", "uniform"), ("E4M3", "ECO", "uniform"),
            ("E4M3", "C-kahan", "uniform"), ("E7M0", "A", "uniform"), ("E7M0", "E", "uniform"), ("bf16", "A", "-"),
            ("E1M6", "C", "post-ln"), ("E1M6", "Du", "post-ln")} <= groups
    arms = {c.arm: c.config.arm for c in small.cells() if c.format == "E5M2"}
    assert arms == {"A": "adamw", "B": "adamw-rtn", "C": "adamw-sr", "D": "manifold-sr", "Dm": "manifold-master",
                    "E": "grid-sr", "Em": "grid-master", "ECO": "eco-rtn", "C-kahan": "adamw-rtn-kahan"}
    paper = load_matrix(CONFIGS / "matrix" / "paper.yaml")
    assert {(fmt, arm) for fmt in ("E5M2", "E4M3", "E3M4") for arm in ("ECO", "C-kahan")} <= \
        {(c.format, c.arm) for c in paper.cells()}
    for name in ("small", "paper", "tiny"):  # the protocol: a tuning seed apart, the cells' horizon, inherited lr
        shipped = load_matrix(CONFIGS / "matrix" / f"{name}.yaml")
        assert shipped.tuning_seed not in shipped.evaluation_seeds and "max_steps" not in shipped.sweep
        sources = {arm: values["lr"]["from"] for arm, values in shipped.arms.items() if isinstance(values.get("lr"), dict)}
        assert sources.get("D") == "C" and sources.get("Dm") == "A"  # each geometry arm beside its AdamW partner
    # five evaluation seeds for what the answer compares, three for B (inheriting A's lr) and E7M0
    seeds = {}
    for cell in small.cells():
        seeds.setdefault(cell.group, set()).add(cell.seed)
    assert {group for group, s in seeds.items() if s != {1337, 1338, 1339, 1340, 1341}} == \
        {"e5m2-B", "e3m4-B", "e7m0-A", "e7m0-C", "e7m0-E"}
    assert seeds["e5m2-B"] == {1337, 1338, 1339} and small.tuning_seed == 1342 and small.budget == 5
    assert "e5m2-B" not in {c.group for c in small.sweep_cells()} and small.arms["B"]["lr"] == {"from": "A"}
    assert all(c.expected_failure for c in small.cells() if c.format == "E7M0")
    assert {c.config.lr for c in small.sweep_cells() if c.format == "bf16"} == {0.002, 0.004, 0.008}  # every arm
    assert len(load_matrix(CONFIGS / "matrix" / "tiny.yaml").cells()) == 27
    assert load_matrix(CONFIGS / "matrix" / "paper.yaml").preset == "paper"


# ---- running -----------------------------------------------------------------------------------
def small_matrix(tmp_path, data, **changes):
    """Two formats, one arm, two seeds: four short cells and no sweep."""
    return write_matrix(tmp_path, data, **{"arms": {"A": {"optimizer": "adamw"}},
                                           "cells": [{"formats": ["bf16", "E5M2"], "arms": ["A"]}], **changes})


def test_a_run_trains_every_cell_records_it_and_a_second_run_repeats_nothing(tmp_path, tiny_data):
    matrix = load_matrix(small_matrix(tmp_path, tiny_data))
    manifest = MatrixRunner(matrix, jobs=2).run()
    cells = matrix.cells()
    assert {c.folder for c in cells} == set(manifest["cells"])
    assert manifest["code"] == code_version()  # what ran the matrix; each cell's summary has its own
    for cell in cells:
        entry = manifest["cells"][cell.folder]
        assert entry["status"] == "completed" and entry["attempts"] == 1 and entry["steps"] == 12
        assert entry["host"] and entry["started"] <= entry["ended"] and Path(entry["log"]).exists()
        assert read_metrics(matrix.runs_dir / cell.folder)[-1]["step"] == 12
        assert not (matrix.runs_dir / cell.folder / "checkpoints").exists()  # finished: only its records stay
    stamps = {c.folder: (matrix.runs_dir / c.folder / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    again = MatrixRunner(matrix, jobs=1).run()
    assert all(again["cells"][f]["attempts"] == 1 for f in stamps)
    assert stamps == {c.folder: (matrix.runs_dir / c.folder / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    assert read_manifest(matrix.runs_dir)["cells"] == again["cells"]
    rows = cell_status(matrix)
    assert [r["status"] for r in rows] == ["completed"] * 4 and all(r["steps"] == 12 for r in rows)


def test_finished_cells_keep_their_checkpoints_when_asked(tmp_path, tiny_data):
    matrix = load_matrix(small_matrix(tmp_path, tiny_data, cells=[{"formats": ["bf16"], "arms": ["A"], "seeds": [1]}]))
    MatrixRunner(matrix, keep_checkpoints=True).run()
    (cell,) = matrix.cells()
    assert [int(p.stem.removeprefix("step_")) for p in list_checkpoints(matrix.runs_dir / cell.folder)] == [6, 12]


def test_sweeps_run_first_and_their_best_value_is_used_for_every_seed(tmp_path, tiny_data):
    matrix = load_matrix(write_matrix(tmp_path, tiny_data, cells=[{"formats": ["E5M2"], "arms": ["E"]}]))
    manifest = MatrixRunner(matrix, jobs=2).run()
    sweep = manifest["sweeps"]["e5m2-E"]
    assert sweep["keys"] == ["grid_lr"] and sweep["settled"] and sweep["horizon"] == "short"
    tried = {t["values"]["grid_lr"]: t["final_val_loss"] for t in sweep["trials"]}
    assert {0.5, 1.0} <= set(tried) and len(tried) == sweep["spent"] <= sweep["budget"]
    best = min(tried, key=tried.get)
    assert sweep["best"] == {"grid_lr": best}
    main = [e for e in manifest["cells"].values() if not e.get("sweep")]
    assert len(main) == 2 and all(e["status"] == "completed" for e in main)
    for entry in main:
        config = yaml.safe_load((matrix.runs_dir / entry["folder"] / "config.yaml").read_text())
        assert config["grid_lr"] == sweep["best"]["grid_lr"] and config["max_steps"] == 12


def test_a_failing_cell_is_recorded_and_never_stops_the_others(tmp_path, tiny_data):
    path = small_matrix(tmp_path, tiny_data, arms={"A": {"optimizer": "adamw"},
                                                   "X": {"optimizer": "adamw", "data": str(tmp_path / "missing")}},
                        cells=[{"formats": ["bf16"], "arms": ["A", "X"]}])
    result = runner.invoke(app, ["matrix", "run", str(path)])
    assert result.exit_code == 1
    manifest = read_manifest(tmp_path / "runs")
    status = {e["name"]: e for e in manifest["cells"].values()}
    assert status["bf16-A-s1"]["status"] == status["bf16-A-s2"]["status"] == "completed"
    assert status["bf16-X-s1"]["status"] == "failed" and "missing" in status["bf16-X-s1"]["error"]
    assert "UserError" in Path(status["bf16-X-s1"]["log"]).read_text()
    shown = runner.invoke(app, ["matrix", "status", str(path), "--json"])
    rows = {r["name"]: r for r in json.loads(shown.output)}
    assert rows["bf16-X-s2"]["status"] == "failed" and rows["bf16-X-s2"]["log"].endswith("matrix.log")
    again = MatrixRunner(load_matrix(path)).run()  # not retried unless asked
    assert {e["name"]: e["attempts"] for e in again["cells"].values()}["bf16-X-s1"] == 1
    retried = MatrixRunner(load_matrix(path), retry_failed=True).run()
    assert {e["name"]: e["attempts"] for e in retried["cells"].values()}["bf16-X-s1"] == 2


def test_a_killed_matrix_resumes_without_repeating_or_losing_anything(tmp_path, tiny_data):
    """Kill the whole matrix (process group) mid-cell, run it again: finished cells are not
    touched, the interrupted one resumes from its checkpoint, and every run's records equal
    those of a matrix that was never interrupted."""
    settings = {"data": str(tiny_data), "max_steps": 60, "eval_interval": 20, "checkpoint_interval": 10,
                "log_interval": 5, "device": "cpu"}
    killed = small_matrix(tmp_path / "a", tiny_data, settings=settings, runs_dir=str(tmp_path / "a" / "runs"))
    command = [sys.executable, "-m", "altgrad", "matrix", "run", str(killed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    matrix = load_matrix(killed)
    runs = matrix.runs_dir
    deadline = time.time() + 120
    while time.time() < deadline:  # the first cell finished and the second has a checkpoint
        done = [c for c in matrix.cells() if (runs / c.folder / "summary.json").exists()]
        started = [c for c in matrix.cells() if list((runs / c.folder / "checkpoints").glob("step_*.pt"))
                   and c not in done]
        if done and started:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert done and started, "the matrix did not get far enough to be killed mid-cell"
    finished = {c.folder: (runs / c.folder / "metrics.jsonl").stat().st_mtime_ns for c in done}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    assert finished == {f: (runs / f / "metrics.jsonl").stat().st_mtime_ns for f in finished}  # not repeated
    reference = with_settings(matrix, runs_dir=tmp_path / "b" / "runs")
    MatrixRunner(reference).run()
    for cell in matrix.cells():
        assert without_rates(read_metrics(runs / cell.folder)) == \
            without_rates(read_metrics(reference.runs_dir / cell.folder)), cell.folder
    assert all(e["status"] == "completed" for e in read_manifest(runs)["cells"].values())


def _children(pid):
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_kill_9_of_the_matrix_process_alone_ends_its_workers(tmp_path, tiny_data):
    """The OOM killer's way: SIGKILL to the main process only, not its group. Its workers end
    within seconds, and nothing writes to the cells after."""
    settings = {"data": str(tiny_data), "max_steps": 100000, "eval_interval": 50, "checkpoint_interval": 50,
                "log_interval": 5, "device": "cpu"}
    path = small_matrix(tmp_path, tiny_data, settings=settings)
    process = subprocess.Popen([sys.executable, "-m", "altgrad", "matrix", "run", str(path), "--jobs", "2"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = load_matrix(path).runs_dir
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both workers are training
            training = [m for m in runs.glob("*/metrics.jsonl") if m.stat().st_size > 0]
            if len(training) >= 2:
                break
            time.sleep(0.1)
        workers = _children(process.pid)
        assert len(training) >= 2 and workers, "the matrix did not start its workers"
        os.kill(process.pid, signal.SIGKILL)  # the main process only
        process.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the matrix process"
        sizes = {m: m.stat().st_size for m in runs.glob("*/metrics.jsonl")}
        time.sleep(1.5)
        assert sizes == {m: m.stat().st_size for m in runs.glob("*/metrics.jsonl")}  # nothing writes on
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_cell_another_process_trains_is_left_alone(tmp_path, tiny_data):
    """A cell is owned by the process that trains it: while its lock is held elsewhere, a run of
    the matrix records it as failed with why and never touches its folder; then it trains."""
    matrix = load_matrix(small_matrix(tmp_path, tiny_data))
    runner = MatrixRunner(matrix)
    cell = matrix.cells()[0]
    folder = matrix.runs_dir / cell.folder
    folder.mkdir(parents=True)
    (folder / "matrix.log").write_text("another process writes here\n")
    with cell_lock(matrix.runs_dir, cell.folder):
        outcome = run_cell(runner._spec(cell))
        assert outcome["status"] == "failed"
        assert f"{cell.folder} is being trained by pid {os.getpid()}" in outcome["error"]
        assert [p.name for p in folder.iterdir()] == ["matrix.log"]  # untouched: not cleared, not resumed
        with pytest.raises(CellBusy):  # and a second owner cannot take it, even in this process
            with cell_lock(matrix.runs_dir, cell.folder):
                pass
    assert run_cell(runner._spec(cell))["status"] == "completed"  # released: it trains


def test_the_submitit_path_with_its_debug_executor(tmp_path, tiny_data):
    pytest.importorskip("submitit")
    path = small_matrix(tmp_path, tiny_data, launcher={"slurm": {"cluster": "local", "timeout_min": 5}})
    result = runner.invoke(app, ["matrix", "run", str(path), "--launcher", "slurm", "--slurm", "cluster=debug"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "runs")
    assert len(manifest["cells"]) == 4
    assert all(e["status"] == "completed" and e["job_id"] for e in manifest["cells"].values())
    assert (tmp_path / "runs" / "submitit").is_dir()


def test_the_cli_dry_run_shows_cells_and_runs_nothing(tmp_path, tiny_data):
    path = write_matrix(tmp_path, tiny_data)
    result = runner.invoke(app, ["matrix", "run", str(path), "--dry-run"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "tuning: 4 first runs on seed 3" in text and "10 cells" in text and "e3m4-E-post-ln-s2" in text
    assert not (tmp_path / "runs").exists()
    bad = runner.invoke(app, ["matrix", "run", str(tmp_path / "nope.yaml")])
    assert bad.exit_code == 2 and "not found" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["matrix", "run", str(path), "--launcher", "pbs"]).exit_code == 2


def test_a_format_can_carry_settings_or_come_from_a_policy_file(tmp_path, tiny_data):
    formats = ["bf16", "E5M2", {"name": "E4M3-g4", "format": "E4M3", "grad_format": "E4M3"},
               {"name": "mixed", "config": str(CONFIGS / "mixed_precision.yaml")}]
    path = write_matrix(tmp_path, tiny_data, formats=formats,
                        cells=[{"formats": ["E4M3-g4", "mixed"], "arms": ["A"], "layers": ["uniform", "post-ln"]}])
    cells = {c.name: c.config for c in load_matrix(path).cells()}
    assert set(cells) == {"e4m3-g4-A-s1", "e4m3-g4-A-s2", "e4m3-g4-A-post-ln-s1", "e4m3-g4-A-post-ln-s2",
                          "mixed-A-s1", "mixed-A-s2"}  # a policy of its own: the layers axis does not apply
    assert (cells["e4m3-g4-A-s1"].format, cells["e4m3-g4-A-s1"].grad_format) == ("E4M3", "E4M3")
    assert cells["e4m3-g4-A-post-ln-s1"].policy[0]["format"] == "E4M3"
    mixed = cells["mixed-A-s1"]
    assert mixed.policy[2] == {"layers": "*.attn.c_attn", "format": "E5M2"} and mixed.run_name != "mixed-precision"
    for bad, message in (({"name": "x"}, "needs a format"), ({"format": "E4M3"}, "mapping with a name"),
                         ({"name": "x", "format": "E4M3", "colour": 1}, "unknown key")):
        with pytest.raises(UserError, match=message):
            load_matrix(write_matrix(tmp_path, tiny_data, formats=["bf16", bad]))


def test_cells_of_an_earlier_matrix_are_superseded_not_reported(tmp_path, tiny_data):
    path = small_matrix(tmp_path, tiny_data, cells=[{"formats": ["bf16"], "arms": ["A"]}])
    first = MatrixRunner(load_matrix(path)).run()
    old = set(first["cells"])
    changed = small_matrix(tmp_path, tiny_data, arms={"A": {"optimizer": "adamw", "lr": 0.002}},
                           cells=[{"formats": ["bf16"], "arms": ["A"]}])
    second = MatrixRunner(load_matrix(changed)).run()
    assert set(second["superseded"]) == old and not old & set(second["cells"])
    assert all((tmp_path / "runs" / folder).is_dir() for folder in old)  # nothing deleted
    from altgrad.experiments.report import collect

    _, groups, _ = collect(tmp_path / "runs")
    assert [len(g.cells) for g in groups] == [2]
