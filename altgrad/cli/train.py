"""`altgrad train`: resolve the config, run the trainer, show progress live, summarise."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.live import Live
from rich.table import Table

from ..model.surgery import LayerAssignment
from ..training import Trainer, TrainResult, resolve_config, resume_config, run_directory
from ..training.config import RESUMABLE_KEYS, SECTIONS, Setting, TrainConfig, read_yaml, settings
from ..training import distributed
from ..training.shift import describe
from .common import cell, console, error_console, fitted_width, user_errors


class LiveDisplay:
    """A one-table live view: step, loss, val loss, lr, tokens/s, ETA, and warnings."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.val_loss: float | None = None
        self.max_steps = 0
        self.start_step = 0
        self.warnings: list[str] = []
        self.monitored: dict[str, float] = {}
        self.explained_rank = False
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            self.max_steps, self.start_step = payload["max_steps"], payload["start_step"]
            console.print(f"[bold]run[/] {payload['run_dir']}  [bold]data[/] {payload['data']}  "
                          f"[bold]device[/] {payload['device']}  [bold]params[/] {payload['params']:,}"
                          + (f"  [bold]resuming at step[/] {self.start_step}" if self.start_step else ""))
            if payload.get("layers"):
                console.print(layer_table(payload["layers"]))
        elif kind == "log":
            self.latest = payload
            if "val_loss" in payload:
                self.val_loss = payload["val_loss"]
            self.monitored.update({key: payload[key] for _, key in MONITORED if key in payload})
        elif kind == "format_shift":
            style = "magenta" if payload["shifted"] else "red"
            self.live.console.print(f"[{style}]step {payload['step']}: format shift:[/] {describe(payload)}")
        elif kind == "warning":
            self.warnings.append(payload["message"])
            label = "[yellow]warning (critical layer):[/]" if payload.get("critical") else "[yellow]warning:[/]"
            self.live.console.print(f"{label} {payload['message']}")
            if str(payload.get("alert", "")).startswith("rank_drop/") and not self.explained_rank:
                self.explained_rank = True
                self.live.console.print("[dim]  (a rank drop is measured against the layer's highest rank over "
                                        "the last quarter of training, after the first quarter: healthy runs "
                                        "fall by at most about 12% there; compare it with the BF16 run of the "
                                        "same seed, `altgrad compare`'s rank vs ref)[/]")
        self.live.update(self._render())

    def _render(self) -> Table:
        table = Table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
        columns = ["step", "loss", "val loss", "lr", "tokens/s", "ETA"]
        monitored = [(label, key) for label, key in MONITORED if key in self.monitored]
        rec = self.latest
        step = rec.get("step", 0)
        rate = rec.get("tokens_per_s") or 0.0
        tokens_left = (self.max_steps - step) * (rec.get("tokens", 0) / step if step else 0)
        eta = f"{tokens_left / rate:.0f}s" if rate else "-"
        cells = [f"{step}/{self.max_steps}", cell(rec.get("loss")), cell(self.val_loss),
                 f"{rec['lr']:.2e}" if "lr" in rec else "-", f"{rate:,.0f}" if rate else "-", eta,
                 *[cell(self.monitored[key]) for _, key in monitored]]
        for column, value in zip(columns + [label for label, _ in monitored], cells):
            # numbers keep their width; headers wrap between words in a narrow terminal
            width = fitted_width([value], column)
            table.add_column(column, justify="right", min_width=width, max_width=width)
        table.add_row(*cells)
        return table


#: Quantization metrics shown live once a run logs them: (column, metric name).
#: (quant/bit_stall_rate, the other stall measure, is in the metrics, the alerts and the end table;
#: with it the live table no longer fits 80 columns.)
MONITORED = (("stall ratio", "optim/stall_ratio"), ("overflow", "quant/overflow_rate"),
             ("underflow", "quant/underflow_rate"), ("grad cos", "grad_cos_sim/mean"))


def layer_table(layers: list[LayerAssignment]) -> Table:
    """Which Linear layer computes in which format (the result of model surgery)."""
    table = Table(title="Linear layers after surgery", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for column in ("rule", "weight", "activation", "gradient", "rounding", "weight storage"):
        table.add_column(column)
    for layer in layers:
        cfg = layer.config
        if cfg is None:
            table.add_row(layer.name, layer.pattern or "-", *["[dim]high precision[/]"] * 3, "-", "master")
        else:
            rounding = cfg.rounding if cfg.rounding == cfg.grad_rounding else f"{cfg.rounding} / grad {cfg.grad_rounding}"
            storage = "master" if cfg.weight_storage == "master" else f"format, {cfg.update_rounding} updates"
            table.add_row(layer.name, layer.pattern, cfg.format_name("weight"), cfg.format_name("activation"),
                          cfg.format_name("gradient"), rounding, storage)
    return table


def _count(value: int) -> str:
    """1234567 -> 1.23M: counts over a run are long; the exact figures are in summary.json."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def update_table(result: TrainResult) -> Table | None:
    """Per layer with a weight format: what the optimizer did on the grid over the run."""
    rows = {name: layer for name, layer in result.layers.items() if "updates" in layer}
    if not rows:
        return None
    kinds = {(layer["weight"], layer["storage"], layer["optimizer"]) for layer in rows.values()}
    uniform = len(kinds) == 1
    title = "weights on the grid, totals over the measured steps"
    if uniform:
        weight, storage, optimizer = next(iter(kinds))
        title += f": {weight}, {optimizer}, storage {storage}"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cells = []
    for name, layer in rows.items():
        rescales, drift, shift = layer.get("rescales"), layer["bit_position_drift"], layer["scale_log2_change"]
        described = () if uniform else (layer["weight"], layer["storage"], layer["optimizer"])
        cells.append([name.removeprefix("transformer."), *described, _count(layer["updates"]), _count(layer["flips"]),
                      cell(layer["stall_ratio"]), cell(layer["bit_stall_rate"]),
                      "-" if drift != drift else f"{drift:+.2f}", "-" if shift != shift else f"2^{shift:+.0f}",
                      "-" if rescales is None else str(rescales)])
    columns = ["layer", *(() if uniform else ("weight", "storage", "optimizer")), "updates", "flips", "stall ratio",
               "bit-stall", "code drift", "scale change", "rescales"]
    # Cells keep their width (layer names included); in a narrow terminal headers wrap between words.
    natural = sum(max(len(column), *(len(row[i]) for row in cells)) + 1 for i, column in enumerate(columns))
    for index, column in enumerate(columns):
        width = fitted_width([row[index] for row in cells], column)
        table.add_column(column, justify="left" if index == 0 or column in ("weight", "storage", "optimizer")
                         else "right", min_width=width,
                         max_width=width if natural > console.width and index else None)
    for row in cells:
        table.add_row(*row)
    return table


def _summary_table(result: TrainResult) -> Table:
    table = Table(title=f"run {result.run_dir.name}: {result.status}", show_header=False, title_justify="left")
    table.add_column("", style="cyan")
    table.add_column("")
    rows = [("status", result.status + (f" ({result.message})" if result.message else "")),
            ("steps", str(result.steps)), ("tokens", f"{result.tokens:,}"), ("wall time", f"{result.wall_s:.1f} s"),
            ("final val loss", cell(result.final_val_loss)), ("best val loss", cell(result.best_val_loss)),
            ("non-finite steps skipped", str(result.nonfinite_steps)), ("run directory", str(result.run_dir))]
    if result.throughput:
        t = result.throughput
        rows.insert(4, ("throughput", f"{t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu']:.1%} of the measured "
                                      f"matmul peak ({t['peak_flops'] / 1e9:,.1f} GFLOP/s)"))
        if t.get("thread_changes"):
            rows.insert(5, ("CPU threads", f"{t['threads_at_start']} at the start, {t['fewest_threads']} at the "
                                           f"fewest, {t['threads']} at the end ({t['thread_changes']} changes: "
                                           "the machine was shared)"))
    rows += [(f"alert: {name}", f"{seen['count']}x from step {seen['first_step']} ({seen['message']})")
             for name, seen in result.alerts.items() if not name.startswith("rank_drop/")]
    ranks = {name.removeprefix("rank_drop/"): seen for name, seen in result.alerts.items()
             if name.startswith("rank_drop/")}
    if ranks:  # one row: the layers, the critical ones marked; the details are in summary.json
        layers = ", ".join(f"{name.removeprefix('transformer.')}{' (critical)' if seen.get('critical') else ''}"
                           for name, seen in ranks.items())
        first = min(seen["first_step"] for seen in ranks.values())
        rows.append(("alert: rank drop", f"from step {first} in {layers}: judge against the BF16 run of the same "
                                         "seed (rank vs ref in `altgrad compare`)"))
    rows += [("format shift", f"step {event['step']}: {describe(event)}") for event in result.format_shifts]
    rows += [(f"clipped: {name}", f"{totals['clipped_steps']} steps, smallest factor {totals['min_factor']:.3g}")
             for name, totals in result.clipping.items() if totals["clipped_steps"]]
    for row in rows:
        table.add_row(*row)
    return table


def _next_step(config: TrainConfig) -> str:
    """The paired run to train next (a BF16 run's FP8 twin) or the comparison with the baseline."""
    runs = "" if config.runs_dir == "runs" else f" --runs-dir {config.runs_dir}"
    if config.quant_policy() is None:
        twin = dataclasses.replace(config, format="E5M2")
        return (f"[bold]next:[/] the same command with [cyan]--format E5M2[/] (same seed and batches), then "
                f"[cyan]altgrad compare {config.name} {twin.name}{runs}[/]")
    baseline = dataclasses.replace(config, format=None, policy=(), optimizer="adamw", weight_storage="master",
                                   compensation="none")
    missing = "" if (Path(config.runs_dir) / baseline.name).exists() else \
        f" (after the {baseline.label.upper()} baseline: the same command without the format and optimizer options)"
    return f"[bold]next:[/] [cyan]altgrad compare {baseline.name} {config.name}{runs}[/]{missing}"


#: Python types of the annotated field types an option parses (the config checks the values).
_OPTION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def option_settings(cls: type = TrainConfig) -> tuple[Setting, ...]:
    """The config fields that are ``altgrad train`` options (``cli`` in their `option`)."""
    return tuple(s for s in settings(cls) if s.cli)


def option_parameters(cls: type = TrainConfig) -> list[inspect.Parameter]:
    """One Typer option per field with ``cli``: its declarations (default ``--the-name``), its
    help and its section as the ``--help`` panel; None (not given) by default."""
    params = []
    for setting in sorted(option_settings(cls), key=lambda s: list(SECTIONS).index(s.section)):
        kind = _OPTION_TYPES[setting.type.split(" | ")[0]]
        declarations = setting.cli if isinstance(setting.cli, tuple) else ()
        help_text = setting.help + (f" [{setting.unit}]" if setting.unit else "")
        default = typer.Option(None, *declarations, help=help_text, rich_help_panel=setting.section.capitalize())
        params.append(inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Optional[kind]))
    return params


def train(config: Optional[Path] = None, resume: bool = False, **options: Any) -> None:
    """Train a GPT on prepared data (EurLex, or the built-in corpus when none is prepared)."""
    with user_errors():
        resolved = resolve_config(config, options)
        if resume:
            given = {key for key, value in options.items() if value is not None}
            given |= set(read_yaml(config)) if config else set()
            resolved = resume_config(run_directory(resolved), requested=resolved, given=tuple(sorted(given)),
                                     **{key: value for key, value in options.items()
                                        if key in RESUMABLE_KEYS and value is not None})
        if not distributed.context().main:  # another process of a torchrun job: rank 0 reports
            Trainer(resolved, resume=resume).run()
            return
        display = LiveDisplay()
        with display.live:
            result = Trainer(resolved, resume=resume, on_event=display).run()
        if not console.is_terminal:
            console.print()  # the live table's last frame ends without a newline off a terminal
        console.print(_summary_table(result))
        updates = update_table(result)
        if updates is not None:
            console.print(updates)
        if result.status == "completed" and not resolved.run_name:
            console.print(_next_step(resolved))
        if result.status == "interrupted":
            error_console.print("interrupted: a checkpoint was saved; continue with --resume")
            raise typer.Exit(130)
        if result.status == "diverged":
            error_console.print(f"[bold red]diverged:[/] {result.message}")
            raise typer.Exit(1)


# The command's options: --config, every config field with ``cli`` (declared in `TrainConfig`), --resume.
_PARAMETERS = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--config", "-c", help="YAML config file (flat keys or sections).")),
    *option_parameters(),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--resume", help="Continue the run from its last checkpoint.")),
]
train.__signature__ = inspect.Signature(_PARAMETERS, return_annotation=None)
train.__annotations__ = {**{p.name: p.annotation for p in _PARAMETERS}, "return": None}
