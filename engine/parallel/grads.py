"""Gradient bookkeeping a training loop does for a tensor-parallel model, after backward and before the step.

Under tp (Shoeybi et al. 2019) most gradients are already complete on each rank: a sharded parameter's gradient is
its shard of the full gradient, and a replicated parameter outside the sequence-parallel regions gets the same full
gradient on every tp rank. Two kinds are per-rank partial sums and must be summed over tp: parameters applied to
sequence shards under SP (norms, row-parallel biases, learned positions; Korthikanti et al. 2022, sec. 4.2.2) and
GQA kv projections replicated over more tp ranks than kv heads (`ReplicatedKVLinear`). The sharding registry
(sharding.py) flags both; `finish_tp_grads` sums them.

The global gradient norm then sums squares over the model-parallel group, counting every element once: a rank
counts its shards of sharded parameters, and tp-replicated parameters only on tp rank 0 (`norm_parameters`), e.g.

    clip_grad_norm(params, max_norm, group=model_parallel_group, norm_parameters=norm_parameters(model))
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from engine.parallel.sequence import allreduce_grads
from engine.parallel.sharding import ShardingRegistry, collect_sharding, sharding_of


def _registry(model: nn.Module, sharding: ShardingRegistry | None, tp_group) -> ShardingRegistry:
    """`sharding`, else the one parallelize_gpt attached, else one collected from the parallel layers' own
    `param_shardings()` (layers used on their own in another model)."""
    if sharding is not None:
        return sharding
    reg = sharding_of(model)
    return reg if reg.attached else collect_sharding(model, tp_group=tp_group)


def finish_tp_grads(
    model: nn.Module, tp_group: dist.ProcessGroup | None = None, sharding: ShardingRegistry | None = None
) -> int:
    """Sums over tp the gradients that are per-rank partial sums (see module docstring); one all-reduce per dtype.

    Call once per optimizer step after the last backward (the sum is linear, so before or after the dp reduction),
    before clipping and the step. `sharding` defaults to the registry `parallelize_gpt` attached to the model and
    `tp_group` to the registry's; without tp it does nothing. Returns the number of gradients reduced.
    """
    reg = _registry(model, sharding, tp_group)
    group = tp_group if tp_group is not None else reg.tp_group
    if group is None or dist.get_world_size(group) == 1:
        return 0
    params = [p for _, p, spec in reg.named(model) if spec is not None and spec.grad_needs_tp_sum]
    return allreduce_grads(params, group)


def norm_parameters(
    model: nn.Module, tp_group: dist.ProcessGroup | None = None, sharding: ShardingRegistry | None = None
) -> list[nn.Parameter]:
    """The parameters this rank counts in a global gradient norm: every one without tp; with tp, the sharded ones
    (this rank's slice) and, on tp rank 0 only, the replicated ones. Shared parameters once."""
    reg = _registry(model, sharding, tp_group)
    group = tp_group if tp_group is not None else reg.tp_group
    named = list(reg.named(model))
    if group is None or dist.get_world_size(group) == 1 or dist.get_rank(group) == 0:
        return [p for _, p, _ in named]
    return [p for _, p, spec in named if spec is not None and spec.sharded]
