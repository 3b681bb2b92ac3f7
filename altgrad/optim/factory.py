"""The one place optimizers are built: from an `OptimizerSpec`, the model and its quantized layers.

Parameter groups keep the trainer's decay rule (weight decay on tensors of two or more
dimensions, none on biases and norms). Each group records its peak learning rate as
``base_lr``; the trainer multiplies it by the schedule. Weights with a format get a
`FormatWeight`; a format-stored one is projected onto its grid here, and its layer's forward
cast is told the storage scale (the cast is then the identity).

| optimizer | format weights | class |
|---|---|---|
| adamw, all master | - | ``torch.optim.AdamW`` (arm A) |
| adamw, some stored | stored on the grid, projected after each step | `StoredAdamW` (arms B, C) |
| manifold | steps in ULPs (stored or master) | `ManifoldAdamW` (arm D; on masters: manifold-master) |
| grid | moves in codes (stored), or along the codes' positions (master) | `GridOptim` (arm E; grid-master) |
| eco | stored; the rounding error fed back into Adam's first moment | `EcoAdamW` (ECO) |

``compensation: kahan`` gives every stored weight a compensation buffer (`FormatWeight.store`):
with adamw the arm C-kahan, with manifold and grid the geometry arms' compensated twins.

``grid_lr_unit`` (``ulp`` | ``binade``) sets what the geometry optimizers' ``grid_lr`` counts,
per weight from its current format (`base.lr_unit_factor`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..model.surgery import quantized_layers
from .adamw import StoredAdamW
from .base import GRID_LR_UNITS
from .eco import EcoAdamW
from .grid import GRID_DIRECTIONS, GridOptim
from .manifold import ManifoldAdamW
from .storage import COMPENSATION_DTYPES, COMPENSATIONS, FormatWeight

OPTIMIZERS = ("adamw", "manifold", "grid", "eco")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-3  # absolute: AdamW, and every parameter without a format
    grid_lr: float = 0.5  # ULPs (manifold) or rungs (grid) per step, for weights with a format
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    max_stiffness: float | None = None  # manifold: cap on S(w), absolute
    rung_clip: int = 4  # grid: most rungs one step moves a weight
    grid_direction: str = "adam"  # grid: adam | momentum
    grid_lr_unit: str = "ulp"  # ulp: grid_lr ULPs or rungs per step | binade: grid_lr * 2^M of them (M: mantissa bits)
    compensation: str = "none"  # none | kahan: a buffer per stored weight keeps what its grid could not hold
    compensation_dtype: str = "bfloat16"  # the buffer's dtype (COMPENSATION_DTYPES)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.grid_direction not in GRID_DIRECTIONS:
            raise ValueError(f"grid_direction must be one of {', '.join(GRID_DIRECTIONS)}")
        if self.grid_lr_unit not in GRID_LR_UNITS:
            raise ValueError(f"grid_lr_unit must be one of {', '.join(GRID_LR_UNITS)}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)}")
        if self.compensation_dtype not in COMPENSATION_DTYPES:
            raise ValueError(f"compensation_dtype must be one of {', '.join(COMPENSATION_DTYPES)}")
        if self.compensation != "none" and self.name == "eco":
            raise ValueError(f"compensation {self.compensation} works with adamw, manifold and grid, not eco")

    @property
    def compensation_buffer(self) -> torch.dtype | None:
        """The dtype of a stored weight's compensation buffer, None without compensation."""
        return None if self.compensation == "none" else COMPENSATION_DTYPES[self.compensation_dtype]


def format_weights(model: nn.Module, compensation: torch.dtype | None = None) -> list[FormatWeight]:
    """A `FormatWeight` for every quantized layer's weight that has a format, in model order
    (the stored ones with a compensation buffer of that dtype, when given)."""
    weights, seen = [], set()
    for name, layer in quantized_layers(model).items():
        config = layer.config
        if config.weight is None or id(layer.weight) in seen:
            continue
        seen.add(id(layer.weight))
        stored = config.weight_storage == "format"
        weight = FormatWeight(name, layer.weight, config.weight, stored, config.update_rounding,
                              margin=config.scaling.margin, compensation=compensation if stored else None,
                              sr_bits=config.sr_bits)
        if stored:
            layer.quantizers["weight"].stored = weight
        weights.append(weight)
    return weights


def _groups(model: nn.Module, spec: OptimizerSpec, own: set[int], own_lr: float) -> list[dict]:
    """torch's AdamW groups (decay on >= 2-D tensors), and the format weights the optimizer
    steps itself (``geometry``), with their own peak learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in params if id(p) not in own]
    groups = [
        {"params": [p for p in plain if p.dim() >= 2], "weight_decay": spec.weight_decay, "lr": spec.lr},
        {"params": [p for p in plain if p.dim() < 2], "weight_decay": 0.0, "lr": spec.lr},
        {"params": [p for p in params if id(p) in own], "weight_decay": spec.weight_decay, "lr": own_lr,
         "geometry": True},
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["base_lr"] = group["lr"]
    return groups


def build_optimizer(model: nn.Module, spec: OptimizerSpec, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer of one run (see the module table). Call after model surgery."""
    weights = format_weights(model, spec.compensation_buffer)
    adamw = dict(betas=spec.betas, eps=spec.eps, foreach=True)
    if spec.name in ("manifold", "grid") and not weights:
        kind = {"manifold": "ManifoldAdamW", "grid": "GridOptim"}[spec.name]
        raise ValueError(f"{kind} needs layers with a weight format (use --format or a policy)")
    stored = [w for w in weights if w.stored]
    if spec.name == "eco" and not stored:
        raise ValueError("ECO needs weights stored in their format (weight_storage: format)")
    if spec.name in ("adamw", "eco"):  # AdamW steps the stored weights, in absolute units; masters are torch's
        groups = _groups(model, spec, {id(w.param) for w in stored}, spec.lr)
    else:
        groups = _groups(model, spec, {id(w.param) for w in weights}, spec.grid_lr)
    generator_seed = (seed * 1_000_003 + zlib.crc32(b"altgrad.optim")) % 2**62
    if spec.name == "manifold":
        return ManifoldAdamW(groups, weights, generator_seed, max_stiffness=spec.max_stiffness,
                             lr_unit=spec.grid_lr_unit, **adamw)
    if spec.name == "grid":
        return GridOptim(groups, weights, generator_seed, rung_clip=spec.rung_clip,
                         grid_direction=spec.grid_direction, lr_unit=spec.grid_lr_unit, **adamw)
    if spec.name == "eco":
        return EcoAdamW(groups, stored, generator_seed, **adamw)
    if stored:
        return StoredAdamW(groups, stored, generator_seed, **adamw)
    return torch.optim.AdamW(groups, **adamw)


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate at ``factor`` (the schedule, peak 1) of its own peak ``base_lr``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
