"""Saved tensors replaced by what rebuilds them: the mechanism behind sequence parallelism's regathered projection
inputs (regather.py) and selective recomputation's activation outputs (activation_recompute.py).

Autograd keeps each tensor an operation saves until that operation's backward. Some are cheap to rebuild from
something smaller, or from tensors that are kept anyway: a gathered sequence from this rank's shard, an activation's
output from its inputs. A `SavedTensorScope` is a `torch.autograd.graph.saved_tensors_hooks` context: a tensor
registered in it with a `SavedSource` is, whenever an operation inside saves it or a view of it (a projection folds
its 3-d input to 2-d), saved as the source's payload instead, and rebuilt from that payload when the backward pass asks
for it, once for all the operations that saved it. Recognised by its storage and dtype, so any view matches and
nothing else does while the tensor is alive (the scope holds it until it exits).

Hooks active outside the scope (activation checkpointing, offloading, a measurement) keep working: the scope packs
every other saved tensor, and the payload's tensors, with them, and unpacks through them (the innermost hooks are the
only ones torch calls). When there are such hooks the scope lets go of its own reference to the payload at exit, so
they alone decide where it lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_Key = tuple[int, torch.dtype]


def _key(t: torch.Tensor) -> _Key | None:
    """A tensor's storage and dtype (None: no real storage, as on the meta device or for a wrapper subclass)."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses (DTensor, float8 tensors) have no data pointer
        return None
    return (ptr, t.dtype) if ptr else None


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` is `b` or a view of the same storage, in the same dtype."""
    key = _key(a)
    return key is not None and key == _key(b)


class SavedSource:
    """How to rebuild one registered tensor from `payload` (a tuple of tensors). Subclasses define `build`; the
    rebuilt tensor is kept until every operation that saved it took it back, then let go (a retained graph's next
    backward rebuilds it once more)."""

    __slots__ = ("payload", "packed", "unpacked", "outer_packed", "layout", "_value", "__weakref__")

    def __init__(self, payload: tuple[torch.Tensor, ...]):
        self.payload: tuple[torch.Tensor, ...] | None = payload
        self.packed = self.unpacked = 0  # operations that saved it / have taken it back (in this backward)
        self.outer_packed: tuple | None = None  # the payload as the outer hooks packed it, once for all consumers
        self.layout: tuple = ()  # the registered tensor's (shape, strides, storage offset), set by the scope
        self._value: torch.Tensor | None = None

    def build(self, *payload: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, payload: Callable[[], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The rebuilt tensor; `payload()` is called only to build it (outer hooks may allow one unpack only)."""
        if self._value is None:
            value = self.build(*payload())
            shape, stride, _ = self.layout
            if tuple(value.shape) != shape or value.stride() != stride:  # laid out as the registered tensor was
                value = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device).copy_(value)
            self._value = value
        value = self._value
        self.unpacked += 1
        if self.unpacked >= self.packed:  # the last consumer: let go, and count afresh for a retained graph
            self._value, self.unpacked = None, 0
        return value

    @property
    def pending(self) -> bool:
        """Whether some consumer saved it and has not taken it back yet."""
        return self.packed > self.unpacked


class _Token:
    """What an operation saved in place of a registered tensor (or a view of it): the source, the payload as the
    outer hooks packed it, and the view's geometry (its storage offset relative to the registered tensor's)."""

    __slots__ = ("source", "packed_payload", "shape", "stride", "offset")

    def __init__(self, source: SavedSource, packed_payload: tuple, t: torch.Tensor):
        self.source, self.packed_payload = source, packed_payload
        self.shape, self.stride = t.shape, t.stride()
        self.offset = t.storage_offset() - source.layout[2]

    def unpack(self, payload: Callable[[], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        value = self.source.value(payload)
        if value.shape == self.shape and value.stride() == self.stride and self.offset == 0:
            return value
        return value.as_strided(self.shape, self.stride, value.storage_offset() + self.offset)


class SavedTensorScope:
    """Saved-tensor hooks that save registered tensors as their sources' payloads (module docstring). Use as a context
    manager around the forward code whose saved tensors it should see; `add` registers a tensor, before or inside."""

    def __init__(self) -> None:
        self.entries: dict[_Key, tuple[torch.Tensor, int, SavedSource]] = {}
        self.outer: tuple | None = None
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def nested(self) -> bool:
        """Whether other saved-tensor hooks were active when the scope was entered."""
        return self.outer is not None

    def add(self, tensor: torch.Tensor, source: SavedSource) -> None:
        """Registers `tensor` (held, so its storage is not reused while matched), as it is now: once modified in
        place it no longer matches, and is saved as it is. Only a tensor that is its whole storage is registered:
        any view of that storage is then a view of it."""
        key = _key(tensor)
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0
        if key is not None and whole and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
            source.layout = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
            self.entries[key] = (tensor, tensor._version, source)

    def sources(self) -> list[SavedSource]:
        return [source for _, _, source in self.entries.values()]

    def __enter__(self) -> SavedTensorScope:
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        if self.nested:
            for _, _, source in self.entries.values():
                if source.packed:
                    source.payload = None  # the outer hooks hold it (or dropped it, to recompute it)
        self.entries = {}

    def _outer_pack(self, t: torch.Tensor) -> Any:
        return self.outer[0](t) if self.outer is not None else t

    def _outer_unpack(self, packed: Any) -> torch.Tensor:
        return self.outer[1](packed) if self.outer is not None else packed

    def pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        entry = self.entries.get(key) if key is not None else None
        if entry is None or t._version != entry[1]:  # not registered, or changed in place since
            return self._outer_pack(t)
        source = entry[2]
        source.packed += 1
        if source.outer_packed is None:
            source.outer_packed = tuple(self._outer_pack(p) for p in source.payload)
        return _Token(source, source.outer_packed, t)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Token):
            return packed.unpack(lambda: tuple(self._outer_unpack(p) for p in packed.packed_payload))
        return self._outer_unpack(packed)
