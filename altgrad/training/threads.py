"""CPU threads that follow the CPUs a run really gets, so a shared machine slows it, not stalls it.

OpenMP threads wait for each other at the end of every parallel region by spinning. When another
process takes one of the cores, the thread that lost its core holds up the others, which spin for
it: on a 2-core machine beside one busy process, a small-preset step ran at 27% of its quiet speed
with 2 threads, and at 59% with 1 (measured; ``benchmarks/bench_contention.py`` for whole runs). Passive waiting avoids
the collapse but costs the quiet run about 30%, so the threads keep spinning and their number
follows the machine instead:

- the governor times training steps only (evaluation and checkpoints are left out) in windows of
  at least ``window_s`` seconds (the first window, which holds the warm-up, is not judged), and
  measures the CPUs the process got in each: its CPU time over the wall time (spinning threads
  count, so a quiet machine gives about the thread count);
- when the process got at least half a CPU less than it has threads, it tries that many threads
  (rounded, at least one) for one window and keeps them unless the step rate fell by more than
  3%; otherwise it returns to the former count and waits longer before trying again;
- with fewer threads than it started with, it tries the full count again after ``probe_s``
  seconds, keeps it if the step rate rose by more than 3%, and else doubles the wait (to at most
  ``max_probe_s``).

On a quiet machine nothing changes (no window is short of CPUs, so no trial ever runs). Every
change is an event the trainer shows and logs. An inactive governor (``active=False``) times
nothing and never changes the count. On CUDA, and with ``adapt_threads: false``, the count
stays as set.

**The thread count never changes a run.** Before its first step a run with more than one thread
computes one step of its own shapes at every count the governor could choose
(`thread_dependence`); when any gives other bits (a reduction that sums per thread: a 50k-token
vocabulary's output layer, whose input gradient sums over the vocabulary), the governor stays
off and the count fixed, and the run says so. The presets on byte-level data are invariant
(LayerNorm's per-thread gradient sums replaced: `model/layernorm.py`; tested: a run whose
threads change every step equals a fixed one, bit for bit, in BF16 and in FP8 formats).
Monitoring statistics that sum in parallel may differ in their last bits; they never feed back
into training.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

SHORT_CPUS = 0.5  # the process got at least this many CPUs fewer than it has threads
TOLERANCE = 0.03  # a step-rate difference smaller than this is noise


@dataclass
class Window:
    steps: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.steps / self.wall if self.wall > 0 else 0.0

    @property
    def cpus(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


class ThreadGovernor:
    def __init__(self, threads: int | None = None, active: bool = True, window_s: float = 2.0, min_steps: int = 3,
                 probe_s: float = 30.0, max_probe_s: float = 480.0,
                 clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = time.process_time,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.active = active
        self.full = threads or torch.get_num_threads()
        self.threads = self.full
        self.window_s, self.min_steps = window_s, min_steps
        self.first_probe_s, self.max_probe_s = probe_s, max_probe_s
        self.probe_s = probe_s  # the wait before the next probe up to the full count
        self.retry_s = 0.0  # the wait before a trial down: none until one has failed
        self.clock, self.cpu_clock, self._set = clock, cpu_clock, set_threads
        self.window = Window()
        self.warm = False  # the first window (lazy set-up, first-touch memory) is not judged
        self.trial: tuple[int, float, str] | None = None  # (threads before, their step rate, why)
        self.since = clock()  # the last change of the thread count or failed trial
        self.events: list[dict] = []  # changes not yet taken by the trainer
        self.changes = 0
        self.fewest = self.full
        self.fixed: str | None = None  # why the count was fixed after all (`fix`)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Time one training step."""
        if not self.active:
            yield
            return
        wall, cpu = self.clock(), self.cpu_clock()
        yield
        self.window.steps += 1
        self.window.wall += self.clock() - wall
        self.window.cpu += self.cpu_clock() - cpu
        if self.window.wall >= self.window_s and self.window.steps >= self.min_steps:
            if self.warm:
                self._decide(self.window)
            self.warm = True
            self.window = Window()

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def _decide(self, window: Window) -> None:
        now = self.clock()
        if self.trial is not None:
            before, rate, reason = self.trial
            self.trial = None
            down = self.threads < before
            kept = window.rate >= rate * (1 - TOLERANCE) if down else window.rate > rate * (1 + TOLERANCE)
            if kept:
                self.probe_s, self.retry_s = self.first_probe_s, 0.0
                self._event(before, self.threads, reason, rate, window.rate)
            else:
                self._apply(before)
                if down:
                    self.retry_s = min(max(2 * self.retry_s, self.first_probe_s), self.max_probe_s)
                else:
                    self.probe_s = min(2 * self.probe_s, self.max_probe_s)
            self.since = now
            return
        waited = now - self.since
        if self.threads > 1 and window.cpus < self.threads - SHORT_CPUS and waited >= self.retry_s:
            target = max(1, min(self.threads - 1, round(window.cpus)))
            self._start_trial(target, window, f"the process got {window.cpus:.2f} CPUs for {self.threads} threads")
        elif self.threads < self.full and waited >= self.probe_s:
            self._start_trial(self.full, window, f"{self.full} threads ran faster again after {waited:.0f} s")

    def _start_trial(self, threads: int, window: Window, reason: str) -> None:
        self.trial = (self.threads, window.rate, reason)
        self._apply(threads)

    def _apply(self, threads: int) -> None:
        self.threads = threads
        self._set(threads)

    def _event(self, before: int, after: int, reason: str, rate_before: float, rate_after: float) -> None:
        self.changes += 1
        self.fewest = min(self.fewest, after)
        self.events.append({"from": before, "to": after, "reason": reason,
                            "steps_per_s": [round(rate_before, 3), round(rate_after, 3)]})

    def fix(self, reason: str) -> None:
        """Keep the count as it is from now on (``reason``: why; the summary says it)."""
        self.active, self.fixed = False, reason

    def summary(self) -> dict[str, Any]:
        if not self.active:
            return {"threads": self.full, "threads_fixed": self.fixed} if self.fixed else {}
        return {"threads": self.threads, "threads_at_start": self.full, "thread_changes": self.changes,
                "fewest_threads": self.fewest}


def thread_dependence(compute: Callable[[], list[torch.Tensor]], full: int,
                      set_threads: Callable[[int], None] = torch.set_num_threads) -> int | None:
    """The first thread count below ``full`` at which ``compute`` (one training step's results:
    loss, gradients, their norm) gives other bits than at ``full``; None when none does.

    The order of a reduction follows the shapes and the thread count, not the values, so one
    step of the run's own shapes shows whether another count would change the run (a different
    order gives equal bits for every one of thousands of random sums essentially never).
    ``compute`` must leave the run's state as it found it; the count is ``full`` again after.
    """
    try:
        set_threads(full)
        reference = [t.detach().clone() for t in compute()]
        for threads in range(full - 1, 0, -1):
            set_threads(threads)
            results = compute()
            if len(results) != len(reference) or not all(
                    torch.equal(a, b) for a, b in zip(results, reference, strict=True)):
                return threads
        return None
    finally:
        set_threads(full)
