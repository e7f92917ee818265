"""Checkpoints: atomic saves with a `latest` pointer, keep-K pruning, resume resolution."""

from sessa_scale.checkpoint.manager import CheckpointManager, find_checkpoint, read_meta
from sessa_scale.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointManager", "capture_rng_state", "find_checkpoint", "read_meta", "restore_rng_state"]
