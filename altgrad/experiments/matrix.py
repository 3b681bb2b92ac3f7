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
      A: {optimizer: adamw, sweep: {lr: [0.0005, 0.001, 0.002]}}
      C: {optimizer: adamw, weight_storage: format, update_rounding: stochastic, sweep: {lr: [0.0005, 0.001, 0.002]}}
      D: {optimizer: manifold, lr: {from: C}, sweep: {grid_lr: [0.25, 0.5, 1.0]}}
    layers:                                # layer policies; "{format}" stands for the cell's format
      uniform: {format: "{format}"}
      post-ln: {policy: [{layers: ["*.attn.c_attn", "*.mlp.c_fc"], format: "{format}"}]}
    sweep: {seed: 1340, budget: 8, refine: true}  # tuning: its own seed, the same budget for every group
    cells:
      - {formats: [bf16], arms: [A]}
      - {formats: [E5M2, E3M4], arms: [A, C, D], layers: [uniform]}
      - {formats: [E7M0], arms: [A], expected_failure: "powers of two only"}
    launcher: {slurm: {timeout_min: 60}}   # submitit executor options (--launcher slurm)

A cell's config is resolved in that order: preset < config file < settings < layer policy <
arm < seed (< the tuned values). An arm with a ``sweep`` is tuned for every (format, arm,
layers) group it is in, on the tuning seed, by bracketing log grids (`tuning`: each key's grid
extends itself at an edge until the best value has a worse neighbour on both sides; several
keys by coordinate descent); the chosen values are recorded and used for all seeds. An arm value
``{from: C}`` (e.g. ``lr: {from: C}``) is inherited: the value arm C's tuning chose in the same
format and layers, resolved once that tuning has settled (its trials wait for it); ``{from: A,
format: bf16}`` takes it from another format (and ``layers: L``; uniform when not given), e.g.
every FP8 cell at the BF16 baseline's tuned lr, the common FP8 recipe.

The ``sweep`` settings are the protocol of DESIGN §5.1, the same for every group: ``seed`` (the
tuning seed; default one above the largest evaluation seed, and never one of them),
``max_steps`` (default: the cells' own, so tuning runs at the final horizon with the cells'
schedule; fewer steps only when asked, and the report then says the answer rests on it),
``max_extensions`` (4), ``refine`` (false), ``rounds`` (2, for several keys) and ``budget`` (the
cap on runs per group; default: the largest grid plus every extension and the refinement).

Unknown keys, unknown names and impossible cells (an optimizer that needs a weight format on the
baseline, a bad format, an inherited value nobody tunes) are errors that name the cell, before
anything runs.

Every cell is one ordinary training run in ``runs_dir/<cell>-<hash>``: the cell's name and the
first 8 hex digits of a hash of its resolved config (places and W&B settings left out), so a
changed config is a new run and never continues an old one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..training.config import FIELD_NAMES, PRESETS, TrainConfig, coerce, read_yaml
from . import tuning

BASELINES = ("bf16", "fp32")
TOP_KEYS = ("preset", "config", "settings", "runs_dir", "seeds", "formats", "arms", "layers", "sweep", "cells",
            "launcher", "description")
CELL_KEYS = ("formats", "arms", "layers", "seeds", "expected_failure", "sweep")
SWEEP_KEYS = ("seed", "max_steps", "max_extensions", "refine", "rounds", "budget")
INHERIT = "from"  # an arm value {from: C}: the value arm C's tuning chose
#: Config keys that do not change what a run computes: left out of the hash.
UNHASHED = ("run_name", "runs_dir", "wandb", "wandb_project", "tags", "adapt_threads")  # nothing a run computes
PLACEHOLDER = "{format}"


@dataclass(frozen=True)
class Cell:
    """One run of the matrix."""

    name: str  # e5m2-D-post-ln-s1337, or sweep-e5m2-D-post-ln-grid_lr0.5 (a tuning trial)
    format: str  # E5M2, or bf16 / fp32 for the baseline
    arm: str
    layers: str  # the layer policy's name; "-" for the baseline
    seed: int
    overrides: dict[str, Any]  # on top of the matrix's base: layer policy, arm, seed, tuned values
    expected_failure: str | None = None
    sweep: dict[str, float] | None = None  # a tuning trial's values of the tuned keys
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
                "sweep": dict(self.sweep) if self.sweep else None}


@dataclass(frozen=True)
class Tuning:
    """One group's tuning: the log grid of each key it searches (in coordinate order; none when it
    only inherits), and the keys it takes from another group's tuning (key -> that group)."""

    group: str
    format: str
    arm: str
    layers: str
    grids: dict[str, tuple[float, ...]]
    inherits: dict[str, str]
    expected_failure: str | None = None


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
        arm_values = {k: v for k, v in self.arms[arm].items() if k != "sweep" and not _inherited(v)}
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

    # ---- tuning ---------------------------------------------------------------------------
    @property
    def tuning_seed(self) -> int:
        return int(self.sweep["seed"]) if "seed" in self.sweep else max(self.evaluation_seeds) + 1

    @property
    def evaluation_seeds(self) -> tuple[int, ...]:
        return tuple(sorted({s for *_, seeds, _, _ in self._combinations() for s in seeds}))

    @property
    def protocol(self) -> tuning.Protocol:
        return tuning.Protocol(budget=self.budget, max_extensions=int(self.sweep.get("max_extensions", 4)),
                               refine=bool(self.sweep.get("refine", False)), rounds=int(self.sweep.get("rounds", 2)))

    @property
    def budget(self) -> int:
        """The cap on tuning runs per group, the same for every group: the file's, or the largest
        grid of any arm plus every extension and the refinement."""
        if "budget" in self.sweep:
            return int(self.sweep["budget"])
        grids = [sum(len(v) for v in arm.get("sweep", {}).values()) for arm in self.arms.values()]
        return max(grids, default=0) + int(self.sweep.get("max_extensions", 4)) + 2 * bool(self.sweep.get("refine"))

    def tunings(self) -> list[Tuning]:
        """Every group that is tuned or inherits a tuned value, in file order."""
        out = []
        for fmt, arm, layers, _, expected, swept in self._combinations():
            grids = {k: tuple(v) for k, v in self.arms[arm].get("sweep", {}).items()} if swept else {}
            inherits = {k: _source_group(v, fmt, layers) for k, v in self.arms[arm].items() if _inherited(v)}
            if grids or inherits:
                out.append(Tuning(group_name(fmt, arm, layers), fmt, arm, layers, grids, inherits, expected))
        return out

    def trial_cell(self, tuned: Tuning, values: dict[str, float], inherited: dict[str, Any] | None = None) -> Cell:
        """One tuning run of a group: its values of the tuned keys, on the tuning seed."""
        values = {k: tuning.canonical(v) for k, v in values.items()}
        name = f"sweep-{tuned.group}-" + "-".join(f"{k}{v:g}" for k, v in values.items())
        seed = self.tuning_seed
        overrides = {**self._overrides(tuned.format, tuned.arm, tuned.layers, seed), **(inherited or {}), **values}
        if self.sweep.get("max_steps") is not None:
            overrides["max_steps"] = int(self.sweep["max_steps"])
        return Cell(name, tuned.format, tuned.arm, tuned.layers, seed, overrides, tuned.expected_failure, values,
                    self._resolve(name, overrides))

    def sweep_cells(self, tuned: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
        """The first tuning runs of every group (its first key's grid; extensions follow as the
        outcomes come in). ``tuned``: group -> chosen values, for the inherited ones known."""
        cells = []
        for group in self.tunings():
            if group.grids:
                inherited = {k: (tuned or {}).get(source, {}).get(k) for k, source in group.inherits.items()}
                first = tuning.plan(group.grids, self.protocol, {}).next
                cells += [self.trial_cell(group, values, {k: v for k, v in inherited.items() if v is not None})
                          for values in first]
        return cells

    def cells(self, tuned: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
        """The main runs: every combination and seed. ``tuned``: group -> {key: value} (tuning's
        choices and inherited values); a group whose tuning has not settled gets the arm's own."""
        cells = []
        for fmt, arm, layers, seeds, expected, _ in self._combinations():
            group = group_name(fmt, arm, layers)
            for seed in seeds:
                name = f"{group}-s{seed}"
                overrides = {**self._overrides(fmt, arm, layers, seed), **(tuned or {}).get(group, {})}
                cells.append(Cell(name, fmt, arm, layers, seed, overrides, expected, None,
                                  self._resolve(name, overrides)))
        return cells

    def check_tuning(self) -> None:
        """The protocol's rules that need the whole matrix: the tuning seed apart from the evaluation
        seeds, every grid within the budget, every inherited value tuned by a group of the matrix."""
        where = f"matrix {self.path}"
        seed = self.tuning_seed
        if seed in self.evaluation_seeds:
            raise UserError(f"{where}: sweep seed {seed} is also an evaluation seed; tune on a seed apart "
                            "(DESIGN 5.1), e.g. leave sweep.seed out for one above the largest seed")
        tunings = self.tunings()
        searched = {t.group: t for t in tunings if t.grids}
        for t in tunings:
            if sum(len(g) for g in t.grids.values()) > self.budget:
                raise UserError(f"{where}: arm {t.arm}: its grids have {sum(len(g) for g in t.grids.values())} "
                                f"values, more than the tuning budget of {self.budget} runs a group")
            for key, source in t.inherits.items():
                if key not in searched.get(source, Tuning("", "", "", "", {}, {})).grids:
                    raise UserError(f"{where}: cell {t.group}: {key}: {{from: {self.arms[t.arm][key][INHERIT]}}} needs "
                                    f"group {source} in the matrix, tuning {key}")


def _inherited(value: Any) -> bool:
    return isinstance(value, dict) and INHERIT in value


def _source_group(value: dict[str, Any], fmt: str, layers: str) -> str:
    """The group an inherited value comes from: arm ``from`` in the same format and layers, or in
    the ``format`` (and ``layers``) it names; a baseline format has no layer policy."""
    source_fmt = value.get("format", fmt)
    source_layers = "-" if source_fmt.lower() in BASELINES else value.get("layers", layers if "format" not in value
                                                                           else "uniform")
    return group_name(source_fmt, value[INHERIT], source_layers)


def _check_inherits(arm: str, values: dict[str, Any], arms: dict[str, dict[str, Any]], where: str) -> None:
    for key, value in values.items():
        if not isinstance(value, dict) or key == "sweep":
            continue
        source = value.get(INHERIT)
        if not set(value) <= {INHERIT, "format", "layers"} or not isinstance(source, str):
            raise UserError(f"{where}: arm {arm}: {key} is a value or {{from: ARM}} (the value ARM's tuning chose; "
                            "with format: F and layers: L, in that format and layers)")
        if source not in arms or source == arm:
            raise UserError(f"{where}: arm {arm}: {key}: {{from: {source}}} names no other arm; "
                            f"arms: {', '.join(a for a in arms if a != arm)}")
        if key not in arms[source].get("sweep", {}):
            raise UserError(f"{where}: arm {arm}: {key}: {{from: {source}}}, but arm {source} does not tune {key}")
        if key in values.get("sweep", {}):
            raise UserError(f"{where}: arm {arm}: {key} is both tuned and inherited")


def _sweep_values(arm: str, spec: Any, where: str) -> dict[str, tuple[float, ...]]:
    """An arm's tuned keys and their log grids (several keys: coordinate descent, in this order)."""
    spec = _mapping(spec, f"{where}: arm {arm}: sweep")
    if not spec:
        raise UserError(f"{where}: arm {arm}: sweep takes keys and their log grids, e.g. {{grid_lr: [0.25, 0.5, 1]}}")
    _check_config_keys(spec, f"{where}: arm {arm}: sweep")
    types = {f.name: f.type for f in fields(TrainConfig)}
    grids = {}
    for key, values in spec.items():
        if not types[key].startswith("float"):
            raise UserError(f"{where}: arm {arm}: sweep {key}: only real-valued settings are tuned (lr, grid_lr, ...)")
        if not isinstance(values, list) or len(values) < 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise UserError(f"{where}: arm {arm}: sweep {key} needs a log grid of at least two positive numbers")
        grid = tuple(sorted(tuning.canonical(v) for v in values))
        if len(set(grid)) != len(grid):
            raise UserError(f"{where}: arm {arm}: sweep {key} lists a value twice")
        grids[key] = grid
    return grids


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


def _sweep_settings(sweep: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise UserError(f"{where}: sweep: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SWEEP_KEYS)}")
    for key in ("seed", "max_steps", "max_extensions", "rounds", "budget"):
        value = sweep.get(key)
        least = 0 if key in ("seed", "max_extensions") else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise UserError(f"{where}: sweep: {key} must be an integer >= {least}")
    if not isinstance(sweep.get("refine", False), bool):
        raise UserError(f"{where}: sweep: refine must be true or false")
    return {k: v for k, v in sweep.items() if v is not None}


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
    for name, values in arms.items():
        _check_inherits(name, values, arms, where)
    layers = {str(k): _mapping(v, f"{where}: layer policy {k}")
              for k, v in _mapping(data.get("layers") or {"uniform": {"format": PLACEHOLDER}}, where).items()}
    for name, values in layers.items():
        _check_config_keys(values, f"{where}: layer policy {name}")
        if PLACEHOLDER not in json.dumps(values):
            raise UserError(f"{where}: layer policy {name} never uses {PLACEHOLDER}: where does the cell's format go?")
    sweep = _sweep_settings(_mapping(data.get("sweep"), f"{where}: sweep"), where)
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
    matrix.check_tuning()
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
