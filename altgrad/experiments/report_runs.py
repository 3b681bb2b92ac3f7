"""The runs a report is about: cells grouped by (format, arm, layer policy), read from a matrix's
manifest (every main cell; sweep runs only through the sweep's choice) or, without one, from the
run folders of a directory, grouped by every setting but the seed.

Arm roles are read from each run's own config (``summary.arm``): ``adamw`` (FP32 masters) is
A, ``adamw-rtn`` B, ``adamw-sr`` C; ``manifold-*``, ``grid-*`` and ``grid-momentum-*`` are
geometry, told apart by where the weights live: ``geometry-master`` (FP32 masters, the grid
only sizes the step), ``geometry-stored`` (on the grid, stochastic rounding), ``geometry-rtn``
(on the grid, round to nearest). The non-geometric remedies a geometry arm must beat (DESIGN
§5.2) have roles of their own: ``eco-rtn`` is ECO (error feedback, Nikdan et al. 2026),
``adamw-rtn-kahan`` C-kahan (compensated storage); their other variants (``eco-sr``,
``adamw-sr-kahan``, a geometry arm with ``-kahan``) are other, as mixed storage is.

The manifest's record of the tuning is read by `report_sweeps`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..training.config import CONFIG_FILE_NAME, TrainConfig
from .compare import PLACE_AND_MONITORING_KEYS
from .launch import MANIFEST, read_manifest
from .runs import finished
from .matrix import BASELINES, group_name, layer_suffix
from .runs import RunRecord, available_runs, load_run
from .stats import mean


GEOMETRY = ("manifold", "grid")
#: Where a geometry arm's weights live, by the last part of its tag.
GEOMETRY_ROLES = {"master": "geometry-master", "sr": "geometry-stored", "rtn": "geometry-rtn"}
#: The geometry optimizers as the report names them (the tag without its storage part).
OPTIMIZER_NAMES = {"manifold": "ManifoldAdamW", "grid": "GridOptim", "grid-momentum": "GridOptim (momentum)"}


#: The roles of the AdamW arms and of the non-geometric remedies, by arm tag.
ROLES = {"adamw": "A", "adamw-rtn": "B", "adamw-sr": "C", "eco-rtn": "ECO", "adamw-rtn-kahan": "C-kahan"}
#: How text and figures name an arm without a matrix name (its tag's role, or a short name).
ARM_NAMES = {"eco-sr": "ECO-sr", "adamw-sr-kahan": "C-kahan-sr", "manifold-sr": "D", "manifold-master": "Dm",
             "manifold-rtn": "D-rtn", "grid-sr": "E", "grid-master": "Em", "grid-rtn": "E-rtn",
             "grid-momentum-sr": "E-momentum", "grid-momentum-master": "Em-momentum"}


def role(arm_tag: str) -> str:
    """A | B | C | ECO | C-kahan | geometry-master | geometry-stored | geometry-rtn | other, from
    a run's arm tag (TrainConfig.arm). Mixed storage (``*-mixed``), the other ECO and
    compensated variants are other: no comparison is about them."""
    if arm_tag in ROLES:
        return ROLES[arm_tag]
    if arm_tag.endswith("-kahan"):
        return "other"
    if geometry_optimizer(arm_tag) is not None:
        return GEOMETRY_ROLES.get(arm_tag.rpartition("-")[2], "other")
    return "other"


def arm_name(arm_tag: str) -> str:
    """A readable name of an arm from its tag: ``C`` (adamw-sr), ``ECO`` (eco-rtn), ``C-kahan``
    (adamw-rtn-kahan), ``D`` (manifold-sr), ``D-kahan`` (manifold-sr-kahan); the tag itself when
    it has none."""
    if arm_tag in ROLES:
        return ROLES[arm_tag]
    if arm_tag in ARM_NAMES:
        return ARM_NAMES[arm_tag]
    base, _, compensation = arm_tag.rpartition("-")
    if compensation == "kahan" and base in ARM_NAMES:
        return f"{ARM_NAMES[base]}-kahan"
    return arm_tag


def geometry_optimizer(arm_tag: str) -> str | None:
    """``manifold``, ``grid`` or ``grid-momentum`` for a geometry arm's tag, else None."""
    head, _, _ = arm_tag.rpartition("-")
    return head if head and head.split("-")[0] in GEOMETRY else None


def as_number(value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


@dataclass
class Cell:
    """One finished (or failed) run of a group."""

    folder: str
    seed: int
    status: str
    final_val_loss: float
    run: RunRecord | None
    expected_failure: str | None = None

    @property
    def usable(self) -> bool:
        """Completed with a finite final loss: the runs a loss mean is over."""
        return self.status == "completed" and math.isfinite(self.final_val_loss)


@dataclass
class Group:
    format: str
    arm: str  # the matrix's name (A..E), or the run's arm tag without a manifest
    layers: str
    arm_tag: str
    cells: list[Cell] = field(default_factory=list)
    expected_failure: str | None = None

    @property
    def key(self) -> str:
        return f"{self.format}/{self.arm}/{self.layers}"

    @property
    def baseline(self) -> bool:
        return self.format.lower() in BASELINES

    @property
    def role(self) -> str:
        return role(self.arm_tag)

    @property
    def optimizer(self) -> str | None:
        """The geometry optimizer (manifold, grid, grid-momentum), None for the AdamW arms."""
        return geometry_optimizer(self.arm_tag)

    @property
    def name(self) -> str:
        """The matrix's group name (``e5m2-C``, ``e1m6-D-post-ln``): the key of its sweep."""
        return group_name(self.format, self.arm, self.layers)

    @property
    def arm_name(self) -> str:
        """The arm as text and figures name it: the matrix's name (``ECO``, ``C-kahan``), or for
        groups read from run folders (whose arm is the tag) a readable name of the tag."""
        return self.arm if self.arm != self.arm_tag else arm_name(self.arm_tag)

    @property
    def label(self) -> str:
        """``E5M2 D (manifold-sr)``: how text names the group."""
        return f"{self.format}{layer_suffix(self.layers, ' ({})')} {self.arm} ({self.arm_tag})"

    @property
    def max_steps(self) -> int | None:
        """The cells' horizon: their runs' max_steps (None when no run is there or they differ)."""
        steps = {c.run.config.get("max_steps") for c in self.cells if c.run is not None}
        return steps.pop() if len(steps) == 1 and None not in steps else None

    @property
    def seeds(self) -> set[int]:
        return {c.seed for c in self.cells}

    def losses(self) -> dict[int, float]:
        """Seed -> final validation loss, for the usable runs."""
        return {c.seed: c.final_val_loss for c in self.cells if c.usable}

    @property
    def diverged(self) -> int:
        return sum(c.status == "diverged" or (c.status == "completed" and not math.isfinite(c.final_val_loss))
                   for c in self.cells)

    @property
    def failed(self) -> int:
        return sum(c.status not in ("completed", "diverged") for c in self.cells)

    @property
    def divergence_rate(self) -> float:
        """Diverged over the runs that ended (completed or diverged); NaN when none did."""
        ended = len(self.cells) - self.failed
        return self.diverged / ended if ended else math.nan

    def mean_loss(self) -> float:
        return mean(list(self.losses().values()))


# ---- collecting ------------------------------------------------------------------------------
def _from_manifest(runs_dir: Path, manifest: dict[str, Any]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for entry in manifest.get("cells", {}).values():
        if entry.get("sweep"):
            continue
        folder = entry["folder"]
        run = load_run(runs_dir, folder) if (runs_dir / folder / CONFIG_FILE_NAME).exists() else None
        summary = run.summary if run else {}
        status = summary.get("status", entry.get("status", "missing"))
        if status == "completed" and run is None:  # the manifest says so, but its folder is gone
            status = "missing"
        elif status == "completed" and not finished(summary, run.config.get("max_steps")):
            status = "incomplete"
        tag = summary.get("arm") or entry.get("arm")
        key = (entry["format"], entry["arm"], entry["layers"])
        group = groups.setdefault(key, Group(entry["format"], entry["arm"], entry["layers"], tag,
                                             expected_failure=entry.get("expected_failure")))
        if summary.get("arm"):
            group.arm_tag = summary["arm"]
        group.cells.append(Cell(folder, int(entry["seed"]), status, as_number(summary.get("final_val_loss")), run,
                                entry.get("expected_failure")))
    return list(groups.values())


#: Config keys that do not make two runs different experiments (seeds repeat a group).
_NOT_THE_EXPERIMENT = PLACE_AND_MONITORING_KEYS | {"seed"}


def _from_folders(runs_dir: Path) -> list[Group]:
    """Runs without a manifest: a group is every setting but the seed; groups that share a format
    and arm are told apart by the settings in which they differ."""
    by_setting: dict[str, list[RunRecord]] = {}
    for name in available_runs(runs_dir):
        run = load_run(runs_dir, name)
        setting = json.dumps({k: v for k, v in run.config.items() if k not in _NOT_THE_EXPERIMENT},
                             sort_keys=True, default=str)
        by_setting.setdefault(setting, []).append(run)
    groups = []
    for runs in by_setting.values():
        config, summary = runs[0].config, runs[0].summary
        fmt = config.get("format") or ("mixed" if config.get("policy") else config.get("precision", "?"))
        layers = "mixed" if config.get("policy") else ("-" if not config.get("format") else "uniform")
        tag = summary.get("arm", "adamw")
        groups.append(Group(str(fmt), tag, layers, tag, [
            Cell(run.name, int(run.config.get("seed", 0)), run.summary.get("status", "incomplete"),
                 as_number(run.summary.get("final_val_loss")), run) for run in runs]))
    shown = [(g.format, g.arm, g.layers) for g in groups]
    for group, key in zip(groups, shown):
        twins = [g for g, other in zip(groups, shown) if other == key]
        if len(twins) > 1:
            defaults = TrainConfig().to_dict()  # a run from before a setting existed had its default
            configs = [{**defaults, **g.cells[0].run.config} for g in twins]
            differing = sorted(k for k in set().union(*configs) if k not in _NOT_THE_EXPERIMENT
                               and len({json.dumps(c.get(k), default=str) for c in configs}) > 1)
            own = {**defaults, **group.cells[0].run.config}
            group.layers = ",".join(f"{k}={own.get(k)}" for k in differing)
    return groups


def collect(source: Path) -> tuple[Path, list[Group], dict[str, Any]]:
    """(runs directory, groups, manifest) from a matrix file, a runs directory or a manifest."""
    source = Path(source)
    if source.suffix in (".yaml", ".yml"):
        from .matrix import load_matrix

        runs_dir = load_matrix(source).runs_dir
    elif source.name == MANIFEST:
        runs_dir = source.parent
    else:
        runs_dir = source
    if not runs_dir.is_dir():
        raise UserError(f"no runs in {runs_dir}: run the matrix first (altgrad matrix run FILE)")
    manifest = read_manifest(runs_dir)
    groups = _from_manifest(runs_dir, manifest) if manifest.get("cells") else _from_folders(runs_dir)
    if not groups:
        raise UserError(f"no runs in {runs_dir}")
    for group in groups:
        group.cells.sort(key=lambda c: c.seed)
    groups.sort(key=lambda g: not g.baseline)  # the baseline first, then the matrix's order
    return runs_dir, groups, manifest
