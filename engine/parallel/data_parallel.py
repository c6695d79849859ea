"""Data parallelism over contiguous gradient buffers, the layout ZeRO-1 shards (as Megatron-Core's DDP does).

Each parameter's data and gradient become views into flat per-dtype buffers, cut into buckets of about
`bucket_mb` in the reverse of the model's order (the order backward produces gradients). Autograd accumulates
into the gradient views in place; a post-accumulate hook counts each bucket's gradients and, on the step's last
micro-batch, starts the bucket's collective as soon as its last gradient is in, while backward goes on with the
layers before it: an all-reduce (plain data parallelism), or with ZeRO-1 (Rajbhandari et al. 2020, stage 1) a
reduce-scatter that leaves each rank the sum over the group of its own contiguous shard of the bucket. Accumulation
micro-batches communicate nothing. `finish` starts what has not started (gradients that bypass autograd's
accumulation, e.g. a zero-bubble schedule's deferred weight gradients, or a pipeline's whole schedule) and waits.
With ZeRO-1 the optimizer (engine.optim.distributed) updates the rank's shards, then `all_gather_params` rebuilds
every parameter from the shards, bucket by bucket, and the next forward waits for each bucket just before the
first module that reads it (the gathers overlap the forward).

bf16 parameters (`train.param_dtype bf16`) keep bf16 data buffers and fp32 gradient buffers: each gradient is added
into its fp32 slice by the hook (Megatron's main_grad) and the reduction runs in fp32; the optimizer keeps fp32
master copies of its shards.

Every bucket is padded to a multiple of the group size, so each rank's shard has the same length and the
collectives run in place on the buffer. Buckets and shards are identical on every rank of the group (the same
model, the same parameter order).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


# Looked up at each call, through the module (so engine.parallel.comm_count sees them): torch's newer names, else
# the older ones they replace.
def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


@dataclass(eq=False)  # compared by identity (its fields are tensors)
class Bucket:
    """A contiguous slice of the flat buffers holding whole parameters, padded to a multiple of the group size."""

    params: list[nn.Parameter]
    ranges: list[tuple[int, int]]  # each parameter's [start, end) in the bucket
    param_data: torch.Tensor
    grad_data: torch.Tensor
    ready: set[int] = field(default_factory=set)  # ids of the parameters whose gradient is in (last micro-batch)
    work: Any = None  # the gradient collective in flight
    gather: Any = None  # ZeRO-1: the parameter all-gather in flight, waited for by the first forward that reads it
    low: torch.Tensor | None = None  # a bf16 copy of grad_data being reduced (parallel.grad_reduce_dtype bf16)

    def shard(self, flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s contiguous part of `flat` (this bucket's param_data or grad_data, or one shaped like them)."""
        n = flat.numel() // size
        return flat[rank * n : (rank + 1) * n]


@dataclass(eq=False)
class GradBuffers:
    group: dist.ProcessGroup
    zero1: bool
    reduce_dtype: torch.dtype | None = None  # None: the gradients' own dtype (fp32)
    buckets: list[Bucket] = field(default_factory=list)
    sync: bool = True  # False on accumulation micro-batches (and while a pipeline schedule runs): no collectives
    trace: list[tuple[int, int]] | None = None  # tests: (bucket, gradients seen in this backward) at each launch
    gather_trace: list[int] | None = None  # tests: the bucket of each parameter all-gather waited for, in order
    seen: int = 0

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def _on_grad(self, bucket: Bucket, p: nn.Parameter) -> None:
        if not self.sync or id(p) in bucket.ready:  # a second call for one parameter does not count twice
            return
        self.seen += 1
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params) and bucket.work is None:
            self._launch(bucket)

    def _fold(self, p: nn.Parameter, main: torch.Tensor, bucket: Bucket | None) -> None:
        """bf16 parameters: p's gradient added into its fp32 slice of the buffer, then dropped."""
        if p.grad is not None:  # (a second call for one accumulation finds it already folded)
            main.add_(p.grad)
            p.grad = None
        if bucket is not None:
            self._on_grad(bucket, p)

    def _launch(self, bucket: Bucket) -> None:
        if self.trace is not None:
            self.trace.append((self.buckets.index(bucket), self.seen))
        data = bucket.grad_data
        if self.reduce_dtype is not None and self.reduce_dtype != data.dtype:  # half the bytes, bf16 rounding
            data = bucket.low = data.to(self.reduce_dtype)
        if self.zero1:
            out = bucket.shard(data, self.rank, self.size)
            bucket.work = _reduce_scatter(out, data, group=self.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(data, group=self.group, async_op=True)

    def finish(self) -> None:
        """Starts the collectives not yet started and waits for all: every gradient summed over the group (with
        ZeRO-1: each rank's shards)."""
        self.fold_pending()
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            b.work.wait()
            b.work = None
            if b.low is not None:  # the reduced bf16 values back into the fp32 buffer (this rank's shard)
                if self.zero1:
                    b.shard(b.grad_data, self.rank, self.size).copy_(b.shard(b.low, self.rank, self.size))
                else:
                    b.grad_data.copy_(b.low)
                b.low = None
            b.ready.clear()
        self.seen = 0

    def fold_pending(self) -> None:
        """bf16 parameters: a gradient written outside autograd's accumulation (a zero-bubble schedule's deferred
        weight gradient) added into the fp32 buffer, as the hook does for the others."""
        for b in self.buckets:
            if b.grad_data.dtype != b.param_data.dtype:
                for p, (s, e) in zip(b.params, b.ranges):
                    if p.grad is not None:
                        self._fold(p, b.grad_data[s:e].view_as(p), None)

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad_data.zero_()

    def all_gather_params(self, wait: bool = True) -> None:
        """ZeRO-1, after the optimizer updated this rank's shards: every rank's shards into every parameter, bucket
        by bucket in forward's order. `wait=False` leaves them in flight: the forward pre-hooks (`install_waits`)
        wait for each bucket just before the first module that reads it, so the gathers overlap the next forward."""
        self.wait_params()
        for b in reversed(self.buckets):  # the buckets are in backward's order
            shard = b.shard(b.param_data, self.rank, self.size)
            b.gather = _all_gather(b.param_data, shard, group=self.group, async_op=True)
        if wait:
            self.wait_params()

    def wait_params(self, buckets: Sequence[Bucket] | None = None) -> None:
        """Waits for the parameter all-gathers in flight (of `buckets`, default all)."""
        for b in self.buckets if buckets is None else buckets:
            if b.gather is not None:
                b.gather.wait()
                b.gather = None
                if self.gather_trace is not None:
                    self.gather_trace.append(self.buckets.index(b))

    def install_waits(self, model: nn.Module) -> None:
        """Forward pre-hooks on `model`'s top-level modules (each item of a ModuleDict / ModuleList, e.g. each
        layer): each waits for the parameter all-gathers of the buckets holding its parameters."""
        bucket_of = {id(p): b for b in self.buckets for p in b.params}

        def hook_on(module: nn.Module, params) -> None:
            needed = list({id(b): b for p in params if (b := bucket_of.get(id(p))) is not None}.values())
            if needed:
                module.register_forward_pre_hook(lambda _m, _args: self.wait_params(needed))

        hook_on(model, model.parameters(recurse=False))
        for child in model.children():
            for target in child.children() if isinstance(child, (nn.ModuleDict, nn.ModuleList)) else [child]:
                hook_on(target, target.parameters())

    def numel(self) -> tuple[int, int]:
        """(elements of the buffers, of which padding)."""
        total = sum(b.param_data.numel() for b in self.buckets)
        used = sum(e - s for b in self.buckets for s, e in b.ranges)
        return total, total - used


def _hook(p: nn.Parameter, ref: weakref.ref, index: int, fold: tuple[int, int] | None) -> None:
    buffers = ref()
    if buffers is None:
        return
    bucket = buffers.buckets[index]
    if fold is None:
        buffers._on_grad(bucket, p)
    else:
        buffers._fold(p, bucket.grad_data[fold[0] : fold[1]].view_as(p), bucket)


def build_grad_buffers(
    modules: Sequence[nn.Module],
    group: dist.ProcessGroup,
    bucket_mb: float,
    zero1: bool,
    reduce_dtype: torch.dtype | None = None,
) -> GradBuffers:
    """Moves the trainable parameters of `modules` (each once, tied copies included) into flat buffers and installs
    the gradient hooks; see the module docstring."""
    size = dist.get_world_size(group)
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    buffers = GradBuffers(group, zero1, reduce_dtype)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in reversed(params):  # backward's order: the last layers' gradients first
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, ps in by_dtype.items():
        limit = max(1, int(bucket_mb * 2**20 / torch.empty(0, dtype=dtype).element_size()))
        groups: list[list[nn.Parameter]] = [[]]
        for p in ps:
            if groups[-1] and sum(q.numel() for q in groups[-1]) + p.numel() > limit:
                groups.append([])
            groups[-1].append(p)
        sizes = [-(-sum(p.numel() for p in g) // size) * size for g in groups]  # padded to a multiple of size
        device = ps[0].device
        param_flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        grad_flat = torch.zeros(sum(sizes), dtype=torch.float32 if dtype == torch.bfloat16 else dtype, device=device)
        offset = 0
        for g, n in zip(groups, sizes):
            ranges, start = [], 0
            for p in g:
                ranges.append((start, start + p.numel()))
                start += p.numel()
            bucket = Bucket(g, ranges, param_flat[offset : offset + n], grad_flat[offset : offset + n])
            for p, (s, e) in zip(g, ranges):
                view = bucket.param_data[s:e].view_as(p)
                view.copy_(p.detach())
                p.data = view
                main = bucket.grad_data[s:e].view_as(p)
                # Tensor hooks live in C++, out of the garbage collector's sight: one holding the buffers (which hold
                # the parameter) would keep the whole model alive. They hold a weak reference and an index instead.
                where = (weakref.ref(buffers), len(buffers.buckets))
                if main.dtype == p.dtype:  # autograd accumulates into the buffer itself
                    p.grad = main
                    p.register_post_accumulate_grad_hook(lambda q, w=where: _hook(q, *w, None))
                else:  # bf16 parameters: each gradient is added into the fp32 buffer (Megatron's main_grad)
                    p.main_grad = main  # what gradient bookkeeping (tp sums, tied copies) reads and writes
                    p.register_post_accumulate_grad_hook(lambda q, w=where, r=(s, e): _hook(q, *w, r))
            buffers.buckets.append(bucket)
            offset += n
    for m in modules:
        buffers.install_waits(m)
    return buffers


def attach_grad_buffers(module: nn.Module, buffers: GradBuffers) -> None:
    module._grad_buffers = buffers  # read back with grad_buffers_of


def grad_buffers_of(module: nn.Module) -> GradBuffers | None:
    """The buffers parallelize_gpt attached to a chunk (ZeRO-1), else None."""
    return getattr(module, "_grad_buffers", None)
