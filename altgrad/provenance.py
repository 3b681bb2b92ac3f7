"""What produced a run: AltGrad's version and git commit (with a dirty flag) when it runs from a
checkout, and the versions of Python and torch. Recorded in every run's summary and in a
matrix's manifest; the report lists the versions of its cells and warns when they are mixed."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

from . import __version__

SOURCE = Path(__file__).resolve().parent


def _git(source: Path, *args: str) -> str | None:
    """What ``git ARGS`` prints in ``source``; None where it fails (not a checkout, no git)."""
    try:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkout(source: Path = SOURCE) -> tuple[str | None, bool | None]:
    """The commit of the git checkout whose top folder holds the package ``source`` and whether it has
    uncommitted changes; (None, None) when it is not one (an installed copy, even one inside another
    repository) or git is missing."""
    if _git(source, "rev-parse", "--show-toplevel") != str(Path(source).resolve().parent):
        return None, None
    commit, status = _git(source, "rev-parse", "HEAD"), _git(source, "status", "--porcelain")
    return commit, (bool(status) if commit is not None and status is not None else None)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``altgrad``, ``commit`` and ``dirty`` (None outside a git checkout), ``torch``, ``python``."""
    import torch

    commit, dirty = checkout()
    return {"altgrad": __version__, "commit": commit, "dirty": dirty,
            "torch": torch.__version__, "python": platform.python_version()}


def version_label(code: dict[str, Any] | None) -> str:
    """``altgrad 0.1.0 @ 1a2b3c4d (dirty), torch 2.13.0+cpu``; ``not recorded`` for older runs."""
    if not code:
        return "not recorded"
    commit = code.get("commit")
    where = f" @ {commit[:8]}" + (" (dirty)" if code.get("dirty") else "") if commit else " (not a git checkout)"
    return f"altgrad {code.get('altgrad')}{where}, torch {code.get('torch')}"
