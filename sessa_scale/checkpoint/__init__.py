"""Checkpoints: atomic saves with a `latest` pointer, keep-K pruning, and finding the newest complete
checkpoint of a run (scan.py), and one model from any saved layout (merge.load_model, imported from
sessa_scale.checkpoint.merge: it builds models, which this package's other users do not need)."""

from sessa_scale.checkpoint.manager import CheckpointManager, find_checkpoint, read_meta
from sessa_scale.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointManager", "capture_rng_state", "find_checkpoint", "read_meta", "restore_rng_state"]
