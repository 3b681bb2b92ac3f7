"""Threads that behave on a shared machine, set before PyTorch loads (from ``altgrad/__init__``).

Measured on a 2-core machine (issue 8): beside one competing CPU-bound process, training ran
10-18x slower, because the OpenMP threads of torch and of the native kernel spin-wait for a
thread the scheduler has taken away. So, unless the user set them:

- ``OMP_NUM_THREADS`` = the CPUs this process may really use: its affinity mask, capped by a
  cgroup CPU quota (SLURM, containers), where the visible core count can be larger;
- ``OMP_WAIT_POLICY=PASSIVE``: a waiting OpenMP thread sleeps instead of spinning.

``ALTGRAD_OMP=off`` leaves the environment alone. `benchmarks/bench_contention.py` measures
both settings, quiet and beside a competing process.
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
    """Set the OpenMP environment (see the module doc) unless the user did or ``ALTGRAD_OMP=off``."""
    if os.environ.get("ALTGRAD_OMP", "").lower() == "off":
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
