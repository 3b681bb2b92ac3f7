"""The experiment matrix: formats x optimizer arms x layer policies x seeds, from one YAML file.

A matrix file names what every cell starts from (``preset`` and/or a ``config`` file, then
``settings``), the axes (``formats``, ``arms``, ``layers``, ``seeds``) and which combinations to
run (``cells``)::

    preset: small
    config: ../bf16_baseline.yaml          # relative to this file
    settings: {data: data/eurlex-byte}     # changes for every cell
    runs_dir: runs/matrix-small            # the cells' run folders and the manifest
    seeds: [1337, 1338, 1339]
    formats: [bf16, E5M2, E3M4,            # bf16 / fp32: the baseline, no FP8 layer
              {name: E4M3-g4, format: E4M3, grad_format: E4M3},   # a format with other settings
              {name: mixed, config: ../mixed_precision.yaml}]     # a policy file's precision policy
    arms:                                  # DESIGN §4; any config keys, plus an optional sweep
      A: {optimizer: adamw}
      D: {optimizer: manifold, sweep: {grid_lr: [0.25, 0.5, 1.0]}}
    layers:                                # layer policies; "{format}" stands for the cell's format
      uniform: {format: "{format}"}
      post-ln: {policy: [{layers: ["*.attn.c_attn", "*.mlp.c_fc"], format: "{format}"}]}
    sweep: {seed: 1337, max_steps: 500}    # the learning-rate sweep: one seed, shorter
    cells:
      - {formats: [bf16], arms: [A]}
      - {formats: [E5M2, E3M4], arms: [A, D], layers: [uniform]}
      - {formats: [E7M0], arms: [A], expected_failure: "powers of two only"}
    launcher: {slurm: {timeout_min: 60}}   # submitit executor options (--launcher slurm)

A cell's config is resolved in that order: preset < config file < settings < layer policy <
arm < seed (< the swept value). An arm with a ``sweep`` first runs one short run per value on
the sweep seed for every (format, arm, layers) group it is in; the value with the lowest final
validation loss is recorded and used for all seeds. Unknown keys, unknown names and impossible
cells (an optimizer that needs a weight format on the baseline, a bad format) are errors that
name the cell, before anything runs.

Every cell is one ordinary training run in ``runs_dir/<cell>-<hash>``: the cell's name and the
first 8 hex digits of a hash of its resolved config (places and W&B settings left out), so a
changed config is a new run and never continues an old one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..training.config import FIELD_NAMES, PRESETS, TrainConfig, coerce, read_yaml

BASELINES = ("bf16", "fp32")
TOP_KEYS = ("preset", "config", "settings", "runs_dir", "seeds", "formats", "arms", "layers", "sweep", "cells",
            "launcher", "description")
CELL_KEYS = ("formats", "arms", "layers", "seeds", "expected_failure", "sweep")
SWEEP_KEYS = ("seed", "max_steps")
#: Config keys that do not change what a run computes: left out of the hash.
UNHASHED = ("run_name", "runs_dir", "wandb", "wandb_project", "tags", "adapt_threads")  # nothing a run computes
PLACEHOLDER = "{format}"


@dataclass(frozen=True)
class Cell:
    """One run of the matrix."""

    name: str  # e5m2-D-uniform-s1337, or sweep-e5m2-D-uniform-grid_lr0.5
    format: str  # E5M2, or bf16 / fp32 for the baseline
    arm: str
    layers: str  # the layer policy's name; "-" for the baseline
    seed: int
    overrides: dict[str, Any]  # on top of the matrix's base: layer policy, arm, seed, swept value
    expected_failure: str | None = None
    sweep: tuple[str, Any] | None = None  # (key, value) of a sweep run
    config: TrainConfig | None = field(default=None, compare=False)

    @property
    def group(self) -> str:
        """The (format, arm, layers) group: what seeds repeat and a sweep tunes."""
        return group_name(self.format, self.arm, self.layers)

    @cached_property
    def folder(self) -> str:
        return f"{self.name}-{config_hash(self.config)}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "arm": self.arm, "layers": self.layers, "seed": self.seed,
                "group": self.group, "expected_failure": self.expected_failure,
                "sweep": list(self.sweep) if self.sweep else None}


def group_name(fmt: str, arm: str, layers: str) -> str:
    """``e5m2-D``, ``e1m6-E-post-ln``: a group's name, and the stem of its cells' names."""
    return f"{fmt.lower()}-{arm}" + layer_suffix(layers, "-{}")


def layer_suffix(layers: str, template: str = " {}") -> str:
    """A layer policy as it follows a format in names and text: nothing for uniform layers (or
    the baseline's "-"), else ``template`` filled with it."""
    return "" if layers in ("uniform", "-") else template.format(layers)


def config_hash(config: TrainConfig) -> str:
    """8 hex digits of the settings that differ from the defaults (so a new setting with a default
    keeps old runs' names), places and W&B left out."""
    defaults = TrainConfig().to_dict()
    values = {k: v for k, v in config.to_dict().items() if k not in UNHASHED and v != defaults.get(k)}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _fill(value: Any, fmt: str) -> Any:
    """The layer policy with the cell's format in place of ``{format}``."""
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, fmt)
    if isinstance(value, list):
        return [_fill(v, fmt) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, fmt) for k, v in value.items()}
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping")
    return value


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, (str, int)):
        return [str(value)]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a name or a non-empty list of names")
    return [str(v) for v in value]


def _check_config_keys(values: dict[str, Any], where: str, extra: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(values) - set(FIELD_NAMES) - set(extra))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; config keys are those of `altgrad train` "
                        f"configs (e.g. optimizer, weight_storage, update_rounding, grid_lr, lr, format, policy)")


@dataclass(frozen=True)
class Matrix:
    path: Path
    preset: str
    config: Path | None
    settings: dict[str, Any]
    runs_dir: Path
    seeds: tuple[int, ...]
    formats: dict[str, dict[str, Any]]  # name -> its config changes (a policy of its own ignores the layers axis)
    arms: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]]
    sweep: dict[str, Any]
    cells_spec: tuple[dict[str, Any], ...]
    launcher: dict[str, Any]
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)  # the settings of the config file, read once

    # ---- cells ----------------------------------------------------------------------------
    def _resolve(self, name: str, overrides: dict[str, Any]) -> TrainConfig:
        """preset < config file < settings < overrides; a None in overrides unsets the key."""
        where = f"matrix {self.path}: cell {name}"
        try:
            values = {**PRESETS[self.preset], **self.base, **self.settings,
                      **overrides, "preset": self.preset, "runs_dir": str(self.runs_dir)}
            unset = {k for k, v in values.items() if v is None}
            values = coerce({k: v for k, v in values.items() if v is not None}, where)
            return TrainConfig(**values, **{k: None for k in unset})
        except UserError as error:
            raise UserError(f"{where}: {str(error).removeprefix('bad config: ')}") from None
        except (TypeError, ValueError) as error:
            raise UserError(f"{where}: {error}") from None

    def _own_policy(self, fmt: str) -> bool:
        """The baseline, or a format entry with a policy of its own: the layers axis does not apply."""
        return fmt.lower() in BASELINES or "policy" in self.formats[fmt]

    def _overrides(self, fmt: str, arm: str, layers: str, seed: int) -> dict[str, Any]:
        arm_values = {k: v for k, v in self.arms[arm].items() if k != "sweep"}
        spec = self.formats[fmt]
        if fmt.lower() in BASELINES:
            policy = {"precision": fmt.lower(), "format": None, "policy": []}
        elif "policy" in spec:
            policy = {"format": None, **spec}
        else:
            extra = {k: v for k, v in spec.items() if k != "format"}
            policy = {"format": None, "policy": [], **_fill(copy.deepcopy(self.layers[layers]), spec["format"]),
                      **extra}
        return {**policy, **arm_values, "seed": seed}

    def _combinations(self) -> list[tuple[str, str, str, tuple[int, ...], str | None, bool]]:
        """(format, arm, layers, seeds, expected_failure, swept) of every cell entry, in file order."""
        combos, seen = [], set()
        for index, entry in enumerate(self.cells_spec):
            where = f"matrix {self.path}: cells entry {index + 1}"
            unknown = sorted(set(entry) - set(CELL_KEYS))
            if unknown:
                raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(CELL_KEYS)}")
            formats = _names(entry.get("formats"), f"{where}: formats")
            arms = _names(entry.get("arms"), f"{where}: arms")
            default = "uniform" if "uniform" in self.layers else next(iter(self.layers))
            layers = _names(entry.get("layers", default), f"{where}: layers")
            seeds = tuple(int(s) for s in entry.get("seeds", self.seeds))
            swept = entry.get("sweep", True)
            if not isinstance(swept, bool):
                raise UserError(f"{where}: sweep must be true or false (false: these cells keep the arm's value)")
            for kind, names, known in (("format", formats, self.formats), ("arm", arms, self.arms),
                                       ("layer policy", layers, self.layers)):
                missing = [n for n in names if n not in known]
                if missing:
                    raise UserError(f"{where}: unknown {kind}(s) {', '.join(missing)}; "
                                    f"the matrix has {', '.join(known) or 'none'}")
            for fmt in formats:
                for arm in arms:
                    for policy in (["-"] if self._own_policy(fmt) else layers):
                        key = (fmt, arm, policy)
                        if key in seen:
                            raise UserError(f"{where}: {fmt} x {arm} x {policy} is listed twice")
                        seen.add(key)
                        combos.append((fmt, arm, policy, seeds, entry.get("expected_failure"), swept))
        return combos

    def sweep_cells(self) -> list[Cell]:
        """The short one-seed runs of every group whose arm has a sweep."""
        cells = []
        seed, steps = int(self.sweep.get("seed", self.seeds[0])), self.sweep.get("max_steps")
        for fmt, arm, layers, _, expected, swept in self._combinations():
            for key, values in (self.arms[arm].get("sweep", {}) if swept else {}).items():
                for value in values:
                    name = f"sweep-{group_name(fmt, arm, layers)}-{key}{value}"
                    overrides = {**self._overrides(fmt, arm, layers, seed), key: value}
                    if steps is not None:
                        overrides["max_steps"] = int(steps)
                    cells.append(Cell(name, fmt, arm, layers, seed, overrides, expected, (key, value),
                                      self._resolve(name, overrides)))
        return cells

    def cells(self, swept: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
        """The main runs: every combination and seed. ``swept``: group -> {key: best value} (the
        sweep's results); a group whose sweep has not run yet gets the arm's own value."""
        cells = []
        for fmt, arm, layers, seeds, expected, _ in self._combinations():
            group = group_name(fmt, arm, layers)
            for seed in seeds:
                name = f"{group}-s{seed}"
                overrides = {**self._overrides(fmt, arm, layers, seed), **(swept or {}).get(group, {})}
                cells.append(Cell(name, fmt, arm, layers, seed, overrides, expected, None,
                                  self._resolve(name, overrides)))
        return cells


def _sweep_values(arm: str, spec: Any, where: str) -> dict[str, list[Any]]:
    spec = _mapping(spec, f"{where}: arm {arm}: sweep")
    if len(spec) != 1:
        raise UserError(f"{where}: arm {arm}: sweep takes one key and its values, e.g. {{grid_lr: [0.25, 0.5, 1]}}")
    key, values = next(iter(spec.items()))
    _check_config_keys({key: None}, f"{where}: arm {arm}: sweep")
    if not isinstance(values, list) or len(values) < 2:
        raise UserError(f"{where}: arm {arm}: sweep {key} needs a list of at least two values")
    return {key: values}


def _formats(entries: Any, path: Path, where: str) -> dict[str, dict[str, Any]]:
    """The formats axis: names (``E5M2``; ``bf16``/``fp32`` for the baseline) or mappings with a
    ``name`` and config changes (``format``, ``grad_format``, ...) or a ``config`` file whose
    precision policy (its format, policy, gradient format, rounding and scaling keys) is taken."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: formats must be a non-empty list of format names or mappings with a name")
    formats: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, str):
            name, spec = entry, ({} if entry.lower() in BASELINES else {"format": entry})
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, spec = entry["name"], {k: v for k, v in entry.items() if k != "name"}
            if "config" in spec:
                from .compare import PRECISION_KEYS

                values = read_yaml(path.parent / str(spec.pop("config")))
                spec = {**{k: v for k, v in values.items() if k in PRECISION_KEYS}, **spec}
            _check_config_keys(spec, f"{where}: format {name}")
            if "format" not in spec and "policy" not in spec:
                raise UserError(f"{where}: format {name} needs a format, a policy or a config file with one")
        else:
            raise UserError(f"{where}: a formats entry is a name or a mapping with a name, got {entry!r}")
        if name in formats:
            raise UserError(f"{where}: format {name} is listed twice")
        formats[name] = spec
    return formats


def load_matrix(path: Path) -> Matrix:
    """A matrix file, checked (see the module doc); every cell's config is resolved here."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"matrix file {path} not found") from None
    except yaml.YAMLError as error:
        raise UserError(f"matrix file {path} is not valid YAML: {error}") from None
    where = f"matrix {path}"
    data = _mapping(data, where)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    preset = str(data.get("preset", TrainConfig.preset))
    if preset not in PRESETS:
        raise UserError(f"{where}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = path.parent / str(data["config"]) if data.get("config") else None
    base = read_yaml(config) if config is not None else {}  # a clear error now for a missing or bad base
    settings = _mapping(data.get("settings"), f"{where}: settings")
    _check_config_keys(settings, f"{where}: settings")
    arms = {str(k): _mapping(v, f"{where}: arm {k}") for k, v in _mapping(data.get("arms"), f"{where}: arms").items()}
    for name, values in arms.items():
        _check_config_keys(values, f"{where}: arm {name}", extra=("sweep",))
        if "sweep" in values:
            values["sweep"] = _sweep_values(name, values["sweep"], where)
    layers = {str(k): _mapping(v, f"{where}: layer policy {k}")
              for k, v in _mapping(data.get("layers") or {"uniform": {"format": PLACEHOLDER}}, where).items()}
    for name, values in layers.items():
        _check_config_keys(values, f"{where}: layer policy {name}")
        if PLACEHOLDER not in json.dumps(values):
            raise UserError(f"{where}: layer policy {name} never uses {PLACEHOLDER}: where does the cell's format go?")
    sweep = _mapping(data.get("sweep"), f"{where}: sweep")
    if set(sweep) - set(SWEEP_KEYS):
        raise UserError(f"{where}: sweep takes {', '.join(SWEEP_KEYS)}")
    seeds = data.get("seeds", [TrainConfig.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers")
    if not data.get("cells"):
        raise UserError(f"{where}: no cells: list the combinations to run under cells:")
    runs_dir = Path(data.get("runs_dir") or Path("runs") / path.stem)
    matrix = Matrix(path=path, preset=preset, config=config, settings=settings, runs_dir=runs_dir,
                    seeds=tuple(seeds), formats=_formats(data.get("formats"), path, where), arms=arms,
                    layers=layers, sweep=sweep, cells_spec=tuple(data["cells"]),
                    launcher=_mapping(data.get("launcher"), f"{where}: launcher"),
                    description=str(data.get("description", "")), base=base)
    if not isinstance(data["cells"], list) or not all(isinstance(c, dict) for c in data["cells"]):
        raise UserError(f"{where}: cells must be a list of mappings {{formats: [...], arms: [...]}}")
    matrix.cells()  # every cell resolves, or the error names it
    matrix.sweep_cells()
    return matrix


def with_settings(matrix: Matrix, runs_dir: Path | None = None, data: str | None = None) -> Matrix:
    """The matrix in another runs directory, or on other prepared data (a change of every cell)."""
    if runs_dir is not None:
        matrix = replace(matrix, runs_dir=Path(runs_dir))
    if data is not None:
        matrix = replace(matrix, settings={**matrix.settings, "data": str(data)})
        matrix.cells()
    return matrix
