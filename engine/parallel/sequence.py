"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").

Between tensor-parallel regions, activations are replicated over the tp group. Sequence parallelism shards them
along the sequence instead, so norms, dropout and residual adds run on s/t tokens per rank. Each tp all-reduce
becomes a reduce-scatter (leaving a tp region) plus an all-gather (entering one): the same bytes on a ring, since
all-reduce = reduce-scatter + all-gather, but activation memory outside the tp regions drops by t (paper sec. 4.2.2).

The projections reading a gathered input keep it for their weight gradients as this rank's shard, and all-gather it
again in the backward pass (regather.py), so that activation too is divided by t.

The collectives here are paired autograd functions: the backward of an all-gather is a reduce-scatter and vice
versa. Tensors are batch-first, (batch, seq, ...), so `seq_dim` defaults to 1 (Megatron's [s, b, h] uses 0).

Parameters outside the tp regions (norm weights, the row-parallel bias, learned positions) see only this rank's
tokens under SP, so their gradients must be summed over tp: the sharding registry flags them and
`engine.parallel.grads.finish_tp_grads` sums them after backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import state


class ShapeError(ValueError):
    """A tensor that cannot be split evenly over the group; the message is one line."""


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """`group`, or the grid's tensor-parallel group when None."""
    return state.get_tp_group() if group is None else group


# --- collectives along any dimension (no autograd); every call goes through `dist.<name>` so it can be counted ---


def _all_gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over the group into a new tensor (never in place: the input may be another node's gradient too)."""
    if dist.get_world_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenates every rank's `x` along `dim`, in rank order."""
    return all_gather_async(x, dim, group)()


def all_gather_async(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> Callable[[], torch.Tensor]:
    """Starts `all_gather(x, dim, group)` and returns the function that waits for it and gives the result."""
    n = dist.get_world_size(group)
    if n == 1:
        return lambda: x
    xt = x.movedim(dim, 0).contiguous()  # one contiguous block per rank, so a single flat collective does it
    out = torch.empty((n * xt.shape[0], *xt.shape[1:]), dtype=x.dtype, device=x.device)
    work = _all_gather_fn()(out, xt, group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return out.movedim(0, dim).contiguous()

    return wait


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sums `x` over the group and keeps this rank's 1/n slice along `dim`."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ShapeError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((xt.shape[0] // n, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_fn()(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's 1/n slice of `x` along `dim` (no communication)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ShapeError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    size = x.shape[dim] // n
    return x.narrow(dim, dist.get_rank(group) * size, size).contiguous()


# --- paired autograd functions along the sequence dimension ---


class _ScatterToSequenceParallel(torch.autograd.Function):
    """forward: keep this rank's sequence slice; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    """forward: all-gather the sequence; backward: reduce-scatter (output feeds a tp region, whose per-rank
    partial input-gradients must be summed) or split (output is used identically on every rank)."""

    @staticmethod
    def forward(ctx, x, group, dim, tp_output_grad):
        ctx.group, ctx.dim, ctx.tp_output_grad = group, dim, tp_output_grad
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tp_output_grad:
            return reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """forward: reduce-scatter along the sequence (leaving a tp region); backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


def is_reduce_scatter_node(node: object) -> bool:
    """Whether an autograd graph node is the backward of `reduce_scatter_to_sequence_parallel_region` (the
    all-gather that starts a tp region's backward under sequence parallelism)."""
    return type(node) is _ReduceScatterToSequenceParallel._backward_cls


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1
) -> torch.Tensor:
    """Replicated (b, s, ...) -> this rank's (b, s/t, ...); e.g. the embedding output when SP starts."""
    return _ScatterToSequenceParallel.apply(x, resolve_group(group), seq_dim)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1, tp_output_grad: bool = True
) -> torch.Tensor:
    """(b, s/t, ...) -> (b, s, ...) by all-gather; the backward reduce-scatters (or splits, with
    `tp_output_grad=False`, when the gathered tensor is consumed identically on every rank)."""
    return _GatherFromSequenceParallel.apply(x, resolve_group(group), seq_dim, tp_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1
) -> torch.Tensor:
    """Per-rank partial sums (b, s, ...) -> summed (b, s/t, ...); the backward all-gathers."""
    return _ReduceScatterToSequenceParallel.apply(x, resolve_group(group), seq_dim)


class SequenceShardedPositionEmbedding(nn.Module):
    """Learned positions under sequence parallelism: this rank's block of positions [r s / t, (r + 1) s / t),
    matching the sequence shard the embedding's reduce-scatter left here. Holds the plain module's `weight` (same
    name, same tensor); its gradient is a partial sum over tp (the registry flags it)."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, seq: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        n = dist.get_world_size(self.group)
        if seq % n:
            raise ShapeError(f"sequence length {seq} is not divisible by parallel.tp = {n} (sequence parallelism)")
        per = seq // n
        mine = slice(dist.get_rank(self.group) * per, (dist.get_rank(self.group) + 1) * per)
        return self.weight[mine] if positions is None else self.weight[positions[:, mine]]


# --- gradients of parameters that live on sequence shards ---


def allreduce_grads(
    params: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None
) -> int:
    """Sums the gradients of `params` over `group` in place, one flat all-reduce per dtype (for per-rank partial
    sums: parameters applied to sequence shards under SP, replicated GQA kv projections), in `dtype` on the wire
    when given. Returns how many."""
    group = resolve_group(group)
    # FSDP2's gradients are DTensor shards over dp_shard: each tp rank sums its own shard (the same index range);
    # bf16 parameters under ZeRO-1 keep theirs in an fp32 `main_grad`
    grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad for p in params]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]
    if not grads or dist.get_world_size(group) == 1:
        return len(grads)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        if dtype is not None:  # e.g. bf16 on the wire (parallel.grad_reduce_dtype)
            flat = flat.to(dtype)
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(grads)
