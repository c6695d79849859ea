"""Sequence-parallel projection inputs saved as this rank's shard and all-gathered again in the backward pass.

Under sequence parallelism a tp region starts with an all-gather of the sequence (sequence.py), and the column-parallel
projections reading the gathered tensor keep it for their weight gradients: the full sequence, tp times this rank's
shard, and the largest activation term at large tp (engine.scaling.activations). Megatron-LM keeps the shard instead
and all-gathers it again in the backward pass (Korthikanti et al. 2022, sec. 4.2.2: the t-fold saving of every
activation outside the attention core assumes it). `regather_region_inputs` does the same for a whole block side (q, k
and v; gate and up; a cross-attention's two inputs) without touching the projections:

- its forward pre-hook gathers the inputs (as `enter_tp_region`) and, for the module's forward, enters a
  `SavedTensorScope` (saved_tensors.py) in which a saved gathered input, or a view of it, is saved as the shard it came
  from. Under autocast the pre-hook also makes the gathered input's cast copy (`engine.model.shared_cast` hands it to
  the projections), saved as the cast shard: bf16 on the wire in the backward;
- the backward all-gathers a shard once for all its consumers, started (asynchronously) right after the region's
  row-parallel projection has all-gathered its output gradient (the collective before it on the same group), so it
  runs under that projection's matmuls and the attention's (or the activation's) backward instead of in front of the
  projections that need it. Under the zero-bubble schedule a deferred weight gradient keeps the gathered tensor until
  its W pass.

Other saved tensors pass through, to the hooks that were active outside when there are any. Values and gradients are
bit for bit those of saving the gathered tensor (a gather of the cast shards equals the cast of the gathered tensor);
the cost is one more all-gather per region in the backward pass. Not used inside fully recomputed blocks, which save
only their input anyway.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.model.shared_cast import attach_autocast_copy, autocast_dtype
from engine.parallel.saved_tensors import SavedSource, SavedTensorScope
from engine.parallel.sequence import all_gather_async, gather_from_sequence_parallel_region, is_reduce_scatter_node


class _SavedShard(SavedSource):
    """One gathered input, saved as this rank's shard (the payload); gathered again once for all its consumers."""

    __slots__ = ("group", "dim", "_pending")

    def __init__(self, shard: torch.Tensor, group: dist.ProcessGroup, dim: int):
        super().__init__((shard,))
        self.group, self.dim = group, dim
        self._pending: Callable[[], torch.Tensor] | None = None

    def prefetch(self) -> None:
        """Starts the all-gather (asynchronously) unless it ran or runs already, or the shard lives elsewhere."""
        if self._value is None and self._pending is None and self.payload is not None:
            self._pending = all_gather_async(self.payload[0], self.dim, self.group)

    def build(self, shard: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            self._pending = all_gather_async(shard, self.dim, self.group)
        full, self._pending = self._pending(), None
        return full


def _prefetch_on_backward(sources: list[_SavedShard]) -> Callable[..., None]:
    refs = [weakref.ref(s) for s in sources]  # the hook lives with the graph; the sources only while saved

    def prefetch_on_backward(*grads: object) -> None:
        for ref in refs:
            source = ref()
            if source is not None and source.pending:
                source.prefetch()

    return prefetch_on_backward


def _region_end(out: torch.Tensor, depth: int = 4) -> torch.autograd.graph.Node | None:
    """The backward node of the reduce-scatter that ends the region (its row-parallel projection's), searched from
    the region's output through at most `depth` nodes (a bias add, a dropout); None if there is none."""
    frontier = [out.grad_fn]
    for _ in range(depth):
        for node in frontier:
            if is_reduce_scatter_node(node):
                return node
        frontier = [fn for node in frontier if node is not None for fn, _ in node.next_functions]
    return None


class RegatherRegion:
    """Forward hooks on a module whose first `n_inputs` inputs enter a sequence-parallel tp region (module
    docstring). Installed by `regather_region_inputs`."""

    def __init__(self, group: dist.ProcessGroup, n_inputs: int = 1, seq_dim: int = 1):
        self.group, self.n_inputs, self.seq_dim = group, n_inputs, seq_dim
        self._scopes: list[SavedTensorScope | None] = []  # one per forward call in progress (None: no grad)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        gathered = [gather_from_sequence_parallel_region(a, self.group, self.seq_dim) for a in args[: self.n_inputs]]
        scope = SavedTensorScope() if torch.is_grad_enabled() else None
        if scope is not None:
            dtype = autocast_dtype(gathered[0])
            for shard, full in zip(args, gathered, strict=False):
                scope.add(full, _SavedShard(shard.detach(), self.group, self.seq_dim))
                if dtype is not None and full.is_floating_point() and full.dtype != dtype:
                    low = full.detach().to(dtype)  # the projections' shared cast (engine.model.shared_cast)
                    attach_autocast_copy(full, low)
                    scope.add(low, _SavedShard(shard.detach().to(dtype), self.group, self.seq_dim))
            scope.__enter__()
        self._scopes.append(scope)
        return (*gathered, *args[self.n_inputs :])

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        scope = self._scopes.pop()
        if scope is None:
            return
        saved = [s for s in scope.sources() if s.packed]
        scope.__exit__(None, None, None)
        out = output[0] if isinstance(output, tuple) else output
        if saved and not scope.nested and isinstance(out, torch.Tensor) and out.requires_grad:
            # Started once the region's last collective in backward (the row-parallel projection's all-gather) is
            # issued: before it, the prefetch would hold that gather up (one group's collectives run in order).
            end = _region_end(out)
            if end is not None:
                end.register_hook(_prefetch_on_backward(saved))
            else:
                out.register_hook(_prefetch_on_backward(saved))


def regather_region_inputs(module: nn.Module, group: dist.ProcessGroup, n_inputs: int = 1, seq_dim: int = 1
                           ) -> RegatherRegion:  # fmt: skip
    """Gathers `module`'s first `n_inputs` inputs over the tp `group` along `seq_dim` (sequence parallelism's entry to
    a tp region) and saves them for the backward pass as this rank's shards (module docstring)."""
    region = RegatherRegion(group, n_inputs, seq_dim)
    module.register_forward_pre_hook(region.pre_hook)
    module.register_forward_hook(region.post_hook, always_call=True)
    return region
