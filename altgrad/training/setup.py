"""What a run needs before its loop: its device, data, folder, schedule and (on resume) config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.prepare import DEFAULT_DATA_ROOT, ensure_builtin_data, load_meta
from ..errors import UserError
from .config import CONFIG_FILE_NAME, RESUMABLE_KEYS, TrainConfig, config_from_dict, read_yaml

DEFAULT_DATA = DEFAULT_DATA_ROOT / "eurlex"
Event = Callable[[str, dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
    return torch.device(name)


#: torch.compile mode per ``compile_mode``. "exact" is inductor's lite mode: the graph is captured
#: once and replayed without the modules' Python, but every op runs its ATen kernel (no fusion, no
#: decomposition), so a compiled run is bit-identical to the eager one. "fused" is inductor's
#: default: fused elementwise kernels and its own reductions, equal to eager to float precision.
TORCH_COMPILE_MODES = {"exact": "lite", "fused": "default"}


def compiled(module: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """``module`` under torch.compile when the config asks for it (``compile``, ``compile_mode``)."""
    return torch.compile(module, mode=TORCH_COMPILE_MODES[config.compile_mode]) if config.compile else module


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``config.warmup`` steps, cosine decay to ``config.floor_lr``
    at ``decay_steps``, then flat (the config's properties hold the warmup and floor rules:
    ``warmup_ratio`` or ``warmup_steps``; ``min_lr``, ``min_lr_ratio`` or the default ratio)."""
    warmup, floor = config.warmup, config.floor_lr
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    if step >= config.decay_steps:
        return floor
    progress = (step - warmup) / max(1, config.decay_steps - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - floor)


def find_data(config: TrainConfig, notify: Event) -> tuple[Path, dict[str, Any]]:
    """The prepared data to train on: ``config.data``, else data/eurlex, else the built-in corpus."""
    if config.data:
        return Path(config.data), load_meta(Path(config.data))
    if (DEFAULT_DATA / "meta.json").exists():
        return DEFAULT_DATA, load_meta(DEFAULT_DATA)
    notify("warning", {"message": f"no prepared data in {DEFAULT_DATA}; training on the built-in corpus "
                                  "(run `altgrad prepare-data eurlex` for EurLex)"})
    folder = ensure_builtin_data(DEFAULT_DATA.parent)
    return folder, load_meta(folder)


def run_directory(config: TrainConfig) -> Path:
    return Path(config.runs_dir) / config.name


#: What a resumed run may change: where it is, how long it runs, where it reports (each field's
#: ``resumable``, declared with it in `TrainConfig`).
RESUME_MAY_CHANGE = tuple(sorted(RESUMABLE_KEYS))


def resume_config(run_dir: Path, max_steps: int | None = None, wandb: str | None = None,
                  requested: TrainConfig | None = None, given: tuple[str, ...] = (),
                  adapt_threads: bool | None = None, **changes: Any) -> TrainConfig:
    """A run's saved config, optionally with more steps, another W&B mode or thread policy, or
    any other setting ``--resume`` may change (``changes``, by field name).

    ``given`` names the settings the user gave explicitly (flags, a config file) and
    ``requested`` their resolved values; one that would change the saved run is an error that
    names it: a resumed run continues exactly the run that was saved, or it is another run.
    """
    path = Path(run_dir) / CONFIG_FILE_NAME
    if not path.exists():
        raise UserError(f"nothing to resume: {path} not found")
    config = config_from_dict(read_yaml(path), str(path))
    if requested is not None:
        changed = [f"{key} {getattr(requested, key)!r} (saved: {getattr(config, key)!r})" for key in given
                   if key not in RESUMABLE_KEYS and getattr(requested, key) != getattr(config, key)]
        if changed:
            raise UserError(f"--resume continues {run_dir} as it was saved, but these settings would change it: "
                            f"{', '.join(changed)}; drop them, or start another run with --run-name")
    changes = {k: v for k, v in {**changes, "max_steps": max_steps, "wandb": wandb,
                                 "adapt_threads": adapt_threads}.items() if v is not None}
    fixed = sorted(set(changes) - RESUMABLE_KEYS)
    if fixed:
        raise UserError(f"--resume cannot change {', '.join(fixed)}; it may change {', '.join(RESUME_MAY_CHANGE)}")
    return dataclasses.replace(config, **changes)
