"""Who may write a cell: the process that trains it, and only while its matrix lives.

- `die_with_parent`: a pool worker ends when the matrix process that started it ends, however
  it ended (``kill -9``, the OOM killer): on Linux the kernel sends it SIGKILL
  (``prctl(PR_SET_PDEATHSIG)``); everywhere, a watch thread ends it when its parent changes.
- `cell_lock`: the process training a cell holds an exclusive lock on it (``flock`` on a file
  beside the runs), so a second process never trains a cell another one still writes; the kernel
  drops the lock with the process, so a killed owner never leaves it held.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..io import Locked, file_lock

PR_SET_PDEATHSIG = 1
WATCH_S = 0.5  # how often the watch thread looks at the parent
LOCKS = ".locks"


class CellBusy(Exception):
    """Another process holds the cell's lock: it is training the cell now."""


def die_with_parent(parent: int) -> None:
    """Tie this process's life to ``parent`` (a `ProcessPoolExecutor` initializer)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above: nobody owns this worker
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)  # no cleanup, no last write: the cell resumes from its last checkpoint

    threading.Thread(target=watch, name="altgrad-parent-watch", daemon=True).start()


@contextlib.contextmanager
def cell_lock(runs_dir: Path, folder: str) -> Iterator[None]:
    """Hold the lock of cell ``folder`` of ``runs_dir``; `CellBusy` when another process holds it."""
    try:
        with file_lock(Path(runs_dir) / LOCKS / f"{folder}.lock", blocking=False):
            yield
    except Locked as holder:
        raise CellBusy(f"{folder} is being trained by {holder}") from None
