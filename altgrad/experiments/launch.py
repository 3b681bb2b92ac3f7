"""Running a matrix: every cell an ordinary training run, locally or as a submitit job array.

- A cell whose run folder holds a finished run (completed or diverged, all steps) is skipped;
  one with checkpoints is resumed; one with a folder but no checkpoint starts again (it had
  nothing to keep). A cell that failed (an exception, not a diverged run) is recorded with its
  error and the path of its log, and is not retried unless asked (``retry_failed``). One cell's
  failure never stops the others.
- Locally, cells run in a `concurrent.futures.ProcessPoolExecutor` (spawned processes), ``jobs``
  at a time, the CPU threads divided among them. On a cluster, `submitit` submits them as one
  job array per batch (each pass of the tuning, then the main cells); its ``local`` and
  ``debug`` executors run the same path on one machine.
- A cell belongs to the process that trains it (`ownership.cell_lock`): a cell another process
  still trains is left alone and recorded as failed with why. Local workers die with the matrix
  process, however it ends (`ownership.die_with_parent`), so none trains on unsupervised.
- Tuning comes first (`tuning_runs`, `tuning`): every group's search proposes its next trials, the trials of
  all groups run together, and the searches are replayed from the outcomes until every one has
  settled; a group that inherits a value waits for the group it takes it from. Then the main
  cells run with the chosen values.
- The manifest (``runs_dir/manifest.json``, written atomically by this process only) says for
  every cell what ran, when, where (host, job id), how it ended and where its log is; under
  ``sweeps`` for every tuned group every trial, the values chosen, whether each is interior, its
  neighbours, the tuning resolution, the runs spent of the budget and why the search stopped;
  under ``protocol`` the tuning settings every group shared (`tuning_runs`).

Each cell writes ``matrix.log`` in its run folder: the trainer's events as lines of text. A
finished cell never resumes, so its checkpoints are removed once its summary is written (its
config, metrics, summary and log stay: what the report reads); ``keep_checkpoints`` keeps them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import write_json
from ..provenance import code_version
from ..training.checkpoint import checkpoint_dir, list_checkpoints
from .matrix import Cell, Matrix
from .ownership import CellBusy, cell_lock, die_with_parent
from .runs import finished, read_summary
from .tuning_runs import TuningLoop, protocol_record

MANIFEST = "manifest.json"
LOG_FILE = "matrix.log"
FINISHED = ("completed", "diverged")
LAUNCHERS = ("local", "slurm")
IN_USE_S = 120  # on a cluster, a cell folder written this recently may belong to a job still running
LOCK_FILE = ".matrix.lock"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(runs_dir: Path) -> dict[str, Any]:
    path = Path(runs_dir) / MANIFEST
    if not path.exists():
        return {"cells": {}, "sweeps": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:  # atomic writes make this a foreign file
        raise UserError(f"{path} is not a matrix manifest ({error}); move it away") from None


def run_state(run_dir: Path, max_steps: int) -> str:
    """What a cell's folder holds: finished | resumable | fresh."""
    if finished(read_summary(run_dir), max_steps):
        return "finished"
    return "resumable" if list_checkpoints(run_dir) else "fresh"


# ---- one cell, in a worker process ---------------------------------------------------------
class _EventLog:
    """The trainer's events as lines in the run folder's matrix.log."""

    def __init__(self, path: Path):
        self.stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by run_cell

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "log":
            shown = {k: payload[k] for k in ("step", "loss", "val_loss", "lr", "tokens_per_s") if k in payload}
            self.stream.write(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in shown.items()) + "\n")
        elif kind in ("warning", "format_shift", "checkpoint", "start"):
            keep = {k: v for k, v in payload.items() if k not in ("layers",)}
            self.stream.write(f"{kind}: {keep}\n")


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one cell (``spec``: its config dict, folder and threads) and say how it ended.

    Runs in a worker process (a pool process or a submitit job). Never raises: an exception
    becomes ``status: failed`` with its message, the traceback goes to the cell's log.
    """
    import torch

    from ..training.config import config_from_dict

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    run_dir = Path(spec["config"]["runs_dir"]) / spec["config"]["run_name"]
    started, began = now(), time.perf_counter()
    outcome: dict[str, Any] = {"started": started, "host": socket.gethostname(), "pid": os.getpid(),
                               "log": str(run_dir / LOG_FILE)}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        outcome["job_id"] = job + (f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in os.environ else "")
    config = config_from_dict(spec["config"], f"cell {spec['config']['run_name']}")
    try:
        with cell_lock(run_dir.parent, run_dir.name):  # the cell is this process's until it returns
            return _train_cell(config, run_dir, spec, outcome, started, began)
    except CellBusy as busy:
        return outcome | {"status": "failed", "ended": now(),
                          "error": f"{busy}; it was left alone: run the matrix again once that process has ended"}


def _train_cell(config: Any, run_dir: Path, spec: dict[str, Any], outcome: dict[str, Any], started: str,
                began: float) -> dict[str, Any]:
    from ..training import Trainer

    state = run_state(run_dir, config.max_steps)
    if state == "finished":
        return outcome | {"status": "skipped", "ended": now()}
    if state == "fresh" and run_dir.exists():
        log = run_dir / LOG_FILE
        if spec.get("cluster") and log.exists() and time.time() - log.stat().st_mtime < IN_USE_S:
            return outcome | {"status": "failed", "ended": now(),
                              "error": f"{run_dir} was written {IN_USE_S} s ago or less: another job may still run "
                                       "this cell; wait for it (squeue) and run the matrix again"}
        shutil.rmtree(run_dir)  # started, killed before its first checkpoint: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _EventLog(run_dir / LOG_FILE)
    log.stream.write(f"--- {started} on {outcome['host']} ({'resuming' if state == 'resumable' else 'starting'})\n")
    try:
        result = Trainer(config, resume=state == "resumable", on_event=log).run()
        final = result.final_val_loss
        outcome |= {"status": result.status, "steps": result.steps, "final_val_loss": final,
                    "message": result.message}
    except KeyboardInterrupt:
        outcome |= {"status": "interrupted"}
    except BaseException as error:  # noqa: BLE001 - a cell's failure is recorded, never fatal to the matrix
        log.stream.write(traceback.format_exc())
        outcome |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        log.stream.close()
    if not spec.get("keep_checkpoints") and finished(read_summary(run_dir), config.max_steps):
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)  # its summary and metrics are the record
    return outcome | {"ended": now(), "wall_s": time.perf_counter() - began}


# ---- the matrix ------------------------------------------------------------------------------
@dataclass
class Progress:
    """What the caller shows: called after every cell with the manifest's counts."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0


Callback = Callable[[str, Cell | None, dict[str, Any] | None, Progress], None]


class MatrixRunner:
    def __init__(self, matrix: Matrix, jobs: int = 1, launcher: str = "local", retry_failed: bool = False,
                 executor_options: dict[str, Any] | None = None, threads: int | None = None,
                 keep_checkpoints: bool = False):
        if launcher not in LAUNCHERS:
            raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}")
        if jobs < 1:
            raise UserError("--jobs must be >= 1")
        self.matrix = matrix
        self.jobs = jobs
        self.launcher = launcher
        self.retry_failed = retry_failed
        self.keep_checkpoints = keep_checkpoints  # a finished cell never resumes: by default only its records stay
        self.executor_options = {**matrix.launcher.get("slurm", {}), **(executor_options or {})}
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads or max(1, cpus // jobs)
        self.runs_dir = Path(matrix.runs_dir)
        self.manifest = read_manifest(self.runs_dir)
        self.manifest.setdefault("cells", {})
        self.manifest.setdefault("sweeps", {})

    # ---- manifest ---------------------------------------------------------------------------
    def save(self) -> None:
        self.manifest |= {"matrix": str(self.matrix.path), "runs_dir": str(self.runs_dir), "updated": now()}
        write_json(self.runs_dir / MANIFEST, self.manifest)

    def _record(self, cell: Cell, outcome: dict[str, Any]) -> None:
        entry = self.manifest["cells"].setdefault(cell.folder, {})
        previous = entry.get("status")
        entry |= cell.describe() | {"folder": cell.folder}
        if outcome.get("status") == "skipped":  # finished (or failed) earlier: keep how it ended
            if "status" not in entry or entry["status"] in ("queued", "running"):
                entry["status"] = read_summary(self.runs_dir / cell.folder).get("status", "failed")
            return
        if outcome.get("status") == "queued":
            entry |= outcome
            return
        entry["attempts"] = entry.get("attempts", 0) + 1
        entry |= {k: v for k, v in outcome.items() if k != "pid"}
        if outcome.get("status") != "failed":
            entry.pop("error", None)
        if previous == "failed" and outcome.get("status") in FINISHED:
            entry["retried"] = True

    # ---- planning ---------------------------------------------------------------------------
    def todo(self, cells: list[Cell]) -> list[Cell]:
        """The cells to run now: not finished, and not failed before (unless retrying)."""
        out = []
        for cell in cells:
            if run_state(self.runs_dir / cell.folder, cell.config.max_steps) == "finished":
                continue
            if self.manifest["cells"].get(cell.folder, {}).get("status") == "failed" and not self.retry_failed:
                continue
            out.append(cell)
        return out

    # ---- running ----------------------------------------------------------------------------
    def _spec(self, cell: Cell) -> dict[str, Any]:
        config = cell.config.to_dict() | {"run_name": cell.folder, "runs_dir": str(self.runs_dir)}
        return {"config": config, "threads": self.threads if self.launcher == "local" else None,
                "cluster": self.launcher != "local", "keep_checkpoints": self.keep_checkpoints}

    def run(self, on_event: Callback | None = None) -> dict[str, Any]:
        """Sweeps, then every main cell; returns the manifest. One matrix run per runs directory
        at a time (a lock file): two would overwrite each other's manifest."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.runs_dir / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"another `altgrad matrix run` is using {self.runs_dir}; wait for it to end") from None
            return self._run(on_event)

    def _run(self, on_event: Callback | None) -> dict[str, Any]:
        notify = on_event or (lambda *args: None)
        main = self.matrix.cells()
        self.attempted: set[str] = set()  # cells run by this invocation (a failed one is retried once)
        progress = Progress(total=len(self.matrix.sweep_cells()) + len(main))
        self.manifest["protocol"] = protocol_record(self.matrix, main)
        self.manifest["code"] = code_version()  # of this invocation; each cell's summary has its own
        self.save()
        loop = TuningLoop(self, main)
        chosen = loop.run(progress, notify)
        cells = self.matrix.cells(chosen)
        self._retire({c.folder for c in [*loop.trials.values(), *cells]})
        progress.total = progress.done + len(cells)
        self.phase("main", cells, progress, notify)
        return self.manifest

    def _retire(self, current: set[str]) -> None:
        """Cells of an earlier version of the matrix (another config, another swept value) move to
        ``superseded``: kept on disk and in the manifest, out of the matrix's cells and its report."""
        stale = [folder for folder in self.manifest["cells"] if folder not in current]
        if stale:
            old = self.manifest.setdefault("superseded", {})
            for folder in stale:
                old[folder] = self.manifest["cells"].pop(folder)
            self.save()

    def phase(self, phase: str, cells: list[Cell], progress: Progress, notify: Callback) -> None:
        todo = self.todo(cells)
        skipped = len(cells) - len(todo)
        progress.done += skipped
        waiting = {cell.folder for cell in todo}
        for cell in cells:
            if cell.folder not in waiting:
                self._record(cell, {"status": "skipped"})
        self.save()
        notify("phase", None, {"phase": phase, "cells": len(cells), "todo": len(todo)}, progress)
        if not todo:
            return
        run = self._run_local if self.launcher == "local" else self._run_submitit
        self.attempted |= {cell.folder for cell in todo}
        for cell, outcome in run(todo, progress, notify):
            self._record(cell, outcome)
            self.save()
            progress.done += 1
            progress.failed += outcome.get("status") == "failed"
            notify("cell", cell, outcome, progress)
            if outcome.get("status") == "interrupted" and self.launcher == "local":
                raise KeyboardInterrupt  # Ctrl-C reached the cells: stop here (a cluster job's time limit does not)

    def _run_local(self, cells: list[Cell], progress: Progress, notify: Callback
                   ) -> Iterator[tuple[Cell, dict[str, Any]]]:
        # Spawned workers inherit the environment: their OpenMP pools get their share of the CPUs.
        # Each worker dies with this process (kill -9 included): none trains a cell unsupervised.
        with _environment(OMP_NUM_THREADS=str(self.threads)), concurrent.futures.ProcessPoolExecutor(
                max_workers=min(self.jobs, len(cells)), mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = {}
            for cell in cells:
                futures[pool.submit(run_cell, self._spec(cell))] = cell
                self._record(cell, {"status": "queued"})
            self.save()
            progress.running = min(self.jobs, len(cells))
            notify("running", None, None, progress)
            try:
                for future in concurrent.futures.as_completed(futures):
                    cell = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as error:  # noqa: BLE001 - a worker that died (killed, out of memory)
                        outcome = {"status": "failed", "error": f"worker died: {type(error).__name__}: {error}",
                                   "log": str(self.runs_dir / cell.folder / LOG_FILE), "ended": now()}
                    remaining = sum(not f.done() for f in futures)
                    progress.running = min(self.jobs, remaining)
                    yield cell, outcome
            except KeyboardInterrupt:
                for future in futures:
                    future.cancel()
                raise

    def _run_submitit(self, cells: list[Cell], progress: Progress, notify: Callback
                      ) -> Iterator[tuple[Cell, dict[str, Any]]]:
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs submitit: pip install 'altgrad[cluster]'") from None
        options = dict(self.executor_options)
        cluster = options.pop("cluster", None)  # slurm (default where available), local or debug
        executor = submitit.AutoExecutor(folder=str(self.runs_dir / "submitit" / "%j"), cluster=cluster)
        try:
            executor.update_parameters(**options)
        except (TypeError, ValueError) as error:
            raise UserError(f"submitit executor options {options}: {error}") from None
        with executor.batch():
            jobs = [(cell, executor.submit(run_cell, self._spec(cell))) for cell in cells]
        for cell, job in jobs:
            self._record(cell, {"status": "queued", "job_id": str(job.job_id)})
        self.save()
        progress.running = len(jobs)
        notify("running", None, None, progress)
        pending = list(jobs)
        while pending:
            finished = [(cell, job) for cell, job in pending if job.done()]
            for cell, job in finished:
                pending.remove((cell, job))
                try:
                    outcome = job.result()
                except Exception as error:  # noqa: BLE001 - the job itself failed (killed, timed out)
                    outcome = {"status": "failed", "error": f"job {job.job_id}: {type(error).__name__}: "
                                                            f"{str(error)[:300]}", "ended": now(),
                               "log": str(self.runs_dir / cell.folder / LOG_FILE)}
                outcome.setdefault("job_id", str(job.job_id))
                progress.running = len(pending)
                yield cell, outcome
            if pending and not finished:
                time.sleep(1.0)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

