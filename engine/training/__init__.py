"""The trainer's parts: the step, precision, the resume policy and training state, the sample stream, evaluation,
config checks and the dry run. `engine.train` wires them together.

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "TrainStep": "engine.training.step",
    "StepResult": "engine.training.step",
    "SampleStream": "engine.training.samples",
    "load_data_sources": "engine.training.samples",
    "micro_batches": "engine.training.samples",
    "evaluate": "engine.training.evaluate",
    "dry_run": "engine.training.dry_run",
    "TrainError": "engine.training.validate",
    "batch_layout": "engine.training.validate",
    "check_config": "engine.training.validate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
