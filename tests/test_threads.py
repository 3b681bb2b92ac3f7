"""The thread governor (training/threads.py) on a simulated machine, and a run whose thread count
changes mid-run against one whose count stays fixed."""

import pytest
import torch

from altgrad.training import Trainer
from altgrad.training import trainer as trainer_module
from altgrad.model.layernorm import LayerNorm
from altgrad.training.threads import ThreadGovernor, thread_dependence
from altgrad.training.tracking import read_metrics
from runs import tiny_config, without_rates


class Machine:
    """A process on a simulated machine: for each thread count, the steps per second it runs and
    the CPUs it gets (``busy`` tables apply while another process runs)."""

    def __init__(self, quiet: dict[int, tuple[float, float]], busy: dict[int, tuple[float, float]] | None = None):
        self.quiet, self.busy_table, self.busy = quiet, busy, busy is not None
        self.wall = self.cpu = 0.0
        self.set_calls: list[int] = []

    def governor(self, threads: int, **options) -> ThreadGovernor:
        self.threads = threads
        return ThreadGovernor(threads, clock=lambda: self.wall, cpu_clock=lambda: self.cpu,
                              set_threads=self._set, **options)

    def _set(self, threads: int) -> None:
        self.set_calls.append(threads)
        self.threads = threads

    def run(self, governor: ThreadGovernor, seconds: float) -> None:
        end = self.wall + seconds
        while self.wall < end:
            rate, cpus = (self.busy_table if self.busy else self.quiet)[self.threads]
            with governor.timing():
                self.wall += 1 / rate
                self.cpu += cpus / rate
            assert governor.threads == self.threads


TWO_CORES_QUIET = {2: (24.0, 1.99), 1: (14.5, 1.0)}  # measured on the 2-core machine (small preset, BF16)
TWO_CORES_BUSY = {2: (6.5, 1.28), 1: (14.4, 0.99)}  # beside `python3 -c "while True: pass"`


def test_a_quiet_machine_never_changes_the_count():
    machine = Machine(TWO_CORES_QUIET)
    governor = machine.governor(2)
    machine.run(governor, 600)
    assert machine.set_calls == [] and governor.take_events() == [] and governor.summary()["thread_changes"] == 0


def test_a_busy_machine_gets_fewer_threads_and_the_full_count_returns_when_it_is_quiet():
    machine = Machine(TWO_CORES_QUIET, TWO_CORES_BUSY)
    governor = machine.governor(2)
    machine.run(governor, 7)  # warm-up, a window short of CPUs, a trial window at 1 thread
    events = governor.take_events()
    assert machine.threads == 1 and [(e["from"], e["to"]) for e in events] == [(2, 1)]
    assert "1.28 CPUs for 2 threads" in events[0]["reason"]
    machine.run(governor, 200)  # probes of 2 threads fail while busy: after 30 s, then after 60 s more
    assert machine.threads == 1 and governor.take_events() == []
    assert machine.set_calls == [1, 2, 1, 2, 1] and governor.probe_s == 120
    machine.busy = False
    machine.run(governor, 300)  # the next probe finds the machine quiet and keeps 2 threads
    assert machine.threads == 2 and [(e["from"], e["to"]) for e in governor.take_events()] == [(1, 2)]
    assert governor.probe_s == 30 and governor.summary() == {"threads": 2, "threads_at_start": 2,
                                                             "thread_changes": 2, "fewest_threads": 1}


def test_a_slower_trial_is_undone_and_retried_ever_later():
    # short of CPUs (Python-bound stretches where the threads sleep), yet fewer threads run slower
    machine = Machine({2: (24.0, 1.4), 1: (14.5, 1.0)})
    governor = machine.governor(2)
    machine.run(governor, 110)
    assert machine.threads == 2 and governor.take_events() == []
    # trials after the warm-up, then after 30 s and 60 s of waiting (each from the failed trial)
    assert machine.set_calls == [1, 2, 1, 2, 1, 2] and governor.retry_s == 120


def test_many_cores_step_down_to_the_cpus_received():
    machine = Machine({16: (10.0, 16.0), 13: (9.0, 13.0)}, busy={16: (6.0, 12.8), 13: (8.5, 12.9)})
    governor = machine.governor(16)
    machine.run(governor, 7)
    assert machine.threads == 13 and [(e["from"], e["to"]) for e in governor.take_events()] == [(16, 13)]


def test_windows_need_time_and_steps():
    machine = Machine(TWO_CORES_QUIET, TWO_CORES_BUSY)
    governor = machine.governor(2, window_s=2.0, min_steps=50)
    machine.run(governor, 14)  # the warm-up window closes after 50 steps (7.7 s), the next not yet
    assert machine.set_calls == []
    machine.run(governor, 2)
    assert machine.set_calls == [1]


def test_a_slow_warm_up_is_not_a_reference():
    """First steps (lazy set-up) run slowly and on one core: no trial is judged against them."""
    machine = Machine(TWO_CORES_QUIET)
    governor = machine.governor(2)
    for _ in range(3):  # three slow single-core steps: the warm-up window
        with governor.timing():
            machine.wall += 0.7
            machine.cpu += 0.7
    machine.run(governor, 100)
    assert machine.set_calls == [] and governor.take_events() == []


def test_one_thread_has_nothing_to_give_up():
    machine = Machine({1: (14.5, 1.0)}, busy={1: (7.0, 0.5)})
    governor = machine.governor(1)
    machine.run(governor, 100)
    assert machine.set_calls == []


@pytest.mark.parametrize("settings", [
    dict(format="E4M3", rounding="stochastic", optimizer="manifold"),
    dict(),  # the BF16 baseline: no format absorbs a LayerNorm gradient's last bits
], ids=["E4M3-manifold", "bf16"])
def test_a_run_whose_threads_change_mid_run_equals_a_fixed_one(tmp_path, tiny_data, monkeypatch, settings):
    """The thread count changes the speed, not the run: every step alternates 1 and 2 threads
    (tensors large enough for the GEMMs, the LayerNorm sums and the native casts to split their
    work)."""
    settings = dict(settings, batch_size=32, n_embd=64, max_steps=12, eval_interval=6, stats_interval=3)
    threads = torch.get_num_threads()
    fixed = Trainer(tiny_config(tmp_path, tiny_data, run_name="fixed", adapt_threads=False, **settings)).run()

    class Alternating(ThreadGovernor):
        def _decide(self, window):
            self._apply(1 if self.threads > 1 else 2)
            self._event(3 - self.threads, self.threads, "test", 0.0, 0.0)

    monkeypatch.setattr(trainer_module, "ThreadGovernor",
                        lambda active: Alternating(2, active=active, window_s=0.0, min_steps=1))
    try:
        changing = Trainer(tiny_config(tmp_path, tiny_data, run_name="changing", **settings)).run()
    finally:
        torch.set_num_threads(threads)
    records = read_metrics(changing.run_dir)
    assert {r["threads"] for r in records if "threads" in r} == {1, 2}
    assert changing.throughput["thread_changes"] == 11  # every step but the first (the warm-up)
    reference = without_rates(read_metrics(fixed.run_dir))
    # signal-to-noise ratios and the step sizes' norms sum in parallel (in another order with other
    # threads): equal to float precision; everything the run computes is equal bit for bit
    parallel_sums = ("snr_db", "rel_update_", "decay_applied")
    for record, expected in zip(without_rates(records), reference, strict=True):
        assert record.keys() == expected.keys()
        for key, value in record.items():
            if any(part in key for part in parallel_sums):
                assert value == pytest.approx(expected[key], rel=1e-9, nan_ok=True), (record["step"], key)
            else:
                assert value == expected[key], (record["step"], key)
    assert any("snr_db" in key for key in reference[1]) == bool(settings.get("format"))  # compared, when measured


def test_an_inactive_governor_leaves_the_count_alone():  # --fixed-threads, CUDA
    machine = Machine(TWO_CORES_QUIET, TWO_CORES_BUSY)
    governor = machine.governor(2, active=False)
    machine.run(governor, 100)
    assert machine.set_calls == [] and governor.summary() == {}


# ---- the thread count never changes a run -------------------------------------------------------
def _layer_norm_grads(module, threads, x, autocast=False):
    torch.set_num_threads(threads)
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, module.weight.grad, module.bias.grad if module.bias is not None else None


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gradients_are_the_same_bits_at_every_thread_count(bias):
    """PyTorch's CPU LayerNorm sums its weight and bias gradients per thread (other threads, other
    bits at 768 rows x 128: the small preset's shape); ours gives its one-thread bits at any count,
    and the count it ran at is the caller's again afterwards."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    x = torch.randn(12, 64, 128) * 3 + 1
    ours = LayerNorm(128, bias=bias)
    theirs = torch.nn.LayerNorm(128, bias=bias)
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.linspace(0.5, 1.5, 128))
            if bias:
                module.bias.copy_(torch.linspace(-0.1, 0.1, 128))
    try:
        for autocast in (False, True):
            reference = _layer_norm_grads(ours, 1, x, autocast)
            for n in (2, 3):
                assert all(a is None and b is None or torch.equal(a, b)
                           for a, b in zip(_layer_norm_grads(ours, n, x, autocast), reference)), (n, autocast)
            native = _layer_norm_grads(theirs, 1, x, autocast)  # PyTorch's at one thread: the same bits
            assert reference[0].dtype == native[0].dtype
            assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(reference, native))
        native = [_layer_norm_grads(theirs, n, x)[2] for n in (1, 2)]
        assert not torch.equal(*native)  # what this replaces: PyTorch's own differs across counts here
        _layer_norm_grads(ours, 3, x)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_thread_dependence_finds_the_first_count_that_changes_the_bits_and_restores_the_count():
    threads = torch.get_num_threads()
    calls = []

    def step():  # a constructed step whose result changes below two threads
        calls.append(torch.get_num_threads())
        return [torch.tensor([1.0, float(torch.get_num_threads() >= 2)])]
    assert thread_dependence(step, 3) == 1 and calls == [3, 2, 1]
    assert torch.get_num_threads() == threads or torch.get_num_threads() == 3
    calls.clear()
    assert thread_dependence(lambda: [torch.ones(3) * 2], 3) is None
    # a real one: an input gradient that sums over a 50k vocabulary, as a GPT-2-vocabulary output layer's
    torch.manual_seed(0)
    grad_logits, weight = torch.randn(768, 50304), torch.randn(50304, 128)

    def product():
        return [grad_logits @ weight]
    found = thread_dependence(product, 2)
    torch.set_num_threads(1)
    one = product()[0]
    torch.set_num_threads(2)
    assert (found == 1) == (not torch.equal(one, product()[0]))  # what the library does here, said exactly
    torch.set_num_threads(threads)


def test_a_run_whose_step_depends_on_the_count_fixes_it_and_says_so(tmp_path, tiny_data, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(trainer_module, "thread_dependence", lambda compute, full: 1)
    monkeypatch.setattr(trainer_module, "ThreadGovernor", lambda active: ThreadGovernor(2, active=active))
    try:
        result = Trainer(tiny_config(tmp_path, tiny_data, run_name="fixed", max_steps=4, eval_interval=2)).run()
    finally:
        torch.set_num_threads(threads)
    assert result.throughput["threads_fixed"].startswith("one step at 1 threads differs from 2 threads")
    assert result.throughput["threads"] == 2 and "thread_changes" not in result.throughput
