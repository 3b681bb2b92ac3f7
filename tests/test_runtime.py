"""Thread settings for shared machines (altgrad/runtime.py)."""

import os

from altgrad import runtime


def test_usable_cpus_is_the_affinity_capped_by_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    assert runtime.usable_cpus() == 4
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 1.5)  # SLURM --cpus-per-task=1.5 or a container quota
    assert runtime.usable_cpus() == 1
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 0.2)
    assert runtime.usable_cpus() == 1


def test_configure_sets_what_the_user_did_not(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 3)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "ALTGRAD_OMP"):
        monkeypatch.delenv(key, raising=False)
    runtime.configure_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3" and "OMP_WAIT_POLICY" not in os.environ  # spinning: measured
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    runtime.configure_threads()
    assert os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("ALTGRAD_OMP", "off")
    runtime.configure_threads()
    assert "OMP_NUM_THREADS" not in os.environ
