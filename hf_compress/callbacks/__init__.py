"""Thin drivers: Trainer callbacks that advance the technique packages at Trainer events (never import trainers/)."""

from ._logs import report_to_integrations
from .clustering import ClusteringCallback  # clustering

__all__ = ["ClusteringCallback", "report_to_integrations"]

from .lowrank import LowRankCallback  # noqa: E402  # lowrank

__all__ += ["LowRankCallback"]  # lowrank
