"""TrainConfig's fields each declared once (help, section, unit, result, resume): the metadata is
complete, YAML takes flat keys or sections, and the CLI, compare's pairing and the resume check
derive from it exactly as their hand-written lists did."""

import dataclasses
from dataclasses import dataclass

import pytest
import typer
import yaml

from altgrad.cli import app
from altgrad.errors import UserError
from altgrad.experiments import compare
from altgrad.training import resolve_config, resume_config, setup
from altgrad.training.config import (POLICY_DEFAULT_KEYS, SECTIONS, SETTINGS, TrainConfig, config_from_dict,
                                     flatten, keys_where, option, read_yaml, sections, settings)
from altgrad.training.config_doc import config_reference

# ---- the hand-written lists the metadata replaced (as they were before issue 24) -------------------
OLD_PRECISION_KEYS = {"precision", "format", "grad_format", "rounding", "grad_rounding", "sr_bits", "scaling",
                      "amax_history_len", "scale_margin", "power_of_two_scales", "gemm_dtype", "policy",
                      "format_shift", "shift_patience", "grad_clip_mode"}
OLD_ARM_KEYS = {"optimizer", "weight_storage", "update_rounding", "grid_lr", "max_stiffness", "rung_clip",
                "grid_direction", "grid_lr_unit", "compensation", "compensation_dtype"}
OLD_PLACE_AND_MONITORING_KEYS = {
    "run_name", "runs_dir", "preset", "device", "compile", "adapt_threads", "wandb", "wandb_project", "tags",
    "log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints", "stats_interval", "dead_window",
    "use_shadow", "shadow_interval", "overflow_threshold", "underflow_threshold", "bit_stall_threshold",
    "grad_cos_threshold", "rank_interval", "rank_threshold", "critical_layers", "critical_threshold_multiplier",
    "rank_window"}  # rank_window: added after the refactor (issue 24 §6), monitoring only
OLD_RESUME_MAY_CHANGE = {"max_steps", "wandb", "run_name", "runs_dir", "adapt_threads"}
OLD_POLICY_DEFAULT_KEYS = {"rounding", "grad_rounding", "scaling", "amax_history_len", "scale_margin",
                           "power_of_two_scales", "gemm_dtype", "weight_storage", "update_rounding", "sr_bits"}
#: field -> the declarations of its `altgrad train` option (the hand-written Typer options).
OLD_CLI_OPTIONS = {
    "preset": {"--preset"}, "precision": {"--precision"}, "format": {"--format", "-f"},
    "grad_format": {"--grad-format"}, "rounding": {"--rounding"}, "grad_rounding": {"--grad-rounding"},
    "sr_bits": {"--sr-bits"}, "scaling": {"--scaling"}, "optimizer": {"--optimizer", "-o"},
    "weight_storage": {"--weight-storage"}, "update_rounding": {"--update-rounding"},
    "compensation": {"--compensation"}, "grid_lr": {"--grid-lr"}, "grid_lr_unit": {"--grid-lr-unit"},
    "grad_clip_mode": {"--grad-clip-mode"}, "format_shift": {"--format-shift", "--no-format-shift"},
    "use_shadow": {"--shadow", "--no-shadow"}, "shadow_interval": {"--shadow-interval"},
    "stats_interval": {"--stats-interval"}, "max_steps": {"--max-steps"}, "run_name": {"--run-name"},
    "runs_dir": {"--runs-dir"}, "data": {"--data"}, "seed": {"--seed"}, "device": {"--device"},
    "batch_size": {"--batch-size"}, "grad_accum": {"--grad-accum"}, "lr": {"--lr"},
    "min_lr_ratio": {"--min-lr-ratio"}, "warmup_ratio": {"--warmup-ratio"}, "eval_interval": {"--eval-interval"},
    "checkpoint_interval": {"--checkpoint-interval"}, "compile": {"--compile", "--no-compile"},
    "compile_mode": {"--compile-mode"}, "adapt_threads": {"--adapt-threads", "--fixed-threads"},
    "wandb": {"--wandb"},
}


# ---- the metadata ----------------------------------------------------------------------------------
def test_every_field_is_declared_completely():
    assert [s.name for s in settings()] == [f.name for f in dataclasses.fields(TrainConfig)]
    for s in settings():
        assert s.help.strip() and s.section in SECTIONS, s.name
        assert isinstance(s.result, bool) and isinstance(s.resumable, bool) and isinstance(s.unit, str), s.name
        assert s.axis in (None, "precision", "arm") and (s.axis is None or s.result), s.name
    assert list(sections()) == list(SECTIONS)  # every section has fields, in order


def test_defaults_are_the_declared_ones():
    config = TrainConfig()
    assert config.lr == 1e-3 and config.policy == () and config.critical_layers == ("lm_head", "*.attn.c_proj")
    assert SETTINGS["max_steps"].default == 2000 and SETTINGS["max_steps"].unit == "steps"


def test_option_checks_its_section_and_axis():
    with pytest.raises(ValueError, match="section must be one of"):
        option(1, "x", section="schedules", result=True)
    with pytest.raises(ValueError, match="axis"):
        option(1, "x", section="precision", result=False, axis="precision")


# ---- derived, and equal to what was hand-written ---------------------------------------------------
def test_compare_pairing_classes_equal_the_old_literal_sets():
    assert compare.PRECISION_KEYS == OLD_PRECISION_KEYS
    assert compare.ARM_KEYS == OLD_ARM_KEYS
    assert compare.PLACE_AND_MONITORING_KEYS == OLD_PLACE_AND_MONITORING_KEYS
    assert compare.UNPAIRED_KEYS == OLD_PRECISION_KEYS | OLD_ARM_KEYS | OLD_PLACE_AND_MONITORING_KEYS


def test_resume_and_policy_keys_equal_the_old_literal_sets():
    assert set(setup.RESUME_MAY_CHANGE) == OLD_RESUME_MAY_CHANGE == keys_where(resumable=True)
    assert set(POLICY_DEFAULT_KEYS) == OLD_POLICY_DEFAULT_KEYS


def train_options() -> dict[str, set[str]]:
    command = typer.main.get_command(app).commands["train"]
    return {p.name: set(p.opts) | set(p.secondary_opts) for p in command.params}


def test_the_cli_exposes_exactly_the_old_options():
    options = train_options()
    assert options.pop("config") == {"--config", "-c"} and options.pop("resume") == {"--resume"}
    assert options == OLD_CLI_OPTIONS
    assert {s.name for s in settings() if s.cli} == set(OLD_CLI_OPTIONS)


def test_cli_help_is_the_fields_help():
    command = typer.main.get_command(app).commands["train"]
    helps = {p.name: p.help for p in command.params}
    assert helps["lr"].startswith(SETTINGS["lr"].help)
    assert helps["max_steps"] == f"{SETTINGS['max_steps'].help} [steps]"


# ---- YAML: flat keys or sections -------------------------------------------------------------------
FLAT = {"preset": "tiny", "n_layer": 3, "lr": 0.002, "warmup_ratio": 0.1, "format": "E5M2", "precision": "fp32",
        "optimizer": "manifold", "grid_lr": 0.25, "data": "somewhere", "stats_interval": 7, "keep_checkpoints": 3,
        "seed": 5}
NESTED = {"model": {"preset": "tiny", "n_layer": 3}, "schedule": {"lr": 0.002, "warmup_ratio": 0.1},
          "precision": {"format": "E5M2", "precision": "fp32"}, "optimizer": {"optimizer": "manifold", "grid_lr": 0.25},
          "data": {"data": "somewhere"}, "monitoring": {"stats_interval": 7}, "checkpoints": {"keep_checkpoints": 3},
          "runtime": {"seed": 5}}


def test_nested_and_flat_yaml_give_the_same_config(tmp_path):
    flat, nested, mixed = tmp_path / "flat.yaml", tmp_path / "nested.yaml", tmp_path / "mixed.yaml"
    flat.write_text(yaml.safe_dump(FLAT))
    nested.write_text(yaml.safe_dump(NESTED))
    mixed.write_text("base: nested.yaml\nlr: 0.003\nschedule: {max_steps: 9}\n")
    assert read_yaml(nested) == FLAT
    assert resolve_config(nested) == resolve_config(flat)
    assert resolve_config(mixed) == dataclasses.replace(resolve_config(flat), lr=0.003, max_steps=9)
    assert config_from_dict(NESTED, "test") == config_from_dict(FLAT, "test")
    assert resolve_config(None, {"schedule": {"lr": 0.002}, "preset": "tiny"}).lr == 0.002


def test_old_flat_configs_and_saved_configs_load_unchanged(tmp_path):
    saved = TrainConfig(format="E4M3", optimizer="grid", tags=("a",)).to_dict()
    assert config_from_dict(saved, "saved") == TrainConfig(format="E4M3", optimizer="grid", tags=("a",))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert config_from_dict(read_yaml(path), str(path)).to_dict() == saved


@pytest.mark.parametrize("values, message", [
    ({"schedule": {"n_layer": 2}}, "n_layer belongs in section model, not schedule"),
    ({"model": {"learning_rate": 1}}, "unknown config key learning_rate in section model"),
    ({"lr": 0.1, "schedule": {"lr": 0.2}}, "lr is given twice"),
    ({"runtime": 3}, "section runtime in .* must be a mapping"),
])
def test_a_key_in_the_wrong_section_is_one_clear_line(tmp_path, values, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(UserError, match=message) as error:
        resolve_config(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_wrong_section_from_the_command_line_is_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    path = tmp_path / "bad.yaml"
    path.write_text("schedule: {n_layer: 2}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "belongs in section model" in result.output and len(lines) <= 2


def test_a_section_named_like_a_key_is_a_key_when_not_a_mapping():
    assert flatten({"data": "here", "precision": "fp32", "optimizer": "grid"}, "test") == \
        {"data": "here", "precision": "fp32", "optimizer": "grid"}


# ---- resume -----------------------------------------------------------------------------------------
def test_resume_changes_only_resumable_settings(tmp_path):
    from altgrad.training.trainer import write_yaml

    run = tmp_path / "run"
    run.mkdir()
    write_yaml(run / "config.yaml", TrainConfig(preset="tiny").to_dict())
    assert resume_config(run, max_steps=7, runs_dir="elsewhere").max_steps == 7
    with pytest.raises(UserError, match="--resume cannot change lr"):
        resume_config(run, lr=0.5)
    with pytest.raises(UserError, match="would change it: lr 0.5"):
        resume_config(run, requested=TrainConfig(preset="tiny", lr=0.5), given=("lr",))


# ---- adding a field is one declaration --------------------------------------------------------------
@dataclass(frozen=True)
class Extended(TrainConfig):
    knob: float = option(0.5, "a new knob", section="optimizer", unit="knobs", result=True, cli=True)
    label_note: str = option("", "a note recorded with the run", section="monitoring", result=False,
                             resumable=True)


def test_one_declaration_reaches_every_derived_list():
    from altgrad.cli.train import option_parameters

    assert [s.name for s in sections(Extended)["optimizer"]][-1] == "knob"
    assert "knob" in keys_where(Extended, result=True, axis=None)  # paired runs must agree on it
    assert "label_note" in keys_where(Extended, result=False) and "label_note" in keys_where(Extended, resumable=True)
    assert "knob" in {p.name for p in option_parameters(Extended)}
    assert "label_note" not in {p.name for p in option_parameters(Extended)}
    page = config_reference(Extended)
    assert "| `knob` | `float` | `0.5` | knobs | yes | no | `--knob` | a new knob |" in page
    assert Extended(knob=2.0).to_dict()["knob"] == 2.0


def test_a_field_without_its_declaration_is_refused():
    @dataclass(frozen=True)
    class Undeclared(TrainConfig):
        bare: int = 3

    with pytest.raises(TypeError, match="Undeclared.bare is declared without option"):
        settings(Undeclared)
