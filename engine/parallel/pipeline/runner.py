"""Executes a pipeline schedule's actions on this rank's model chunks: forwards, backwards and the point-to-point
exchange of activations and gradients between neighbouring stages.

Activations crossing a stage boundary have a static shape, (micro batch, sequence shard, d_model) in the parameters'
dtype (the residual stream), so receivers allocate their buffers without a handshake. Sends are asynchronous
(`isend`, completed at the end of the step); receives block, exactly the semantics under which the simulator
(simulate.py) proves the schedules deadlock-free. Each message carries a tag unique to (direction, chunk,
micro-batch). A chunk's saved input and output are dropped as soon as its backward has run. The last stage turns its
output into the loss: the sum of per-token losses divided by the global batch's loss-bearing tokens (the step's
normalisation), times the fp16 loss scale when there is one. Zero-bubble schedules (ZB-H1) split the backward: B
runs inside the weight-gradient store's `deferring`, so the chunk's linear layers queue their weight gradients, and W
computes them (deferred.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.pipeline.deferred import DeferredLinear, WeightGradStore
from engine.parallel.pipeline.schedules import SPLIT_BACKWARD, build_schedule, stage_of


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
        m = len(batches)
        actions = build_schedule(self.schedule, self.pp, self.v, m, self.rank)
        denom = n_tokens.clamp(min=1).float()
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        received: dict[tuple[str, int, int], torch.Tensor] = {}
        pending: list = []  # (work, tensor) of sends in flight
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in actions:
            c, i, s = a.chunk, a.micro, stage_of(a.chunk, self.rank, self.pp)
            if a.kind == "RECV_F":
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                dist.irecv(buf, src=self._peer(s - 1), tag=self._tag(0, s, i)).wait()
                received[("F", c, i)] = buf.requires_grad_()
            elif a.kind == "RECV_B":
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                dist.irecv(buf, src=self._peer(s + 1), tag=self._tag(1, s, i)).wait()
                received[("B", c, i)] = buf
            elif a.kind == "F":
                x, y = batches[i]
                inp = x if s == 0 else received.pop(("F", c, i))
                with self.autocast():
                    if s == self.last_stage:
                        loss_sum = self.chunks[c](inp, y, reduction="sum")
                        total += loss_sum.detach().double()
                        out = scale(loss_sum / denom)
                    else:
                        out = self.chunks[c](inp)
                inputs[(c, i)], outputs[(c, i)] = inp, out
            elif a.kind == "SEND_F":
                t = outputs[(c, i)].detach().contiguous()
                pending.append((dist.isend(t, dst=self._peer(s + 1), tag=self._tag(0, s + 1, i)), t))
            elif a.kind == "B":
                out = outputs.pop((c, i))
                with self.store.deferring((c, i)) if self.store is not None else contextlib.nullcontext():
                    if s == self.last_stage:
                        out.backward()
                    else:
                        torch.autograd.backward(out, received.pop(("B", c, i)))
                inp = inputs.pop((c, i))
                if s > 0:  # the gradient to send back: all this micro-batch's chunk still holds
                    inputs[(c, i)] = inp.grad
            elif a.kind == "W":
                self.store.run((c, i))
            elif a.kind == "SEND_B":
                t = inputs.pop((c, i)).contiguous()
                pending.append((dist.isend(t, dst=self._peer(s - 1), tag=self._tag(1, s - 1, i)), t))
        for work, _ in pending:
            work.wait()
        return total

    @torch.no_grad()
    def forward_only(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Evaluation through the pipeline: every micro-batch forward through this rank's chunks in stage order
        (chunk 0 first), no backward; returns this rank's sum of per-token losses (non-zero on the last stage)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        pending = []
        for i, (x, y) in enumerate(batches):
            for c, chunk in enumerate(self.chunks):
                s = stage_of(c, self.rank, self.pp)
                if s == 0:
                    inp = x
                else:
                    inp = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                    dist.irecv(inp, src=self._peer(s - 1), tag=self._tag(0, s, i)).wait()
                with self.autocast():
                    if s == self.last_stage:
                        total += chunk(inp, y, reduction="sum").double()
                        continue
                    out = chunk(inp).contiguous()
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
