"""One optimizer step: micro-batches, per-token loss normalisation, loss scaling, gradient finishing, clipping and
the non-finite guard. A pipeline schedule will replace `TrainStep.forward_backward`.

Loss normalisation (docs/contracts.md): the step's loss is the sum of per-token losses over the whole global batch
(every micro-batch on every data-parallel rank) divided by the number of loss-bearing tokens in it, N. Each
micro-batch backpropagates sum_i / N, and the data-parallel reduction sums (DDP with a summing hook, ZeRO-1's
reduce-scatter; FSDP2's mean is undone by scaling the loss by dp), so the gradient is that of the global per-token
mean whatever the micro-batch and rank token counts are. N is counted
before the forward passes (one scalar all-reduce over dp).

Guard: a non-finite global gradient norm skips the optimizer step on every rank (the norm is reduced over the
model-parallel group and the gradients over dp, so all ranks see the same value); with fp16 the loss scaler's own
skip counts as one. The caller stops the run after `train.max_skipped_steps` consecutive skips.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.model.head import IGNORE_INDEX
from engine.model.mtp import per_head_backward
from engine.optim.clip import clip_grad_norm
from engine.parallel.data_parallel import grad_buffers_of
from engine.parallel.grads import finish_tp_grads, norm_parameters
from engine.parallel.sharding import sharding_of
from engine.training.precision import agree_found_inf
from engine.training.samples import model_inputs

Batch = tuple  # (inputs, targets), each (micro batch, seq_len), and the model's keyword arguments (samples.collate)


@dataclass
class StepResult:
    loss: float  # the global per-token mean loss
    grad_norm: float  # before clipping; inf/nan when the step was skipped for it
    tokens: int  # loss-bearing tokens in the global batch
    skipped: bool  # no optimizer update was made
    scale_backoff: bool = False  # fp16: the loss scaler skipped the step and lowered its scale (routine)


def count_tokens(batches: Sequence[Batch], dp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """N: loss-bearing tokens in the global batch (an fp64 scalar on the targets' device; summed over dp)."""
    n = sum((batch[1] != IGNORE_INDEX).sum() for batch in batches).to(torch.float64)
    if dp_group is not None:
        dist.all_reduce(n, group=dp_group)
    return n


class TrainStep:
    """Runs forward/backward over a step's micro-batches and updates the parameters.

    `model`: what the forward calls (the DDP wrapper when dp > 1 without ZeRO-1 or FSDP2; the model itself then);
    `inner`: the parallelized model itself (its sharding registry gives the tp gradient bookkeeping, its attached
    gradient buffers ZeRO-1's). `dp_group`/`mp_group`: None when that degree is 1.
    """

    def __init__(
        self,
        model: nn.Module,
        inner: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
        scaler: torch.amp.GradScaler | None = None,
        dp_group: dist.ProcessGroup | None = None,
        mp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model, self.inner, self.optimizer = model, inner, optimizer
        self.clip, self.autocast, self.scaler = clip, autocast, scaler
        self.dp_group, self.mp_group = dp_group, mp_group
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharding = sharding_of(inner)
        self.tp_enabled = self.sharding.tp_group is not None and dist.get_world_size(self.sharding.tp_group) > 1
        # Under tp, each element counted once in the global norm: sharded slices everywhere, replicated on tp rank 0.
        self.norm_params = norm_parameters(inner, sharding=self.sharding) if self.tp_enabled else None
        # FSDP2 (parallel.dp_shard) reduces gradients by a mean over dp: the loss is scaled by dp to keep the sum.
        self.fsdp = is_fsdp(model)
        self.loss_factor = dist.get_world_size(dp_group) if self.fsdp and dp_group is not None else 1
        self.buffers = grad_buffers_of(inner)  # ZeRO-1: this rank clips and steps its shards of the gradients
        if self.buffers is not None:
            self.params, self.norm_params, self.mp_group = zero1_update_args(optimizer, self.params, self.norm_params)
        # Parallel MTP heads backpropagate one at a time (engine.model.mtp.per_head_backward) where gradients may arrive
        # in several backward passes: not through DDP, FSDP2 or ZeRO-1's hooks, which expect one (all at once there).
        self.per_head = getattr(inner, "mtp_kind", None) == "parallel" and model is inner and not self.fsdp
        self.per_head = self.per_head and self.buffers is None

    def count_tokens(self, batches: Sequence[Batch]) -> torch.Tensor:
        return count_tokens(batches, self.dp_group)

    def forward_backward(self, batches: Sequence[Batch], n_tokens: torch.Tensor) -> torch.Tensor:
        """Backward of sum_i / N for each micro-batch (DDP synchronises on the last only); returns the detached sum
        of this rank's per-token losses."""
        total = torch.zeros((), dtype=torch.float64, device=n_tokens.device)
        denom = n_tokens.clamp(min=1).float()
        for i, batch in enumerate(batches):
            x, y, kwargs = model_inputs(batch)
            last = i == len(batches) - 1
            if self.buffers is not None:  # our buffers: collectives on the last micro-batch only
                self.buffers.sync = last
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            quiet = not last and self.dp_group is not None and self.buffers is None and not self.fsdp
            with self.model.no_sync() if quiet else contextlib.nullcontext():
                if self.per_head:
                    loss_sum = per_head_backward(self.inner, x, y, self._backward(denom), self.autocast, **kwargs)
                else:
                    with self.autocast():
                        loss_sum = self.model(x, y, reduction="sum", **kwargs)
                    self._backward(denom)(loss_sum)
            total += loss_sum.detach().double()
        if self.buffers is not None:
            self.buffers.finish()
        return total

    def _backward(self, denom: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """Backward of a sum of per-token losses divided by N (with FSDP2's factor and the fp16 loss scale)."""

        def backward(loss_sum: torch.Tensor) -> None:
            loss = loss_sum / denom * self.loss_factor
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

        return backward

    def __call__(self, batches: Sequence[Batch]) -> StepResult:
        n_tokens = self.count_tokens(batches)
        local = self.forward_backward(batches, n_tokens)
        if self.tp_enabled:
            finish_tp_grads(self.inner, sharding=self.sharding)  # after DDP's reduction over dp: the sum is linear
        grad_norm, skipped, backoff = update(
            self.optimizer, self.params, self.clip, self.scaler, self.mp_group, self.norm_params
        )
        if self.dp_group is not None:  # the tp ranks of a dp rank already hold the same full loss
            dist.all_reduce(local, group=self.dp_group)
        n = int(n_tokens.item())
        return StepResult(local.item() / max(n, 1), grad_norm, n, skipped, scale_backoff=backoff)


def is_fsdp(model: nn.Module) -> bool:
    """Whether torch's FSDP2 (`fully_shard`) wraps `model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def zero1_update_args(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], norm_params: list[torch.Tensor] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], dist.ProcessGroup]:
    """ZeRO-1's (params, norm_params, norm group) for `update`: this rank's shards of the gradients, of which it counts
    those of `norm_params` (default: all), in a norm summed over every rank (the shards are disjoint over dp, and
    the model-parallel ranks already count each element once)."""
    return optimizer.shards, optimizer.shards_of(params if norm_params is None else norm_params), dist.group.WORLD


def update(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    clip: float,
    scaler: torch.amp.GradScaler | None,
    mp_group: dist.ProcessGroup | None,
    norm_params: list[torch.Tensor] | None,
) -> tuple[float, bool, bool]:
    """Unscales (fp16), clips by the global norm over `mp_group` (each element counted once: `norm_params`) and steps
    the optimizer unless the norm is not finite; returns (norm, skipped, skipped by a routine fp16 scale back-off)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
        if mp_group is not None:
            agree_found_inf(scaler, optimizer, mp_group)
    grad_norm = float(clip_grad_norm(params, clip, group=mp_group, norm_parameters=norm_params))
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped the step
    else:
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped, skipped and scaler is not None and scaler.get_scale() >= 1.0
