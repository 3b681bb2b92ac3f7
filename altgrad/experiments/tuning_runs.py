"""A matrix's tuning, run (DESIGN §5.1): every group's search (`tuning.plan`) replayed from its
trials' run folders, the next trials of all groups run together by the matrix runner, until
every search has settled; a group that inherits a value (``lr: {from: C}``) waits for the group
it takes it from, then tunes with that value.

What the manifest records, under ``sweeps`` for every tuned (or inheriting) group: its keys and
grids, the tuning seed, horizon and budget, every trial (values, folder, status, loss), the runs
spent and whether the cap stopped it, the chosen values and their loss, per key whether the
choice is interior and its two neighbours, the tuning resolution, why the search stopped, the
inherited values (with their source's interior flag) and whether it has settled; under
``protocol`` the settings every group shared. `report_sweeps` reads both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import tuning
from .matrix import Cell, Matrix, Tuning
from .runs import finished, read_summary


def swept_values(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group -> {key: value}: what each settled tuning chose, with the values it inherited (a
    manifest from before bracketing sweeps: ``key`` and a scalar ``best``)."""
    out = {}
    for group, sweep in manifest.get("sweeps", {}).items():
        if "keys" not in sweep:  # the earlier one-key sweeps
            if sweep.get("best") is not None:
                out[group] = {sweep["key"]: sweep["best"]}
            continue
        if sweep.get("settled"):
            inherited = {k: v["value"] for k, v in sweep.get("inherited", {}).items() if v.get("value") is not None}
            out[group] = {**(sweep.get("best") or {}), **inherited}
    return out


def known_trials(matrix: Matrix, manifest: dict[str, Any]) -> list[Cell]:
    """Every tuning run the manifest records, then the first ones of groups it does not know yet."""
    tuned, trials = swept_values(manifest), []
    for group in matrix.tunings():
        sweep = manifest.get("sweeps", {}).get(group.group, {})
        inherited = {k: v["value"] for k, v in sweep.get("inherited", {}).items() if v.get("value") is not None}
        trials += [matrix.trial_cell(group, t["values"], inherited) for t in sweep.get("trials", [])]
    seen = {c.folder for c in trials}
    return trials + [c for c in matrix.sweep_cells(tuned) if c.folder not in seen]


def protocol_record(matrix: Matrix, cells: list[Cell]) -> dict[str, Any]:
    """The tuning settings every group shares, as the manifest records them (``cells``: the main cells)."""
    protocol = matrix.protocol
    units = {c.config.grid_lr_unit for c in cells if c.config.optimizer in ("manifold", "grid")}  # the geometry arms
    cell_steps = sorted({c.config.max_steps for c in cells})
    sweep_steps = matrix.sweep.get("max_steps")
    return {"tuning_seed": matrix.tuning_seed, "eval_seeds": list(matrix.evaluation_seeds),
            "budget": protocol.budget, "max_extensions": protocol.max_extensions, "refine": protocol.refine,
            "rounds": protocol.rounds,
            "sweep_max_steps": sweep_steps or (cell_steps[0] if len(cell_steps) == 1 else None),
            "cell_max_steps": cell_steps[0] if len(cell_steps) == 1 else cell_steps,
            "horizon": "final" if sweep_steps is None or cell_steps == [sweep_steps] else "short",
            "grid_lr_unit": (units.pop() if len(units) == 1 else "mixed") if units else None}


class _Trials(dict):
    """One group's trials as `tuning.plan` asks for them: trial key -> `Outcome`, read from the
    trial's folder once per replay; the cells it made are kept for the record."""

    def __init__(self, loop: TuningLoop, group: Tuning, inherited: dict[str, Any]):
        super().__init__()
        self.loop, self.group, self.inherited = loop, group, inherited
        self.cells: dict[tuple, Cell] = {}

    def get(self, key, default=None):  # noqa: ARG002 - every trial has an outcome, pending at least
        if key not in self:
            self.cells[key] = self.loop.matrix.trial_cell(self.group, dict(key), self.inherited)
            self[key] = self.loop.outcome(self.cells[key])
        return self[key]


class TuningLoop:
    """The tuning of one `MatrixRunner` run: its manifest, its phases, its retry rule."""

    def __init__(self, runner: Any, main: list[Cell]):
        self.runner = runner
        self.matrix: Matrix = runner.matrix
        self.trials: dict[str, Cell] = {}  # folder -> every trial cell the searches used
        self.cell_steps = {c.group: c.config.max_steps for c in main}
        self.main_total = len(main)

    def outcome(self, cell: Cell) -> tuning.Outcome:
        """How a tuning trial ended, from its folder (a failed one is retried once with --retry-failed)."""
        runner = self.runner
        summary = read_summary(runner.runs_dir / cell.folder)
        if finished(summary, cell.config.max_steps):
            loss = summary.get("final_val_loss")
            if summary["status"] == "completed" and isinstance(loss, (int, float)) and math.isfinite(loss):
                return tuning.Outcome(tuning.COMPLETED, float(loss))
            return tuning.Outcome(tuning.DIVERGED)
        if runner.manifest["cells"].get(cell.folder, {}).get("status") == "failed" and (
                not runner.retry_failed or cell.folder in runner.attempted):
            return tuning.Outcome(tuning.FAILED)
        return tuning.Outcome(tuning.PENDING)

    def entry(self, group: Tuning, search: tuning.Plan | None, trials: _Trials | None,
              inherited: dict[str, Any], settled: bool) -> dict[str, Any]:
        """A group's record under ``sweeps`` (the module doc; the schema `report_sweeps` reads)."""
        matrix = self.matrix
        cell_steps = self.cell_steps.get(group.group)
        trial_steps = matrix.sweep.get("max_steps") or cell_steps
        entry: dict[str, Any] = {
            "format": group.format, "arm": group.arm, "layers": group.layers, "keys": list(group.grids),
            "grids": {k: list(v) for k, v in group.grids.items()}, "seed": matrix.tuning_seed,
            "max_steps": trial_steps, "horizon": "final" if trial_steps == cell_steps else "short",
            "budget": matrix.budget, "spent": 0, "hit_budget": False, "trials": [], "best": None,
            "best_loss": None, "interior": {}, "neighbours": {}, "resolution": math.nan,
            "stopped": "running", "inherited": {}, "settled": settled}
        for key, source in group.inherits.items():
            chosen = self.runner.manifest["sweeps"].get(source, {})
            entry["inherited"][key] = {"from": matrix.arms[group.arm][key]["from"], "group": source,
                                       "value": inherited.get(key),
                                       "interior": bool(chosen.get("interior", {}).get(key, False))}
        if search is None:
            entry["stopped"] = "interior" if settled else "running"
            return entry
        for values in search.trials:
            key = tuning.trial_key(values)
            outcome = trials.get(key)
            entry["trials"].append({"values": values, "folder": trials.cells[key].folder, "status": outcome.status,
                                    "final_val_loss": outcome.loss})
        entry |= {"spent": search.spent, "hit_budget": search.hit_budget, "best": search.best,
                  "best_loss": search.best_loss, "interior": search.interior, "resolution": search.resolution,
                  "neighbours": {k: {side: n.to_dict() if n else None for side, n in sides.items()}
                                 for k, sides in search.neighbours.items()},
                  "stopped": search.stopped}
        return entry

    def run(self, progress: Any, notify: Callable) -> dict[str, dict[str, Any]]:
        """Every group's tuning, to the end: group -> the values its cells use (chosen and inherited)."""
        runner, groups = self.runner, self.matrix.tunings()
        chosen: dict[str, dict[str, Any]] = {}
        last: set[str] | None = None
        while True:
            batch: dict[str, Cell] = {}
            for group in groups:
                if group.group in chosen or any(source not in chosen for source in group.inherits.values()):
                    continue  # settled, or waits for the tuning it inherits from
                inherited = {k: chosen[source][k] for k, source in group.inherits.items() if k in chosen[source]}
                trials = _Trials(self, group, inherited) if group.grids else None
                search = tuning.plan(group.grids, self.matrix.protocol, trials) if trials is not None else None
                settled = search is None or search.settled
                runner.manifest["sweeps"][group.group] = self.entry(group, search, trials, inherited, settled)
                if trials is not None:
                    self.trials |= {c.folder: c for c in trials.cells.values()}
                if settled:
                    chosen[group.group] = {**((search.best if search else None) or {}), **inherited}
                else:
                    batch |= {(c := trials.cells[tuning.trial_key(v)]).folder: c for v in search.next}
            runner.save()
            if not batch or set(batch) == last:
                break
            last = set(batch)
            progress.total = max(progress.total, progress.done + len(batch) + self.main_total)
            runner.phase("tuning", list(batch.values()), progress, notify)
        unsettled = [g.group for g in groups if g.group not in chosen]
        if unsettled:
            notify("message", None, {"text": f"tuning did not settle for {', '.join(unsettled)} (a cycle of "
                                             "inherited values?): their cells keep their arms' own values"}, progress)
        empty = [g for g, s in runner.manifest["sweeps"].items() if s.get("settled") and s.get("keys") and not s["best"]]
        if empty:
            notify("message", None, {"text": f"tuning without a usable result for {', '.join(empty)}: "
                                             "those groups keep their arm's own value"}, progress)
        return chosen
