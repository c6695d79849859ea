"""Atomic, checksummed, manifest-described checkpoints that load into any layout (format in `checkpointer.py`;
`save` and `load` for other trainers in `api.py`; `python -m engine.checkpoint` inspects, verifies, consolidates).

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "engine.checkpoint.checkpointer",
    "LoadedCheckpoint": "engine.checkpoint.reader",
    "CheckpointReader": "engine.checkpoint.reader",
    "verify_share": "engine.checkpoint.reader",
    "save_checkpoint": "engine.checkpoint.checkpointer",
    "load_checkpoint": "engine.checkpoint.reader",
    "verify_checkpoint": "engine.checkpoint.checkpointer",
    "read_manifest": "engine.checkpoint.checkpointer",
    "latest_checkpoint": "engine.checkpoint.checkpointer",
    "complete_checkpoints": "engine.checkpoint.checkpointer",
    "resolve_checkpoint_path": "engine.checkpoint.checkpointer",
    "apply_retention": "engine.checkpoint.checkpointer",
    "save": "engine.checkpoint.api",
    "load": "engine.checkpoint.api",
    "has_checkpoint": "engine.checkpoint.api",
    "AsyncSaver": "engine.checkpoint.async_saver",
    "save_training_state": "engine.checkpoint.training_state",
    "restore_training_state": "engine.checkpoint.training_state",
    "optimizer_state_to_named": "engine.checkpoint.state",
    "named_to_optimizer_state": "engine.checkpoint.state",
    "capture_rng_state": "engine.checkpoint.state",
    "restore_rng_state": "engine.checkpoint.state",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
