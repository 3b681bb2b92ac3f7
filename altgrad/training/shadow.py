"""The FP32 shadow: how far are simulated-low-precision gradients from FP32 ones?

Every ``shadow_interval`` steps an unquantized FP32 copy of the model, holding the same
current (master) weights, computes gradients on the same micro-batches with the same dropout
masks (the RNG state of the main step is replayed in a fork). It never touches the main
model, its gradients or the global RNG, so the training trajectory is unchanged.

Logged per Linear layer (by its module name; ``lm_head`` is tied to the token embedding):
``grad_cos_sim/<layer>`` and ``grad_rel_err/<layer>`` = |g - g32| / |g32|, plus their means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GPT, GPTConfig
from .checkpoint import restore_rng


class GradientShadow:
    def __init__(self, model_config: GPTConfig, device: torch.device):
        with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG
            self.model = GPT(model_config).to(device)
        self.device = device

    def compare(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], grad_accum: int,
                rng_state: dict[str, Any], average: Callable[[list[torch.Tensor]], None] | None = None
                ) -> dict[str, float]:
        """Gradient agreement between ``model`` (gradients already computed) and the FP32 shadow.

        Under data parallelism ``average`` averages the shadow's gradients over the processes, as
        DDP did the model's, so both are the gradients of the whole batch."""
        shadow = self.model
        with torch.no_grad():
            for mine, theirs in zip(shadow.parameters(), model.parameters(), strict=True):
                mine.copy_(theirs)
        shadow.train(model.training)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            restore_rng(rng_state)
            for x, y in batches:
                _, loss = shadow(x, y)
                (loss / grad_accum).backward()
        if average is not None:
            average([p.grad for p in shadow.parameters() if p.grad is not None])
        metrics: dict[str, float] = {}
        cosines, errors = [], []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or module.weight.grad is None:
                continue
            low = module.weight.grad.detach().float().flatten()
            full = shadow.get_submodule(name).weight.grad.flatten()
            cosine = float(F.cosine_similarity(low, full, dim=0))
            norm = float(full.norm())
            error = float((low - full).norm()) / norm if norm > 0 else math.inf
            metrics[f"grad_cos_sim/{name}"], metrics[f"grad_rel_err/{name}"] = cosine, error
            cosines.append(cosine)
            errors.append(error)
        shadow.zero_grad(set_to_none=True)
        if cosines:
            metrics["grad_cos_sim/mean"] = sum(cosines) / len(cosines)
            metrics["grad_rel_err/mean"] = sum(errors) / len(errors)
        return metrics
