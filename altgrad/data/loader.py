"""Deterministic batches from prepared token files (nanoGPT layout: uint16 ids in .bin).

A training batch is a pure function of (seed, step, micro-step): runs with the same seed see
the same batches whatever their precision or format (so they are paired), and a resumed run
needs no loader state beyond the step. The validation set is fixed: the same windows for
every run and every seed, so validation losses are comparable across runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

VALIDATION_SEED = 0xE0A1  # fixed across runs: the validation windows never depend on the run's seed


class TokenBatches:
    """Random windows of ``block_size + 1`` tokens from ``train.bin`` / ``val.bin``."""

    def __init__(self, data_dir: Path, block_size: int, batch_size: int, seed: int, device: torch.device):
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.splits = {split: self._open(Path(data_dir) / f"{split}.bin") for split in ("train", "val")}

    def _open(self, path: Path) -> np.ndarray:
        if not path.exists():
            raise UserError(f"{path} is missing; run `altgrad prepare-data` first")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(tokens) <= self.block_size + 1:
            raise UserError(
                f"{path} holds {len(tokens)} tokens, fewer than one window of block_size + 1 = "
                f"{self.block_size + 1}; prepare more data or lower block_size"
            )
        return tokens

    def _windows(self, split: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.splits[split]
        starts = rng.integers(0, len(tokens) - self.block_size - 1, size=self.batch_size)
        rows = np.stack([tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def train_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of optimizer step ``step`` (0-based), micro-batch ``micro_step``."""
        return self._windows("train", np.random.default_rng([self.seed, step, micro_step]))

    def val_batches(self, count: int):
        """The fixed validation set: ``count`` batches, identical for every run."""
        for index in range(count):
            yield self._windows("val", np.random.default_rng([VALIDATION_SEED, index]))
