"""Executes a pipeline schedule's actions on this rank's model chunks: forwards, backwards and the point-to-point
exchange of activations and gradients between neighbouring stages.

Activations crossing a stage boundary have a static shape, (micro batch, sequence shard, d_model) in the parameters'
dtype (the residual stream), so receivers allocate their buffers without a handshake. The point-to-point actions
between two computes go out as one exchange (`batch_isend_irecv` of schedules.build_exchanges) that returns once
its receives have arrived; an exchange of sends only completes at the end of the step. Under these semantics the
simulator (simulate.py) proves the schedules deadlock-free, also for a backend whose sends wait for their receives
and that pairs messages by order (NCCL). Each message also carries a tag unique to (direction, stage, micro-batch),
which gloo matches on. A chunk's saved input and output are dropped as soon as its backward has run. The last stage
turns its output into the loss: the sum of per-token losses divided by the global batch's loss-bearing tokens (the
step's normalisation), times the fp16 loss scale when there is one; a last stage with multi-token prediction
modules also gets the micro-batch's token ids. Zero-bubble schedules (ZB-H1) split the
backward: B runs inside the weight-gradient store's `deferring`, so the chunk's linear layers queue their weight
gradients, and W computes them (deferred.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.pipeline.deferred import DeferredLinear, WeightGradStore
from engine.parallel.pipeline.schedules import SPLIT_BACKWARD, Action, build_exchanges, stage_of


@dataclass
class _StepState:
    """One step's tensors in transit, by (chunk, micro-batch) or (direction, chunk, micro-batch): each dropped as soon
    as the schedule is done with it."""

    inputs: dict = field(default_factory=dict)  # a chunk's input, kept for its backward; then its gradient
    outputs: dict = field(default_factory=dict)  # a chunk's output (or loss), kept for its backward
    to_send: dict = field(default_factory=dict)  # an activation or gradient waiting for its exchange
    received: dict = field(default_factory=dict)  # an activation or gradient received, waiting for its compute
    pending: list = field(default_factory=list)  # (work, tensors) of send-only exchanges in flight


class PipelineRunner:
    """`chunks[c]` is this rank's chunk c (global stage c * pp + pp_rank); `pp_ranks` the global ranks of this
    rank's pipeline group in stage order; `activation_shape` the shape of a stage boundary's tensor."""

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        schedule: str,
        pp_ranks: Sequence[int],
        pp_rank: int,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.chunks, self.schedule, self.pp_ranks = list(chunks), schedule, list(pp_ranks)
        self.store = WeightGradStore() if schedule in SPLIT_BACKWARD else None
        if self.store is not None:
            for chunk in self.chunks:
                _defer_weight_grads(chunk, self.store)
        self.pp, self.rank, self.v = len(pp_ranks), pp_rank, len(chunks)
        self.shape, self.dtype, self.device, self.autocast = activation_shape, dtype, device, autocast
        self.last_stage = self.pp * self.v - 1

    def _peer(self, stage: int) -> int:
        return self.pp_ranks[stage % self.pp]

    def _tag(self, direction: int, stage: int, micro: int) -> int:
        return (micro * (self.last_stage + 1) + stage) * 2 + direction

    def run(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        n_tokens: torch.Tensor,
        scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> torch.Tensor:
        """Forward and backward of every micro-batch by the schedule; returns this rank's sum of per-token losses
        (non-zero on the last stage only). Gradients accumulate in the chunks' parameters."""
        items = build_exchanges(self.schedule, self.pp, self.v, len(batches), self.rank)
        denom = n_tokens.clamp(min=1).float()
        st = _StepState()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in items:
            if isinstance(a, tuple):
                self._exchange(a, st)
                continue
            c, i, s = a.chunk, a.micro, stage_of(a.chunk, self.rank, self.pp)
            if a.kind == "F":
                x, y, *rest = batches[i]  # rest: the model's keywords (positions, segment ids, causal, prefix_lengths)
                kw = rest[0] if rest else {}
                inp = x if s == 0 else st.received.pop(("F", c, i)).requires_grad_()
                with self.autocast():
                    if s == self.last_stage:
                        if getattr(self.chunks[c], "takes_input_ids", False):  # MTP modules embed the token ids
                            kw = {**kw, "input_ids": x}
                        loss_sum = self.chunks[c](inp, y, reduction="sum", **kw)
                        total += loss_sum.detach().double()
                        out = scale(loss_sum / denom)
                    else:
                        out = self.chunks[c](inp, **kw)
                        st.to_send[("F", c, i)] = out.detach().contiguous()
                st.inputs[(c, i)], st.outputs[(c, i)] = inp, out
            elif a.kind == "B":
                out = st.outputs.pop((c, i))
                with self.store.deferring((c, i)) if self.store is not None else contextlib.nullcontext():
                    if s == self.last_stage:
                        out.backward()
                    else:
                        torch.autograd.backward(out, st.received.pop(("B", c, i)))
                inp = st.inputs.pop((c, i))
                if s > 0:  # the gradient to send back: all this micro-batch's chunk still holds
                    st.to_send[("B", c, i)] = inp.grad.contiguous()
            elif a.kind == "W":
                self.store.run((c, i))
        for work, _ in st.pending:
            work.wait()
        return total

    def _exchange(self, group: tuple[Action, ...], st: _StepState) -> None:
        """Posts one exchange's sends and receives as one batch; returns once its receives have arrived. An exchange
        of sends only stays in flight (in `st.pending`, with the tensors it reads) until the step's end."""
        ops, sent = [], []
        for a in group:
            c, i, s = a.chunk, a.micro, stage_of(a.chunk, self.rank, self.pp)
            if a.kind in ("SEND_F", "SEND_B"):
                forward = a.kind == "SEND_F"
                t = st.to_send.pop(("F" if forward else "B", c, i))
                dst, tag = (s + 1, self._tag(0, s + 1, i)) if forward else (s - 1, self._tag(1, s - 1, i))
                ops.append(dist.P2POp(dist.isend, t, self._peer(dst), tag=tag))
                sent.append(t)
            else:
                forward = a.kind == "RECV_F"
                t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                src, tag = (s - 1, self._tag(0, s, i)) if forward else (s + 1, self._tag(1, s, i))
                ops.append(dist.P2POp(dist.irecv, t, self._peer(src), tag=tag))
                st.received[("F" if forward else "B", c, i)] = t
        works = dist.batch_isend_irecv(ops)
        if len(sent) < len(ops):
            for work in works:
                work.wait()
        else:
            st.pending += [(work, sent) for work in works]

    @torch.no_grad()
    def forward_only(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Evaluation through the pipeline: every micro-batch forward through this rank's chunks in stage order
        (chunk 0 first), no backward; returns this rank's sum of per-token losses (non-zero on the last stage)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        pending = []
        for i, (x, y, *rest) in enumerate(batches):
            kw = rest[0] if rest else {}
            for c, chunk in enumerate(self.chunks):
                s = stage_of(c, self.rank, self.pp)
                if s == 0:
                    inp = x
                else:
                    inp = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                    dist.irecv(inp, src=self._peer(s - 1), tag=self._tag(0, s, i)).wait()
                with self.autocast():
                    if s == self.last_stage:
                        total += chunk(inp, y, reduction="sum", **kw).double()
                        continue
                    out = chunk(inp, **kw).contiguous()
                pending.append((dist.isend(out, dst=self._peer(s + 1), tag=self._tag(0, s + 1, i)), out))
        for work, _ in pending:
            work.wait()
        return total


def _defer_weight_grads(chunk: nn.Module, store: WeightGradStore) -> None:
    """Routes the matmul weights of a chunk's linear layers (not the output head's, which the loss kernel uses
    directly) through the store: plain nn.Linear becomes a DeferredLinear (same parameters and names)."""
    head = getattr(getattr(chunk, "output", None), "proj", None)
    for module in chunk.modules():
        if module is head:
            continue
        if type(module) is nn.Linear:
            module.__class__ = DeferredLinear
        if hasattr(type(module), "weight_grad_store"):
            module.weight_grad_store = store
