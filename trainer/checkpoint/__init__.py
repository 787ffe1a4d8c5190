"""Device-neutral checkpoints: DCP tensors on CPU, a checksummed JSON manifest, atomic commit."""

from trainer.checkpoint.manager import CheckpointManager, Restored, TrainingProgress
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.store import CheckpointStore

__all__ = ["CheckpointManager", "CheckpointStore", "Manifest", "Restored", "TrainingProgress"]
