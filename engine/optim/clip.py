"""Gradient clipping by global L2 norm (Pascanu et al. 2013), as in GPT-3/Llama training (clip 1.0)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def grad_norm(parameters: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients, as an fp32 tensor on the gradients' device.

    With `group`, the squared norms are summed over its ranks: each gradient element must then live on exactly one
    rank of the group (shards of a sharded parameter; replicated parameters passed on one rank only). DDP-wrapped
    models need no group: after backward every replica holds the same averaged gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        # foreach norms grouped by device and dtype, accumulated in fp32
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
        if hasattr(local, "full_tensor"):  # FSDP2's gradients are DTensor shards: the norm over all of them
            local = local.full_tensor()
        local = local.float()
    else:
        local = torch.zeros(())
    if group is None:
        return local
    total_sq = local.square()
    dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=group)
    return total_sq.sqrt()


def clip_grad_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    group: dist.ProcessGroup | None = None,
    norm_parameters: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scales gradients in place so their global L2 norm is at most `max_norm` (0 or less: no clipping).

    Returns the norm before clipping (a 0-dim fp32 tensor; no host sync here). The scale factor is
    min(1, max_norm / (norm + 1e-6)), as `torch.nn.utils.clip_grad_norm_`; a non-finite norm makes the gradients
    non-finite, for the caller's NaN guard to see. `norm_parameters` (default: `parameters`): the ones whose
    gradients this rank counts in the norm, when some are replicated over `group` (tensor parallelism:
    engine.parallel.grads.norm_parameters); all of `parameters` are scaled.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params if norm_parameters is None else norm_parameters, group)
    if max_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
