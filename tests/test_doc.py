"""TEST_MATRIX.md: generated from the code, fresh, and naming every metric a run logs."""

import dataclasses
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.experiments.doc import metric_regex, metric_registry, test_matrix
from altgrad.experiments.matrix import load_matrix
from altgrad.quantization import formats
from altgrad.quantization.formats import FloatFormat
from altgrad.training import Trainer
from altgrad.training.tracking import read_metrics
from runs import tiny_config

ROOT = Path(__file__).parent.parent
MATRIX = "configs/matrix/small.yaml"  # relative, as the committed document names it
COMMAND = f"altgrad matrix doc {MATRIX} > TEST_MATRIX.md"
runner = CliRunner()


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def document(at_root):
    return test_matrix(load_matrix(Path(MATRIX)))


def row(text, first_cell):
    """The table row whose first cell is ``first_cell``."""
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_committed_document_is_fresh(document):
    committed = (ROOT / "TEST_MATRIX.md").read_text()
    assert document == committed, f"TEST_MATRIX.md is stale: run `{COMMAND}`"


def test_first_line_says_generated_and_not_to_edit(document):
    first = document.splitlines()[0]
    assert f"altgrad matrix doc {MATRIX}" in first and "do not edit by hand" in first


def test_document_is_deterministic_and_relative(document):
    assert test_matrix(load_matrix(Path(MATRIX))) == document
    assert str(ROOT) not in document and os.path.expanduser("~") not in document


def test_cli_prints_the_document(document):
    result = runner.invoke(app, ["matrix", "doc", MATRIX])
    assert result.exit_code == 0, result.output
    assert result.stdout == document


def test_cli_missing_file_is_one_line_and_exit_code_2(tmp_path):
    result = runner.invoke(app, ["matrix", "doc", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in result.output


def test_format_rows_are_computed(document):
    assert "448" in row(document, "E4M3") and "57344" in row(document, "E5M2")
    assert "OCP E5M2" in row(document, "E5M2") and "2^64" in row(document, "E7M0")


def test_a_format_added_to_the_registry_appears(at_root, monkeypatch):
    fp6 = FloatFormat(2, 3, 1, name="E2M3", note="FP6, for the test")
    monkeypatch.setitem(formats.REGISTRY, "E2M3", fp6)
    text = test_matrix(load_matrix(Path(MATRIX)))
    assert "| E2M3 | 6 | 2 | 3 | 1 | none | 7.5 | 2^-3 | 2^0 | 2^-3 | FP6, for the test |" in text


def test_every_registered_metric_has_a_meaning():
    registry = metric_registry()
    assert registry and all(meaning for _, meaning in registry.values())


# ---- the metric registry covers what a real run logs -------------------------------------------
def undocumented(records):
    patterns = [metric_regex(pattern) for pattern in metric_registry()]
    keys = {key for record in records for key in record}
    return sorted(key for key in keys if key != "step" and not any(p.fullmatch(key) for p in patterns))


MONITORED = {"format": "E5M2", "use_shadow": True, "shadow_interval": 5, "stats_interval": 5, "rank_interval": 10,
             "weight_storage": "format", "update_rounding": "stochastic", "grad_clip_mode": "partition",
             "max_steps": 20}


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, tiny_data):
    config = tiny_config(tmp_path_factory.mktemp("doc"), tiny_data, run_name="monitored", **MONITORED)
    return read_metrics(Trainer(config).run().run_dir)


def test_documented_metrics_cover_a_monitored_run(monitored_run):
    keys = {key for record in monitored_run for key in record}
    for expected in ("quant/overflow_rate", "optim/stall_ratio", "rank/effective", "grad_cos_sim/mean",
                     "grad/clip_factor/", "val_loss"):
        assert any(key.startswith(expected) for key in keys), expected
    assert undocumented(monitored_run) == []


def test_documented_metrics_cover_a_run_with_format_shifts(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data, run_name="shifting", **MONITORED, format_shift=True, scale_margin=-3,
                         shift_patience=2)
    records = read_metrics(Trainer(config).run().run_dir)
    assert any("format_shifts" in record for record in records)
    assert undocumented(records) == []


def test_an_undocumented_metric_is_caught(monitored_run, monkeypatch):
    from altgrad.training.monitors import rank

    monkeypatch.delitem(rank.METRICS, "rank/spectral_norm/<layer>")
    assert undocumented(monitored_run) and all(key.startswith("rank/spectral_norm/")
                                               for key in undocumented(monitored_run))


def test_placeholders_match_names_not_spaces():
    pattern = metric_regex("quant/overflow_rate/<kind>/<layer>")
    assert pattern.fullmatch("quant/overflow_rate/weight/transformer.h.0.attn.c_attn")
    assert not pattern.fullmatch("quant/overflow_rate/weight")
    assert not pattern.fullmatch("quant/overflow_rate/a b/lm_head")


def test_optimizer_parameters_come_from_the_dataclass(document):
    from altgrad.optim import OptimizerSpec

    for field in dataclasses.fields(OptimizerSpec):
        assert f"| `{field.name}` |" in document
