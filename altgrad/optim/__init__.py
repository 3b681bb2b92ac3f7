"""Weights on a format's grid and the optimizers that move them (DESIGN §4)."""

from .adamw import StoredAdamW
from .factory import OPTIMIZERS, OptimizerSpec, build_optimizer, format_weights, set_learning_rates
from .grid import GRID_DIRECTIONS, GridOptim, StepCounts
from .manifold import ManifoldAdamW
from .storage import FormatWeight

__all__ = [
    "GRID_DIRECTIONS",
    "OPTIMIZERS",
    "FormatWeight",
    "GridOptim",
    "ManifoldAdamW",
    "OptimizerSpec",
    "StepCounts",
    "StoredAdamW",
    "build_optimizer",
    "format_weights",
    "set_learning_rates",
]
