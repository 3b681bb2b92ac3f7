"""Model FLOPs utilisation (training/flops.py): the FLOP count, the arithmetic, the summary."""

import json

import pytest
import torch

from altgrad.model import GPT, GPTConfig
from altgrad.training import Trainer
from altgrad.training import flops
from runs import tiny_config


def test_flops_per_token_is_six_per_parameter_plus_attention():
    config = GPTConfig(vocab_size=100, block_size=64, n_layer=4, n_head=4, n_embd=128)
    params = GPT(config).num_parameters()
    assert flops.flops_per_token(config, params) == 6 * params + 12 * 4 * 64 * 128


def test_utilisation_is_achieved_over_the_peak_of_all_devices(monkeypatch):
    monkeypatch.setattr(flops, "measured_peak", lambda kind, dtype, index=0, threads=None: 1e12)
    config = GPTConfig(vocab_size=100, block_size=64, n_layer=4, n_head=4, n_embd=128)
    achieved = flops.flops_per_token(config, 1000) * 5000
    one = flops.utilisation(config, 1000, 5000, torch.device("cpu"), torch.bfloat16)
    assert one == {"mfu": achieved / 1e12, "achieved_flops": achieved, "peak_flops": 1e12}
    assert flops.utilisation(config, 1000, 5000, torch.device("cpu"), torch.bfloat16, processes=2)["mfu"] == \
        pytest.approx(achieved / 2e12)


def test_the_peak_is_measured_once_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    peak = flops.measured_peak("cpu", torch.float32)
    assert peak > 1e8 and torch.equal(torch.get_rng_state(), state)
    assert flops.measured_peak("cpu", torch.float32) == peak  # cached


def test_the_summary_reports_throughput_and_mfu(tmp_path, tiny_data):
    result = Trainer(tiny_config(tmp_path, tiny_data, max_steps=10)).run()
    summary = json.loads((result.run_dir / "summary.json").read_text())["throughput"]
    assert summary["tokens_per_s"] == pytest.approx(result.tokens / result.wall_s)
    assert 0 < summary["mfu"] < 1
    assert summary["peak_flops"] == flops.measured_peak("cpu", torch.bfloat16, 0, torch.get_num_threads())


def test_the_cpu_peak_is_that_of_the_threads_the_run_was_given(monkeypatch):
    """A run whose thread governor ended on fewer threads is measured against the peak of its full
    allotment; the process's thread count is left as it was."""
    seen = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append(torch.get_num_threads()) or mm(a, b))
    before = torch.get_num_threads()
    flops.measured_peak.cache_clear()
    torch.set_num_threads(1)  # what the governor may have left at the end of a run given 2
    try:
        flops.utilisation(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8), 100, 10.0,
                          torch.device("cpu"), torch.float32, threads=2)
        assert seen and set(seen) == {2} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        flops.measured_peak.cache_clear()
