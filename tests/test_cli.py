"""The `altgrad` command line through Typer's test runner."""

import json

import pytest
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.quantization import REGISTRY, get_format

runner = CliRunner()


def test_inspect_one_format():
    result = runner.invoke(app, ["inspect-format", "E4M3"])
    assert result.exit_code == 0, result.output
    for text in ("448", "S EEEE MMM", "17.81 binades", "grid around 1.0", "0.875"):
        assert text in result.output


def test_inspect_all_formats_side_by_side():
    result = runner.invoke(app, ["inspect-format", "--all"])
    assert result.exit_code == 0, result.output
    for name in REGISTRY:
        assert name in result.output
    assert "57344" in result.output and "2^64" in result.output


def test_json_output_lists_every_value():
    result = runner.invoke(app, ["inspect-format", "E1M6", "--json"])
    assert result.exit_code == 0
    payload = json.loads(result.output)
    required = {"name", "exponent_bits", "mantissa_bits", "bias", "max", "min_normal", "min_subnormal",
                "has_inf", "has_nan", "num_finite", "values"}
    assert required <= set(payload)
    assert payload["values"] == [i / 32 for i in range(128)]
    everything = json.loads(runner.invoke(app, ["inspect-format", "--all", "--json"]).output)
    assert [entry["name"] for entry in everything] == list(REGISTRY)
    assert everything[5]["has_inf"] is True and everything[5]["max"] == 57344


def test_custom_spec_and_grid():
    result = runner.invoke(app, ["inspect-format", "E2M1", "--grid"])
    assert result.exit_code == 0
    assert "E2M1: all 8 non-negative values" in result.output
    custom = json.loads(runner.invoke(app, ["inspect-format", "E3M4:bias=3,special=ieee", "--json"]).output)
    assert custom["values"] == list(get_format("E3M4:bias=3,special=ieee").positive_values)


def test_unknown_format_is_one_line_and_exit_code_2():
    result = runner.invoke(app, ["inspect-format", "E4M9X"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown format" in lines[0] and "E4M3" in lines[0]
    assert "Traceback" not in result.output


def test_name_and_all_together_is_an_error():
    result = runner.invoke(app, ["inspect-format", "E4M3", "--all"])
    assert result.exit_code == 2 and "not both" in result.output
    assert runner.invoke(app, ["inspect-format"]).exit_code == 2


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("altgrad ")


@pytest.mark.parametrize("options, message", [
    (["--sr-bits", "0"], "sr_bits must be an integer from 1 to 30"),
    (["--optimizer", "eco", "--weight-storage", "master"], "needs weight_storage format"),
    (["--compensation", "kahan"], "needs weight_storage format"),
    (["--weight-storage", "format", "--compensation", "simple"], "compensation must be one of none, kahan"),
])
def test_bad_remedy_options_are_one_line_and_exit_code_2(tmp_path, options, message):
    result = runner.invoke(app, ["train", "--preset", "tiny", "--format", "E5M2", "--runs-dir", str(tmp_path), *options])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing written
