"""Back-of-the-envelope scaling arithmetic (per-rank memory), pure Python: importing it starts nothing.

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "ActivationEstimate": "engine.scaling.memory",
    "activation_bytes_per_layer": "engine.scaling.memory",
    "estimate_activations": "engine.scaling.memory",
    "optimizer_state_bytes": "engine.scaling.memory",
    "format_bytes": "engine.scaling.memory",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
