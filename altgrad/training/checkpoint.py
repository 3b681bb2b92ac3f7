"""Checkpoints: atomic, the last K kept, loaded with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer,
step, RNG states and the trainer's counters. The learning-rate schedule is a pure function
of the step and batches are a pure function of (seed, step), so neither needs state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io import atomic_write

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_dir(run_dir) / f"step_{step:07d}.pt"
    atomic_write(path, lambda stream: torch.save(state, stream))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load one checkpoint; a damaged file is a `UserError` that names it and the way out."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle error, ...
        raise UserError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {str(error)[:120]}); "
            "delete it to resume from the previous checkpoint, or start a new run"
        ) from None
    required = {"step", "model", "optimizer", "rng", "trainer"}
    if not isinstance(state, dict) or not required <= set(state):
        raise UserError(f"checkpoint {path} is not an AltGrad checkpoint (missing {sorted(required - set(state or {}))})")
    return state


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
