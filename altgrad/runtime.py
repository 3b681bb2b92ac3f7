"""Threads that fit the CPUs a process may really use, set before PyTorch loads (``altgrad/__init__``).

OpenMP (torch's and the native kernel's) starts one thread per visible core. Under SLURM, in a
container or with a CPU affinity mask the visible count can exceed what the process may use, and
the surplus threads spin-wait for cores that never come. So, unless the user set it,
``OMP_NUM_THREADS`` = the process's affinity mask, capped by a cgroup CPU quota.
``ALTGRAD_OMP=off`` leaves the environment alone.

The wait policy is left to OpenMP (spinning): ``OMP_WAIT_POLICY=PASSIVE`` costs a quiet run about
30% (`benchmarks/bench_contention.py`). While training, `training/threads.py` lowers the thread
count instead when other processes take cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), None without one."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.exists():
            quota = int(v1.read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup quota; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def configure_threads() -> None:
    """Set ``OMP_NUM_THREADS`` (see the module doc) unless the user did or ``ALTGRAD_OMP=off``."""
    if os.environ.get("ALTGRAD_OMP", "").lower() == "off":
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
