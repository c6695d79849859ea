"""Megatron-style parallelism applied to a plain model from outside (`parallelize_gpt`), its layers, and the layout
(`ParallelDims`; `engine.parallel.state` keeps a default grid for embedders).

Names load on first use; importing this package starts no process group.
"""

from engine._lazy import lazy_exports

_STATE = [
    "init_process_group",
    "initialize",
    "destroy",
    "is_initialized",
    "build_grid",
    "LayoutError",
    "get_group",
    "get_group_ranks",
    "get_rank_in",
    "get_world_size_of",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_world_size",
    "get_dp_group",
    "get_dp_rank",
    "get_dp_world_size",
    "get_model_parallel_group",
]
_TENSOR = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ReplicatedKVLinear",
    "vocab_parallel_cross_entropy",
    "parallel_lm_logits",
    "enter_tp_region",
    "check_tp_divisibility",
    "gather_full",
    "shard_full_",
]
_SEQUENCE = ["allreduce_grads", "SequenceShardedPositionEmbedding"]
_GRADS = ["finish_tp_grads", "norm_parameters"]
_RANDOM = ["RNGStatesTracker", "maybe_fork", "recompute_context_fn", "rng_tracker_of"]
_PARALLELIZE = [
    "parallelize_gpt",
    "apply_tensor_parallel",
    "apply_recompute",
    "materialize_and_init",
    "apply_data_parallel",
    "check_tensor_parallel",
    "TP_PLAN",
]
_EXPORTS = {
    **{name: "engine.parallel.state" for name in _STATE},
    **{name: "engine.parallel.tensor" for name in _TENSOR},
    **{name: "engine.parallel.sequence" for name in _SEQUENCE},
    **{name: "engine.parallel.grads" for name in _GRADS},
    **{name: "engine.parallel.rng" for name in _RANDOM},
    **{name: "engine.parallel.parallelize" for name in _PARALLELIZE},
    "ParallelDims": "engine.parallel.dims",
    "ParamSharding": "engine.parallel.sharding",
    "ShardingRegistry": "engine.parallel.sharding",
    "sharding_of": "engine.parallel.sharding",
    "VocabParallelOutputHead": "engine.parallel.output",
    "count_collectives": "engine.parallel.comm_count",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
