"""Errors about checkpoints."""

from __future__ import annotations

from classification.errors import ApplianceError


class CheckpointError(ApplianceError):
    """A checkpoint directory, config or shard that cannot be used as it is."""
