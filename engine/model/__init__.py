"""The decoder-only model, its shape arithmetic and the kernel backend switch.

Sampling: `from engine.model.generate import generate` (a package-level name would clash with the submodule).
Names load on first use; importing this package imports neither triton nor touches a GPU.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "GPT": "engine.model.gpt",
    "resolve": "engine.model.gpt",
    "padded_vocab_size": "engine.model.gpt",
    "count_params": "engine.model.gpt",
    "flops_per_token": "engine.model.gpt",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
