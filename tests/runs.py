"""Helpers for tests that train tiny runs."""

from altgrad.training import resolve_config


def tiny_config(tmp_path, data, **overrides):
    """The tiny preset on the test corpus, on CPU, under tmp_path/runs (overrides on top)."""
    values = dict(preset="tiny", data=str(data), runs_dir=str(tmp_path / "runs"), device="cpu")
    values.update(overrides)
    return resolve_config(None, values)


def without_rates(records):
    """Everything in the metrics but wall-clock rates: what must repeat exactly."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
