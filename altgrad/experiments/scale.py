"""What a matrix costs: the runs it spent, and the runs and hours another matrix would need.

`spent` reads a finished matrix's runs (its evaluation cells and every tuning run in its
manifest) and sums their recorded wall times. `plan` counts what a matrix file asks for under
the same protocol: every evaluation cell, and per tuned group at most the tuning budget (the
protocol can stop a group's search earlier, at an interior optimum, so the tuning count is an
upper bound). `measure` times a few training steps and one evaluation of one cell of each
(arm, layer policy) on this machine's device, with the cell's own settings (its monitoring
included), and `Estimate` turns the counts and the times into hours. The format of a cell does
not change its cost (a cast costs the same for every format), so one measured cell stands for
every format of its arm and layer policy; the measured cell is named.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .matrix import Cell, Matrix

#: Logging windows left out of a measured step time (lazy set-up, the first casts). A short
#: measurement also leaves out the rarer monitors (rank health every ``rank_interval`` steps) and
#: checkpoints: an estimate holds steps and evaluations, and is low by those.
WARMUP_WINDOWS = 1


# ---- what a finished matrix spent ----------------------------------------------------------------
FINISHED = ("completed", "diverged")


@dataclass(frozen=True)
class Spent:
    """The finished runs of a matrix directory and the time they took (from its manifest)."""

    cells: int  # finished evaluation runs
    tuning: int  # finished tuning runs
    hours: float  # the sum of every finished run's wall time (its launcher's: process start to end)
    elapsed_hours: float | None  # the time at least one of them was running (their intervals' union)
    unfinished: int  # runs the manifest lists that did not finish (failed, running, queued)

    @property
    def runs(self) -> int:
        return self.cells + self.tuning

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "runs": self.runs}

    @property
    def text(self) -> str:
        elapsed = ("" if self.elapsed_hours is None else
                   f"; {hours_text(self.elapsed_hours)} hours of the machine's time with at least one run going")
        missing = f"; {self.unfinished} listed run(s) did not finish and are not counted" if self.unfinished else ""
        return (f"{self.runs} runs ({self.cells} evaluation runs, {self.tuning} tuning runs): "
                f"{hours_text(self.hours)} run-hours (the sum of each run's wall time, its last attempt's)"
                f"{elapsed}{missing}.")


def _union_hours(intervals: list[tuple[datetime, datetime]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total / 3600


def spent(manifest: dict[str, Any]) -> Spent:
    """The evaluation cells and tuning runs of a matrix's manifest, and their times."""
    counts, seconds, unfinished, intervals = {"cells": 0, "tuning": 0}, 0.0, 0, []
    for entry in manifest.get("cells", {}).values():
        wall = entry.get("wall_s")
        if entry.get("status") not in FINISHED or not isinstance(wall, (int, float)):
            unfinished += 1
            continue
        counts["tuning" if entry.get("sweep") else "cells"] += 1
        seconds += wall
        try:
            intervals.append((datetime.fromisoformat(entry["started"]), datetime.fromisoformat(entry["ended"])))
        except (KeyError, TypeError, ValueError):
            pass
    complete = len(intervals) == counts["cells"] + counts["tuning"]
    return Spent(counts["cells"], counts["tuning"], seconds / 3600,
                 _union_hours(intervals) if complete and intervals else None, unfinished)


# ---- what a matrix file asks for ---------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """The runs of one (arm, layer policy) of a matrix, and the cell that stands for their cost."""

    arm: str
    layers: str
    cell: str  # the cell measured (the first of these runs in the file)
    cells: int  # evaluation runs
    tuning: int  # tuning runs, at most (the budget of every tuned group)
    steps: int  # steps of an evaluation run
    tuning_steps: int
    evaluations: int  # evaluations in an evaluation run (every eval_interval steps, and step 0)
    tuning_evaluations: int
    step_s: float | None = None  # measured: seconds a training step, its monitoring included
    evaluation_s: float | None = None  # measured: seconds one evaluation

    @property
    def key(self) -> str:
        return self.arm if self.layers in ("uniform", "-") else f"{self.arm} {self.layers}"

    def hours(self) -> float | None:
        if self.step_s is None or self.evaluation_s is None:
            return None
        cell = self.steps * self.step_s + self.evaluations * self.evaluation_s
        trial = self.tuning_steps * self.step_s + self.tuning_evaluations * self.evaluation_s
        return (self.cells * cell + self.tuning * trial) / 3600


def hours_text(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.1f}" if hours >= 1 else f"{hours:.2f}"


def _evaluations(steps: int, interval: int) -> int:
    return steps // interval + 1 + (steps % interval != 0)  # step 0, every interval, and the last step


def _representatives(matrix: Matrix) -> dict[tuple[str, str], Cell]:
    first: dict[tuple[str, str], Cell] = {}
    for cell in matrix.cells():
        first.setdefault((cell.arm, cell.layers), cell)
    return first


def plan(matrix: Matrix) -> list[Work]:
    """Every (arm, layer policy) of the matrix with its runs, in the file's order."""
    cells: dict[tuple[str, str], list[Cell]] = {}
    for cell in matrix.cells():
        cells.setdefault((cell.arm, cell.layers), []).append(cell)
    tuned: dict[tuple[str, str], int] = {}
    for group in matrix.tunings():
        if group.grids:
            tuned[(group.arm, group.layers)] = tuned.get((group.arm, group.layers), 0) + 1
    out = []
    for (arm, layers), members in cells.items():
        config = members[0].config
        sweep_steps = int(matrix.sweep.get("max_steps") or config.max_steps)
        out.append(Work(arm, layers, members[0].name, len(members), tuned.get((arm, layers), 0) * matrix.budget,
                        config.max_steps, sweep_steps, _evaluations(config.max_steps, config.eval_interval),
                        _evaluations(sweep_steps, config.eval_interval)))
    return out


# ---- measuring on this machine ------------------------------------------------------------------
def _device_label(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (cuda)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def step_seconds(records: list[dict[str, Any]], skip: int = WARMUP_WINDOWS) -> float:
    """Seconds a training step, from a run's logged windows: their total time over their steps,
    the first ``skip`` windows left out. Each record's tokens_per_s covers the steps since the
    previous record and leaves out the evaluation it holds."""
    windows, last_tokens = [], 0
    for record in records:
        if "tokens_per_s" in record and "tokens" in record:
            tokens = record["tokens"] - last_tokens
            last_tokens = record["tokens"]
            if record["tokens_per_s"] > 0:
                windows.append((tokens, tokens / record["tokens_per_s"]))
    kept = windows[skip:]
    if not kept:
        raise ValueError("too few logged windows to time a step: measure more steps")
    tokens, seconds = sum(t for t, _ in kept), sum(s for _, s in kept)
    return seconds / tokens  # per token; the caller multiplies by the tokens of a step


def measure_cell(cell: Cell, steps: int, device: str | None = None) -> tuple[float, float]:
    """(seconds a training step, seconds one evaluation) of a cell's settings, over ``steps`` steps.
    The run evaluates one batch (its evaluations are outside the step windows); an evaluation's
    time is one batch's, timed apart (the median of three), times the cell's ``eval_iters``."""
    from ..training import Trainer
    from ..training.tracking import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        changes = dict(max_steps=steps, eval_interval=steps, eval_iters=1, checkpoint_interval=steps, runs_dir=tmp,
                       run_name="measure", wandb="disabled", adapt_threads=False)
        if device is not None:
            changes["device"] = device
        config = dataclasses.replace(cell.config, **changes)
        trainer = Trainer(config)
        trainer.run()
        per_token = step_seconds(read_metrics(trainer.run_dir))
        times = []
        for _ in range(3):
            began = time.perf_counter()
            trainer.evaluate()
            times.append(time.perf_counter() - began)
        return per_token * config.tokens_per_step, statistics.median(times) * cell.config.eval_iters


@dataclass(frozen=True)
class Estimate:
    """A matrix's runs and, where measured, its hours on the device its step times come from."""

    matrix: str
    preset: str
    device: str
    measured_steps: int
    code: str
    work: tuple[Work, ...]

    @property
    def runs(self) -> int:
        return sum(w.cells + w.tuning for w in self.work)

    @property
    def cells(self) -> int:
        return sum(w.cells for w in self.work)

    def hours(self) -> float | None:
        hours = [w.hours() for w in self.work]
        return None if any(h is None for h in hours) else sum(hours)

    def to_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "preset": self.preset, "device": self.device,
                "measured_steps": self.measured_steps, "code": self.code,
                "work": [dataclasses.asdict(w) for w in self.work], "runs": self.runs, "hours": self.hours()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        fields = {f.name for f in dataclasses.fields(Work)}
        return cls(str(data["matrix"]), str(data["preset"]), str(data["device"]), int(data["measured_steps"]),
                   str(data.get("code", "not recorded")),
                   tuple(Work(**{k: v for k, v in w.items() if k in fields}) for w in data["work"]))

    def lines_md(self) -> list[str]:
        hours = self.hours()
        tuning = sum(w.tuning for w in self.work)
        lines = [f"`{self.matrix}` ({self.preset} preset): {self.runs} runs at most under the same protocol: "
                 f"{self.cells} evaluation runs and at most {tuning} tuning runs (the budget of every tuned group; "
                 "a search that settles at an interior optimum earlier spends fewer).", ""]
        if hours is not None:
            lines += [f"Measured on {self.device} ({self.measured_steps} steps of one cell per arm and layer policy, "
                      f"its monitoring included; an evaluation timed apart as one batch x eval_iters; code {self.code}): "
                      f"**{hours_text(hours)} device-hours** in all, one run at a time per device."
                      + (" These are CPU hours: no GPU measured them. On the GPU the matrix is for, `altgrad matrix "
                         f"estimate {self.matrix} --device cuda --out FILE` measures the same and `altgrad report "
                         "... --scale FILE` puts it here." if self.device.startswith("cpu") else ""), ""]
        lines += ["| arm | layers | measured cell | evaluation runs | tuning runs (at most) | steps | s / step | "
                  "s / evaluation | hours |", "|---|---|---|---|---|---|---|---|---|"]
        for w in self.work:
            h = w.hours()
            lines.append(f"| {w.arm} | {w.layers} | {w.cell} | {w.cells} | {w.tuning} | {w.steps} | "
                         + (f"{w.step_s:.3f} | {w.evaluation_s:.2f} | {hours_text(h)} |" if h is not None else "- | - | - |"))
        return lines + [""]


def read_estimate(path: Path) -> Estimate:
    """An `altgrad matrix estimate --out` file."""
    from ..errors import UserError

    try:
        return Estimate.from_dict(json.loads(Path(path).read_text()))
    except OSError as error:
        raise UserError(f"cannot read the estimate {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not an `altgrad matrix estimate --out` file ({error})") from None


def estimate(matrix: Matrix, steps: int | None = None, device: str | None = None,
             on_cell: Any = None) -> Estimate:
    """The matrix's runs; with ``steps``, each (arm, layer policy) measured over that many steps."""
    from ..provenance import code_version, version_label

    work = plan(matrix)
    representatives = _representatives(matrix)
    label = "not measured"
    if steps:
        measured = []
        for w in work:
            if on_cell is not None:
                on_cell(w)
            step_s, evaluation_s = measure_cell(representatives[(w.arm, w.layers)], steps, device)
            measured.append(dataclasses.replace(w, step_s=step_s, evaluation_s=evaluation_s))
        work = measured
        label = _device_label(device or representatives[(work[0].arm, work[0].layers)].config.device)
    return Estimate(str(matrix.path), matrix.preset, label, int(steps or 0), version_label(code_version()), tuple(work))
