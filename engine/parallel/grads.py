"""Gradient bookkeeping a training loop does for a tensor-parallel model, after backward and before the step.

Under tp (Shoeybi et al. 2019) most gradients are already complete on each rank: a sharded parameter's gradient is
its shard of the full gradient, and a replicated parameter outside the sequence-parallel regions gets the same full
gradient on every tp rank. Two kinds are per-rank partial sums and must be summed over tp: parameters applied to
sequence shards under SP (norms, row-parallel biases, learned positions; Korthikanti et al. 2022, sec. 4.2.2) and
GQA kv projections replicated over more tp ranks than kv heads (`ReplicatedKVLinear`). `finish_tp_grads` does that.

The global gradient norm then sums squares over the model-parallel group, counting every element once: a rank
counts its shards of sharded parameters, and tp-replicated parameters only on tp rank 0 (`norm_parameters`), e.g.

    engine.optim.clip.clip_grad_norm(model.parameters(), max_norm, group=state.get_model_parallel_group(),
                                     norm_parameters=norm_parameters(model))
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from engine.parallel.random import is_sharded
from engine.parallel.sequence import allreduce_sequence_parallel_grads


def model_tp_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The tp group a model was built with (`GPT.tp_group`, looked up through a DDP/FSDP `.module` wrapper), or None."""
    while not hasattr(model, "tp_group") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "tp_group", None)


def finish_tp_grads(model: nn.Module, tp_group: dist.ProcessGroup | None = None) -> int:
    """Sums over tp the gradients that are per-rank partial sums (see module docstring); one all-reduce per dtype.

    Call once per optimizer step after the last backward (the sum is linear, so before or after the dp reduction),
    before clipping and the step. `tp_group` defaults to the model's; without tp it does nothing. Returns the
    number of gradients reduced.
    """
    group = tp_group if tp_group is not None else model_tp_group(model)
    if group is None or dist.get_world_size(group) == 1:
        return 0
    return allreduce_sequence_parallel_grads(model, group)


def norm_parameters(model: nn.Module, tp_group: dist.ProcessGroup | None = None) -> list[nn.Parameter]:
    """The parameters this rank counts in a global gradient norm: every one without tp; with tp, the sharded ones
    (this rank's slice) and, on tp rank 0 only, the replicated ones. Shared parameters once."""
    group = tp_group if tp_group is not None else model_tp_group(model)
    params = list(model.parameters())  # deduplicated (a tied embedding is one parameter)
    if group is None or dist.get_world_size(group) == 1 or dist.get_rank(group) == 0:
        return params
    return [p for p in params if is_sharded(p)]
