"""Megatron-style parallelism as explicit layers over one process-group grid (`engine.parallel.state`).

Names load on first use; importing this package starts no process group.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "initialize": "engine.parallel.state",
    "ColumnParallelLinear": "engine.parallel.tensor",
    "RowParallelLinear": "engine.parallel.tensor",
    "VocabParallelEmbedding": "engine.parallel.tensor",
    "vocab_parallel_cross_entropy": "engine.parallel.tensor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
