"""Monitors: objects behind one protocol (`base.Monitor`) that the trainer calls around a step."""

from .alerts import Thresholds
from .base import BaseMonitor, Monitor, StepContext, layer_mean, ratio
from .quant import QuantStatsMonitor, summarize_stats
from .rank import RankMonitor
from .shadow import ShadowMonitor
from .updates import UpdateMonitor

__all__ = ["BaseMonitor", "Monitor", "QuantStatsMonitor", "RankMonitor", "ShadowMonitor", "StepContext", "Thresholds",
           "UpdateMonitor", "layer_mean", "ratio", "summarize_stats"]
