"""Training: config and presets, the trainer, checkpoints and tracking."""

from .config import PRESETS, TrainConfig, resolve_config
from .trainer import Trainer, TrainResult, learning_rate, resume_config, run_directory

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "Trainer", "learning_rate", "resolve_config",
           "resume_config", "run_directory"]
