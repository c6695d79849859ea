"""Optimizers (AdamW, Adafactor), learning-rate schedules and gradient clipping.

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "build_optimizer": "engine.optim.build",
    "build_training_optimizer": "engine.optim.distributed",
    "DistributedOptimizer": "engine.optim.distributed",
    "param_groups": "engine.optim.build",
    "Adafactor": "engine.optim.adafactor",
    "lr_at": "engine.optim.schedules",
    "set_lr": "engine.optim.schedules",
    "clip_grad_norm": "engine.optim.clip",
    "grad_norm": "engine.optim.clip",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
