"""Thin drivers: Trainer callbacks that advance the technique packages at Trainer events (never import trainers/)."""

from ._logs import report_to_integrations

__all__ = ["report_to_integrations"]

from .lowrank import LowRankCallback  # noqa: E402  # lowrank

__all__ += ["LowRankCallback"]  # lowrank
