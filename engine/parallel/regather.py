"""Sequence-parallel projection inputs saved as this rank's shard and all-gathered again in the backward pass.

Under sequence parallelism a tp region starts with an all-gather of the sequence (sequence.py), and the column-parallel
projections reading the gathered tensor keep it for their weight gradients: the full sequence, tp times this rank's
shard, and the largest activation term at large tp (engine.scaling.activations). Megatron-LM keeps the shard instead
and all-gathers it again in the backward pass (Korthikanti et al. 2022, sec. 4.2.2: the t-fold saving of every
activation outside the attention core assumes it). `regather_region_inputs` does the same for a whole block side (q, k
and v; gate and up; a cross-attention's two inputs) without touching the projections:

- its forward pre-hook gathers the inputs (as `enter_tp_region`) and, during the module's forward, installs
  `torch.autograd.graph.saved_tensors_hooks` that save any saved tensor which is a gathered input or a view of it
  (same storage and dtype: a projection saves its 3-d input folded to 2-d) as the shard it came from. Under autocast
  the pre-hook also makes the gathered input's cast copy (`engine.model.shared_cast` hands it to the projections),
  saved as the cast shard: bf16 on the wire in the backward;
- the backward all-gathers a shard once for all its consumers, started (asynchronously) as soon as the gradient of
  the module's output arrives, so it runs under the output projection's and the attention's (or the MLP's) backward
  instead of in front of the projections that need it.

Other saved tensors pass through unchanged, to the hooks that were active outside (activation checkpointing, offload,
a measurement) when there are any: those nest as if this module were not here. Values and gradients are bit for bit
those of saving the gathered tensor (a gather of the cast shards equals the cast of the gathered tensor); the cost is
one more all-gather per region in the backward pass. Not used inside fully recomputed blocks, which save only their
input anyway.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.model.shared_cast import attach_autocast_copy, autocast_dtype
from engine.parallel.sequence import all_gather_async, gather_from_sequence_parallel_region

_Key = tuple[int, torch.dtype]


def _key(t: torch.Tensor) -> _Key | None:
    """A saved tensor's storage and dtype (None: no real storage). A projection may save a view of its input (a 3-d
    input is folded to 2-d for the matmul), so a gathered input is recognised by its storage, not its shape."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    ptr = t.untyped_storage().data_ptr()
    return (ptr, t.dtype) if ptr else None


class _SavedShard:
    """One gathered input, kept as this rank's shard; gathered again once for all the consumers that saved it.
    `shard` becomes None after the forward when other saved-tensor hooks are active outside: the shard then lives only
    where they put it."""

    __slots__ = ("shard", "group", "dim", "packed", "unpacked", "_full", "_pending", "__weakref__")

    def __init__(self, shard: torch.Tensor | None, group: dist.ProcessGroup, dim: int):
        self.shard, self.group, self.dim = shard, group, dim
        self.packed = self.unpacked = 0  # consumers that saved it / have taken it back
        self._full: torch.Tensor | None = None
        self._pending: Callable[[], torch.Tensor] | None = None

    def prefetch(self, shard: torch.Tensor | None = None) -> None:
        """Starts the all-gather (asynchronously) unless it ran or runs already."""
        shard = self.shard if shard is None else shard
        if self._full is None and self._pending is None and shard is not None:
            self._pending = all_gather_async(shard, self.dim, self.group)

    def full(self, shard: torch.Tensor) -> torch.Tensor:
        """The gathered tensor: waits for the prefetch, or gathers now. Kept until every consumer took it back."""
        if self._full is None:
            self.prefetch(shard)
            self._full, self._pending = self._pending(), None
        full = self._full
        self.unpacked += 1
        if self.unpacked >= self.packed:  # the last consumer: the entry lets go (a retained graph gathers again)
            self._full = None
        return full


class _Token:
    """What a consumer saved in place of a gathered input (or a view of it): the entry, the shard as the outer hooks
    packed it, and the view's geometry."""

    __slots__ = ("entry", "packed_shard", "shape", "stride", "offset")

    def __init__(self, entry: _SavedShard, packed_shard: Any, t: torch.Tensor):
        self.entry, self.packed_shard = entry, packed_shard
        self.shape, self.stride, self.offset = t.shape, t.stride(), t.storage_offset()

    def unpack(self, shard: torch.Tensor) -> torch.Tensor:
        full = self.entry.full(shard)  # contiguous from offset 0, as the forward's gathered tensor was
        if full.shape == self.shape and full.stride() == self.stride and self.offset == 0:
            return full
        return full.as_strided(self.shape, self.stride, self.offset)


def _identity(x: Any) -> Any:
    return x


class _RegatherScope:
    """The saved-tensor hooks of one forward call of a region (module docstring)."""

    def __init__(self):
        self.entries: dict[_Key, _SavedShard] = {}
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # hooks active outside, or None
        self.outer_pack, self.outer_unpack = outer if outer is not None else (_identity, _identity)
        self.nested = outer is not None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def register(self, full: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup, dim: int) -> None:
        key = _key(full)
        if key is not None:
            self.entries[key] = _SavedShard(shard, group, dim)

    def pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        entry = self.entries.get(key) if key is not None else None
        if entry is None:
            return self.outer_pack(t)
        entry.packed += 1
        return _Token(entry, self.outer_pack(entry.shard), t)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Token):
            return packed.unpack(self.outer_unpack(packed.packed_shard))
        return self.outer_unpack(packed)


def _prefetch_hook(entries: list[_SavedShard]) -> Callable[[torch.Tensor], None]:
    refs = [weakref.ref(e) for e in entries]  # the hook lives with the graph; the entries only while saved

    def hook(grad: torch.Tensor) -> None:
        for ref in refs:
            entry = ref()
            if entry is not None and entry.packed > entry.unpacked:
                entry.prefetch()

    return hook


class RegatherRegion:
    """Forward hooks on a module whose first `n_inputs` inputs enter a sequence-parallel tp region (module
    docstring). Installed by `regather_region_inputs`."""

    def __init__(self, group: dist.ProcessGroup, n_inputs: int = 1, seq_dim: int = 1):
        self.group, self.n_inputs, self.seq_dim = group, n_inputs, seq_dim
        self._scopes: list[_RegatherScope | None] = []  # one per forward call in progress (None: no grad)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        gathered = [gather_from_sequence_parallel_region(a, self.group, self.seq_dim) for a in args[: self.n_inputs]]
        scope = _RegatherScope() if torch.is_grad_enabled() else None
        if scope is not None:
            dtype = autocast_dtype(gathered[0])
            for shard, full in zip(args, gathered, strict=False):
                scope.register(full, shard.detach(), self.group, self.seq_dim)
                if dtype is not None and full.is_floating_point() and full.dtype != dtype:
                    low = full.detach().to(dtype)  # the projections' shared cast (engine.model.shared_cast)
                    attach_autocast_copy(full, low)
                    scope.register(low, shard.detach().to(dtype), self.group, self.seq_dim)
            scope.hooks.__enter__()
        self._scopes.append(scope)
        return (*gathered, *args[self.n_inputs :])

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        scope = self._scopes.pop()
        if scope is None:
            return
        scope.hooks.__exit__(None, None, None)
        saved = [e for e in scope.entries.values() if e.packed]
        if scope.nested:
            for entry in saved:
                entry.shard = None  # the outer hooks hold it (or dropped it, to recompute it)
        scope.entries = {}  # storages may be reused from here on: nothing more is matched against them
        out = output[0] if isinstance(output, tuple) else output
        if saved and not scope.nested and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(_prefetch_hook(saved))


def regather_region_inputs(module: nn.Module, group: dist.ProcessGroup, n_inputs: int = 1, seq_dim: int = 1
                           ) -> RegatherRegion:  # fmt: skip
    """Gathers `module`'s first `n_inputs` inputs over the tp `group` along `seq_dim` (sequence parallelism's entry to
    a tp region) and saves them for the backward pass as this rank's shards (module docstring)."""
    region = RegatherRegion(group, n_inputs, seq_dim)
    module.register_forward_pre_hook(region.pre_hook)
    module.register_forward_hook(region.post_hook, always_call=True)
    return region
