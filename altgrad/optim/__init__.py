"""Weights on a format's grid and the optimizers that move them (DESIGN §4)."""

from .adamw import StoredAdamW
from .base import GRID_LR_UNITS, StepRecord, StepRecorder, lr_unit_factor, plain_record
from .eco import EcoAdamW
from .factory import OPTIMIZERS, OptimizerSpec, build_optimizer, format_weights, set_learning_rates
from .grid import GRID_DIRECTIONS, GridOptim, StepCounts
from .manifold import ManifoldAdamW
from .memory import PARTS as MEMORY_PARTS
from .memory import StateBits, state_bits
from .storage import COMPENSATION_DTYPES, COMPENSATIONS, FormatWeight

__all__ = [
    "COMPENSATIONS",
    "COMPENSATION_DTYPES",
    "EcoAdamW",
    "GRID_DIRECTIONS",
    "GRID_LR_UNITS",
    "OPTIMIZERS",
    "FormatWeight",
    "GridOptim",
    "MEMORY_PARTS",
    "ManifoldAdamW",
    "OptimizerSpec",
    "StepCounts",
    "StepRecord",
    "StateBits",
    "StepRecorder",
    "StoredAdamW",
    "build_optimizer",
    "format_weights",
    "lr_unit_factor",
    "plain_record",
    "set_learning_rates",
    "state_bits",
]
