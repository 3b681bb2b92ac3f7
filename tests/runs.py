"""Helpers for tests that train tiny runs."""

from altgrad.training import resolve_config


def tiny_config(tmp_path, data, **overrides):
    """The tiny preset on the test corpus, on CPU, under tmp_path/runs (overrides on top)."""
    values = dict(preset="tiny", data=str(data), runs_dir=str(tmp_path / "runs"), device="cpu")
    values.update(overrides)
    return resolve_config(None, values)


def without_rates(records):
    """Everything in the metrics but what follows the machine's load (rates, the thread count):
    what must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "threads")} for r in records]
