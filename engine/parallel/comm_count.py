"""Counts the collectives a piece of code issues, by wrapping the `torch.distributed` functions for a while.

`batch_isend_irecv` counts each of its point-to-point ops as one send or recv.

Used by tests (Megatron's accounting: 2 all-reduces per transformer block forward with tp) and by
benchmarks/bench_tp.py (bytes per step against the closed form). Our layers call collectives through the module
attribute (`dist.all_reduce(...)`), so patching the attribute sees every call, including those made in backward.

Bytes: `payload` is the size of the collective's full tensor (the all-reduce buffer, the all-gather output, the
reduce-scatter input); `wire` is what one rank sends with the bandwidth-optimal ring algorithm (Patarasuk & Yuan
2009; Thakur et al. 2005): all-reduce 2(n-1)/n * payload, all-gather and reduce-scatter (n-1)/n * payload.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Deprecated aliases (all_gather_into_tensor, reduce_scatter_tensor) call the new names through the module, so a
# depth guard counts only the outermost call.
_OPS = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "broadcast": "broadcast",
    "all_to_all_single": "all_to_all",
    "send": "send",
    "recv": "recv",
    "isend": "send",
    "irecv": "recv",
}


@dataclass(frozen=True)
class Record:
    """One collective call: its kind, group size and the bytes of its full tensor (see module docstring)."""

    op: str
    group_size: int
    payload_bytes: int

    @property
    def wire_bytes(self) -> float:
        n = self.group_size
        if self.op == "all_reduce":
            return 2 * (n - 1) / n * self.payload_bytes
        if self.op in ("all_gather", "reduce_scatter", "all_to_all"):
            return (n - 1) / n * self.payload_bytes
        return float(self.payload_bytes)  # broadcast, send, recv: the tensor itself


@dataclass
class CommCounter:
    """What ran inside `count_collectives()`: a list of records plus summaries."""

    records: list[Record] = field(default_factory=list)

    def calls(self, op: str | None = None) -> int:
        return sum(1 for r in self.records if op is None or r.op == op)

    def payload_bytes(self, op: str | None = None) -> int:
        return sum(r.payload_bytes for r in self.records if op is None or r.op == op)

    def wire_bytes(self, op: str | None = None) -> float:
        return sum(r.wire_bytes for r in self.records if op is None or r.op == op)

    def by_op(self) -> dict[str, int]:
        """Number of calls per operation kind."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.op] = out.get(r.op, 0) + 1
        return out

    def clear(self) -> None:
        self.records.clear()


def _nbytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    def arg(i: int, key: str) -> object:
        return args[i] if len(args) > i else kwargs.get(key)

    if name in ("all_reduce", "all_reduce_coalesced", "broadcast", "send", "recv", "isend", "irecv"):
        return _nbytes(arg(0, "tensor" if name != "all_reduce_coalesced" else "tensors"))
    if name in ("all_gather_into_tensor", "all_gather_single"):
        return _nbytes(arg(0, "output_tensor"))
    if name == "all_gather":
        return _nbytes(arg(0, "tensor_list"))
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return _nbytes(arg(1, "input"))
    if name == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    return _nbytes(arg(1, "input"))  # all_to_all_single(output, input, ...)


def _group_size(name: str, args: tuple, kwargs: dict) -> int:
    if name in ("send", "recv", "isend", "irecv"):
        return 2
    group = kwargs.get("group")
    if group is None:
        # `group` is positional in a few signatures: all_reduce(tensor, op, group), all_gather_into_tensor(out, in,
        # group), reduce_scatter_tensor(out, in, op, group), broadcast(tensor, src, group).
        pos = {"all_reduce": 2, "all_reduce_coalesced": 2, "all_gather_into_tensor": 2, "all_gather_single": 2,
               "all_gather": 2, "reduce_scatter_tensor": 3, "reduce_scatter_single": 3, "reduce_scatter": 3,
               "broadcast": 2, "all_to_all_single": 5}.get(name)  # fmt: skip
        if pos is not None and len(args) > pos:
            group = args[pos]
    return dist.get_world_size(group)


@contextlib.contextmanager
def count_collectives(counter: CommCounter | None = None) -> Iterator[CommCounter]:
    """Within the block, every `torch.distributed` collective is recorded (and still runs) in the yielded counter."""
    counter = counter if counter is not None else CommCounter()
    originals = {name: getattr(dist, name) for name in _OPS if hasattr(dist, name)}
    depth = [0]

    def wrap(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                record = Record(_OPS[name], _group_size(name, args, kwargs), _payload(name, args, kwargs))
                counter.records.append(record)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    wrappers = {name: wrap(name, fn) for name, fn in originals.items()}
    batch = dist.batch_isend_irecv

    @functools.wraps(batch)
    def batch_wrapper(p2p_ops):
        for op in p2p_ops:  # P2POp holds torch's own isend/irecv (it accepts no wrapper)
            kind = "send" if op.op is originals["isend"] else "recv"
            counter.records.append(Record(kind, 2, _nbytes(op.tensor)))
        return batch(p2p_ops)

    for name, fn in wrappers.items():
        setattr(dist, name, fn)
    dist.batch_isend_irecv = batch_wrapper
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.batch_isend_irecv = batch
