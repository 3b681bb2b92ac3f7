"""Training: config and presets, the trainer, checkpoints and tracking."""

from .config import PRESETS, TrainConfig, resolve_config
from .setup import learning_rate, resume_config, run_directory
from .trainer import Trainer, TrainResult

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "Trainer", "learning_rate", "resolve_config",
           "resume_config", "run_directory"]
