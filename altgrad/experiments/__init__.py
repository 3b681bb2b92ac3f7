"""Experiments over finished runs: comparison with verdicts, plots."""
