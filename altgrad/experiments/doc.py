"""TEST_MATRIX.md: what a matrix tests, generated from the code and the matrix file.

``altgrad matrix doc configs/matrix/small.yaml > TEST_MATRIX.md`` writes it. Every table is
computed: the formats from the registry, the optimizers from the factory and `OptimizerSpec`,
the layers from the model at the matrix's preset, the monitoring settings from `TrainConfig`'s
field declarations, the combinations from the matrix's cells and the metrics from the ``METRICS``
registries of the trainer and its monitors. The output is deterministic (no dates, no absolute
paths), so a test can compare it with the committed file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import posixpath
import re
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
import yaml

from ..errors import UserError
from ..model import GPT, GPTConfig
from ..model.surgery import quantize_model
from ..optim import OPTIMIZERS, OptimizerSpec, build_optimizer
from ..quantization.formats import REGISTRY, FloatFormat
from ..quantization.linear import WEIGHT_STORAGES
from ..training import trainer
from ..training.config import ARM_DEFAULTS, SETTINGS, TrainConfig, sections
from ..training.monitors import quant, rank, shadow, updates
from .matrix import Cell, Matrix

#: Meanings of the `OptimizerSpec` fields that are not config fields of the same name (those
#: take the config field's help, declared in `TrainConfig`).
OPTIMIZER_PARAMETERS = {
    "name": "adamw | manifold | grid | eco (config key `optimizer`)",
    "betas": "Adam's moment decay rates (config keys `beta1`, `beta2`)",
    "eps": "Adam's denominator epsilon",
}

#: The config section whose settings the monitoring table lists (help, unit and default from `TrainConfig`).
MONITORING_SECTION = "monitoring"

#: Modules whose ``METRICS`` registry names what they log, in the order of the table.
METRIC_SOURCES: tuple[ModuleType, ...] = (trainer, quant, updates, rank, shadow)

#: The model is built with this vocabulary size (the data decides the real one); columns show it as "vocab".
VOCAB_PROBE = 50257
#: The weight format of the small model that `optimizer_class` builds optimizers for.
PROBE_FORMAT = "E4M3"


# ---- rendering ---------------------------------------------------------------------------------
def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table; a ``|`` inside a cell is escaped."""
    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    header = list(header)
    return "\n".join([line(header), line("---" for _ in header), *(line(row) for row in rows)])


def code(value: Any) -> str:
    """Inline code: config keys, values, layer and metric names (``<layer>`` is not HTML)."""
    return f"`{value}`"


def number(value: float | None) -> str:
    """Exact and short: powers of two as 2^k, integers and short decimals as they are, m·2^k beyond 2^20."""
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return str(value)
    sign = "-" if value < 0 else ""
    mantissa, exponent = math.frexp(abs(value))
    if mantissa == 0.5:
        return f"{sign}2^{exponent - 1}"
    if abs(value) >= 2.0**20:
        return f"{sign}{2 * mantissa:g}·2^{exponent - 1}"
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def setting(value: Any) -> str:
    """A config value as the YAML a user writes (flow style, one line)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)
    return text.strip().removesuffix("...").strip()  # a scalar ends with YAML's document marker


def settings(values: dict[str, Any]) -> str:
    """A mapping of config changes as inline code; "-" when empty."""
    return code(setting(values)) if values else "-"


def default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def source_path(matrix: Matrix) -> str:
    """The matrix file as the user named it (relative stays relative), with forward slashes."""
    return matrix.path.as_posix()


def section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *parts])


# ---- formats -----------------------------------------------------------------------------------
def special_values(fmt: FloatFormat) -> str:
    """inf and NaN codes, from the format's own decoding."""
    nan_codes = int(sum(math.isnan(v) for v in fmt.decode(fmt.codes())))
    parts = (["±inf"] if fmt.has_inf else []) + ([f"NaN ({nan_codes} codes)"] if fmt.has_nan else [])
    return ", ".join(parts) or "none"


def formats_section() -> str:
    rows = [(fmt.name, fmt.bits, fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, special_values(fmt),
             number(fmt.max), number(fmt.min_positive), number(fmt.min_normal), number(float(fmt.ulp(1.0))),
             fmt.note or "-")
            for fmt in REGISTRY.values()]
    header = ("format", "bits", "E", "M", "bias", "special values", "max finite", "smallest > 0", "smallest normal",
              "ULP at 1", "use")
    return section("Formats",
                   "The registry (`altgrad.quantization.formats.REGISTRY`): sign + E exponent bits + M mantissa "
                   "bits. A value is `(-1)^s 2^(e-bias) (1 + m/2^M)` for e > 0 and `(-1)^s 2^(1-bias) (m/2^M)` for "
                   "e = 0 (subnormals). Overflow saturates to ±max finite.",
                   table(header, rows))


# ---- optimizers --------------------------------------------------------------------------------
def optimizer_class(name: str, storage: str) -> type | None:
    """The class `build_optimizer` returns for ``name`` with format weights kept as ``storage``
    (a one-block model in `PROBE_FORMAT`); None when the combination is not allowed."""
    try:
        config = TrainConfig(optimizer=name, weight_storage=storage, format=PROBE_FORMAT, n_layer=1, n_head=1,
                             n_embd=8, block_size=8)
    except UserError:
        return None
    with torch.random.fork_rng(devices=[]):  # building a model must not move the caller's RNG
        model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    quantize_model(model, config.quant_policy(), config.seed)
    return type(build_optimizer(model, config.optimizer_spec(), config.seed))


def class_summary(cls: type) -> str:
    """The first line of the class's own docstring, else of its module's."""
    return first_line(cls.__dict__.get("__doc__")) or first_line(sys.modules[cls.__module__].__doc__)


def qualified_name(cls: type) -> str:
    module = "torch.optim" if cls.__module__.startswith("torch.optim") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def optimizer_rows() -> list[tuple[str, ...]]:
    rows = []
    for name in OPTIMIZERS:
        for storage in WEIGHT_STORAGES:
            cls = optimizer_class(name, storage)
            if cls is None:
                continue
            default = " (default)" if ARM_DEFAULTS[name][0] == storage else ""
            rows.append((code(name), f"{storage}{default}", code(qualified_name(cls)), class_summary(cls)))
    return rows


def parameter_meaning(name: str) -> str:
    if name in OPTIMIZER_PARAMETERS:
        return OPTIMIZER_PARAMETERS[name]
    return SETTINGS[name].help if name in SETTINGS else "(undocumented)"


def parameter_rows() -> list[tuple[str, ...]]:
    return [(code(f.name), code(setting(default(f))), parameter_meaning(f.name))
            for f in dataclasses.fields(OptimizerSpec)]


def optimizers_section() -> str:
    return section("Optimizers",
                   "`altgrad.optim.build_optimizer` for each optimizer and weight storage it accepts "
                   "(format weights stored on their grid, or FP32 masters):",
                   table(("optimizer", "weight storage", "class", "what it is"), optimizer_rows()),
                   "Parameters (`altgrad.optim.OptimizerSpec`, set from the run's config):",
                   table(("parameter", "default", "meaning"), parameter_rows()))


# ---- arms --------------------------------------------------------------------------------------
def arm_tags(cells: list[Cell], arm: str) -> str:
    """The distinct `TrainConfig.arm` tags of the arm's cells (what runs and reports call it)."""
    tags = dict.fromkeys(c.config.arm for c in cells if c.arm == arm)
    return ", ".join(code(t) for t in tags) or "- (no cell)"


def sweep_text(values: dict[str, list[Any]] | None) -> str:
    return "; ".join(f"{code(key)}: {', '.join(setting(v) for v in vals)}" for key, vals in (values or {}).items()) \
        or "-"


def sweep_note(matrix: Matrix) -> str:
    runs = matrix.sweep_cells()
    if not runs:
        return "No arm of this matrix has a sweep."
    protocol = matrix.protocol
    steps = matrix.sweep.get("max_steps")
    horizon = (f"{steps} steps, shorter than the cells' (the answer then rests on that horizon)" if steps
               else "the cells' own steps and schedule")
    return (f"A group with a sweep (column sweep under Combinations) is tuned first, on seed {runs[0].seed} (not an "
            f"evaluation seed), at {horizon}: each key's log grid extends itself at an edge (up to "
            f"{protocol.max_extensions} values) until the best value has a worse neighbour on both sides"
            + (", then the midpoints around it are tried" if protocol.refine else "")
            + f"; several keys by coordinate descent ({protocol.rounds} rounds); at most {protocol.budget} runs "
            "a group, the same for every group. A value `{from: ARM}` is the one ARM's tuning chose in the same "
            "format and layers. The chosen values are then used for all seeds.")


def arms_section(matrix: Matrix, cells: list[Cell]) -> str:
    rows = [(name, settings({k: v for k, v in values.items() if k != "sweep"}), arm_tags(cells, name),
             sweep_text(values.get("sweep")))
            for name, values in matrix.arms.items()]
    return section("Arms", "The optimizer arms of this matrix (settings on top of every cell's base config):",
                   table(("arm", "settings", "arm tag", "sweep"), rows), sweep_note(matrix))


# ---- layers ------------------------------------------------------------------------------------
def linear_layers(config: TrainConfig) -> dict[str, tuple[int, int]]:
    """name -> (in, out features) of every Linear of the model at the config's shape (meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=VOCAB_PROBE, block_size=config.block_size, n_layer=config.n_layer,
                              n_head=config.n_head, n_embd=config.n_embd, bias=config.bias))
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def layer_pattern(name: str) -> str:
    """The name with the block index as ``<i>``: transformer.h.<i>.attn.c_attn."""
    return re.sub(r"\.h\.\d+\.", ".h.<i>.", name)


def features(value: int) -> str:
    return "vocab" if value == VOCAB_PROBE else str(value)


def rank_warning(config: TrainConfig, name: str) -> str:
    """The relative effective-rank drop that warns for this layer (critical layers warn earlier)."""
    critical = any(fnmatch.fnmatchcase(name, pattern) for pattern in config.critical_layers)
    bound = config.rank_threshold * (config.critical_threshold_multiplier if critical else 1.0)
    return f"{bound:g} (critical)" if critical else f"{bound:g}"


def quantized_under(cells: list[Cell], policy: str, name: str) -> str:
    """Whether the layer policy (as a cell resolves it) puts the layer in a format."""
    cell = next((c for c in cells if c.layers == policy), None)
    if cell is None:
        return "- (no cell)"
    rule = cell.config.quant_policy().match(name)
    return "format" if rule is not None and rule.config is not None else "high precision"


def layer_rows(matrix: Matrix, cells: list[Cell]) -> list[tuple[str, ...]]:
    config = cells[0].config
    shapes = linear_layers(config)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(layer_pattern(name), []).append(name)
    rows = []
    for pattern, names in groups.items():
        first = names[0]
        rows.append((code(pattern), len(names), features(shapes[first][0]), features(shapes[first][1]),
                     rank_warning(config, first), *(quantized_under(cells, p, first) for p in matrix.layers)))
    return rows


def layers_section(matrix: Matrix, cells: list[Cell]) -> str:
    config = cells[0].config
    shape = f"{config.n_layer} blocks, {config.n_head} heads, {config.n_embd} wide, block size {config.block_size}"
    header = ("layer", "count", "in", "out", "rank-drop warning", *(f"{code(p)} policy" for p in matrix.layers))
    policies = [(code(name), settings(values)) for name, values in matrix.layers.items()]
    return section("Layers",
                   f"The Linear layers of the GPT at preset `{matrix.preset}` ({shape}); `vocab` is the prepared "
                   "data's vocabulary size (`lm_head` is tied to the token embedding). The rank-drop warning is "
                   "the relative fall of effective rank below its highest over the last `rank_window` of training "
                   "that warns (`rank_threshold`, times `critical_threshold_multiplier` for `critical_layers`); the policy columns say whether each "
                   "layer policy of this matrix puts the layer in the cell's format.",
                   table(header, layer_rows(matrix, cells)),
                   "Layer policies (`{format}` stands for the cell's format):",
                   table(("policy", "settings"), policies))


# ---- monitoring --------------------------------------------------------------------------------
def monitoring_section(cells: list[Cell]) -> str:
    rows = []
    for field in sections()[MONITORING_SECTION]:
        used = dict.fromkeys(setting(getattr(c.config, field.name)) for c in cells)
        rows.append((code(field.name), code(setting(field.default)), field.unit or "-",
                     ", ".join(code(v) for v in used), field.help))
    return section("Monitoring thresholds and intervals",
                   f"The `{MONITORING_SECTION}` settings of `TrainConfig`: defaults, and the values this matrix's "
                   "cells use (every setting: docs/reference/config.md):",
                   table(("setting", "default", "unit", "this matrix", "meaning"), rows))


# ---- combinations ------------------------------------------------------------------------------
def group_key(cell: Cell) -> tuple[str, str, str]:
    return cell.format, cell.arm, cell.layers


def group_sweeps(matrix: Matrix) -> dict[tuple[str, str, str], str]:
    """(format, arm, layers) -> its tuning: the tuned keys and the runs of their first grid."""
    runs: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in matrix.sweep_cells():
        runs.setdefault(group_key(cell), []).append(cell)
    return {key: f"{', '.join(code(k) for k in cells[0].sweep)} ({len(cells)} runs first)"
            for key, cells in runs.items()}


@functools.lru_cache(maxsize=None)
def optimizer_class_name(name: str, storage: str) -> str:
    """The class name of the optimizer a cell builds (AdamW, StoredAdamW, ManifoldAdamW, ...)."""
    cls = optimizer_class(name, storage)
    return cls.__name__ if cls is not None else "-"


def combination_row(group: list[Cell], sweep: str) -> tuple[Any, ...]:
    cell, config = group[0], group[0].config
    rounding = "-" if config.weight_storage == "master" else config.update_rounding
    return (cell.format, optimizer_class_name(config.optimizer, config.weight_storage), cell.arm, cell.layers,
            ", ".join(str(c.seed) for c in group), config.max_steps, code(config.arm), config.weight_storage,
            rounding, sweep, cell.expected_failure or "-")


def combinations_section(matrix: Matrix, cells: list[Cell]) -> str:
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    sweeps = group_sweeps(matrix)
    sweep_runs = len(matrix.sweep_cells())
    header = ("format", "optimizer", "arm", "layer policy", "seeds", "steps", "arm tag", "weight storage",
              "update rounding", "sweep", "expected failure")
    rows = [combination_row(group, sweeps.get(key, "-")) for key, group in groups.items()]
    return section("Combinations",
                   f"Every (format, arm, layer policy) group of `{source_path(matrix)}`, with the class of its "
                   "optimizer; layer policy `-`: the baseline, no layer in an 8-bit format.",
                   table(header, rows),
                   f"{len(groups)} groups, {len(cells)} cells, {sweep_runs} first tuning runs (extensions "
                   f"follow as needed, at most {matrix.budget} a tuned group): at least {len(cells) + sweep_runs} "
                   "runs in all.")


# ---- metrics -----------------------------------------------------------------------------------
def metric_registry() -> dict[str, tuple[str, str]]:
    """Every metric name pattern the code logs -> (the module that logs it, its meaning)."""
    registry: dict[str, tuple[str, str]] = {}
    for module in METRIC_SOURCES:
        for pattern, meaning in module.METRICS.items():
            registry[pattern] = (module.__name__.removeprefix("altgrad."), meaning)
    return registry


def metric_regex(pattern: str) -> re.Pattern[str]:
    """A documented pattern as a regex: each ``<name>`` part matches any name without spaces."""
    parts = re.split(r"<[^>]+>", pattern)
    return re.compile("[^ ]+".join(re.escape(part) for part in parts))


def metrics_section() -> str:
    rows = [(code(pattern), code(source), meaning) for pattern, (source, meaning) in metric_registry().items()]
    return section("Metrics",
                   "Every name in a run's `metrics.jsonl` (and W&B). `<layer>` is a module name "
                   "(`transformer.h.0.attn.c_attn`), `<kind>` an operand (weight, activation, gradient), "
                   "`<partition>` a gradient-clipping partition. Aggregation, one convention everywhere: a "
                   "per-layer value is over that layer's elements; the headline without `<layer>` is the mean "
                   "over layers (each layer once); `_elementwise` is the element-weighted value beside it. NaN "
                   "means undefined (e.g. a stall ratio without updates), is never read as 0 and is left out of "
                   "means.",
                   table(("metric", "logged by", "meaning"), rows))


# ---- the document ------------------------------------------------------------------------------
def header(matrix: Matrix) -> str:
    path = source_path(matrix)
    base = [f"preset `{matrix.preset}`"]
    if matrix.config is not None:
        base.append(f"`{posixpath.normpath(matrix.config.as_posix())}`")
    if matrix.settings:
        base.append(f"settings {settings(matrix.settings)}")
    notice = (f"> Generated by `altgrad matrix doc {path} > TEST_MATRIX.md` from the code and the matrix file: "
              "do not edit by hand; change either and run the command again.")
    lines = [notice, f"# Test matrix: `{path}`"]
    if matrix.description:
        lines.append(matrix.description)
    lines.append(f"Every cell starts from {' < '.join(base)}, then its layer policy, arm and seed; runs go to "
                 f"`{matrix.runs_dir.as_posix()}`.")
    return "\n\n".join(lines)


def test_matrix(matrix: Matrix) -> str:
    """The whole document (Markdown, ending with a newline)."""
    cells = matrix.cells()
    parts = [header(matrix), formats_section(), optimizers_section(), arms_section(matrix, cells),
             layers_section(matrix, cells), monitoring_section(cells), combinations_section(matrix, cells),
             metrics_section()]
    return "\n\n".join(parts) + "\n"


test_matrix.__test__ = False  # a document builder, not a pytest test
