"""The training step under pipeline parallelism: the schedule's runner replaces TrainStep's forward/backward; the
rest is the same bookkeeping across stages.

After the schedule: partial tensor-parallel gradients are summed per chunk, the tied embedding's two copies (first and
last stage; also the multi-token prediction modules' copy) sum their gradients over the embedding group, data-parallel
gradients are summed over dp (the loss was already divided by the global token count), and the clipping norm is taken
over tp x pp counting every element once (tp-replicated parameters on tp rank 0, the tied weight on the first stage
only). The loss, held by the last stage, is summed over the pipeline group so every rank logs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.data_parallel import grad_buffers_of
from engine.parallel.dims import ParallelDims
from engine.parallel.grads import finish_tp_grads, norm_parameters
from engine.parallel.parallelize import grad_group
from engine.parallel.pipeline.runner import PipelineRunner
from engine.parallel.pipeline.schedules import check_schedule
from engine.parallel.sequence import allreduce_grads
from engine.parallel.sharding import sharding_of
from engine.training.step import Batch, StepResult, count_tokens, is_fsdp, update, zero1_update_args


def shares_embedding(chunk: nn.Module) -> bool:
    """Whether the model's token embedding has a copy on the last stage: a tied output weight, or the embedding the
    sequential multi-token prediction modules read (engine.model.mtp)."""
    return "tok_emb.weight" in getattr(chunk, "tied_aliases", {}).values()


def tied_copy(chunk: nn.Module) -> nn.Parameter | None:
    """The copy of a shared embedding a chunk holds: the embedding on the first stage; on the last, the tied output
    weight or the MTP modules' embedding (one parameter when both). None when the model shares none or the chunk
    holds neither."""
    if not shares_embedding(chunk):
        return None
    if chunk.tok_emb is not None:
        return chunk.tok_emb.weight
    for alias, canonical in chunk.tied_aliases.items():
        if canonical == "tok_emb.weight":
            try:
                return chunk.get_parameter(alias)
            except AttributeError:  # not on this chunk
                continue
    return None


class PipelineStep:
    def __init__(
        self,
        chunks: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        clip: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
        dims: ParallelDims,
        schedule: str,
        activation_shape: tuple[int, ...],
        scaler: torch.amp.GradScaler | None = None,
        reduce_bf16: bool = False,
    ) -> None:
        self.chunks, self.optimizer, self.clip, self.scaler, self.dims = list(chunks), optimizer, clip, scaler, dims
        first = next(self.chunks[0].parameters())
        pp_group = dims.group("pp")
        self.runner = PipelineRunner(
            self.chunks, schedule, dist.get_process_group_ranks(pp_group), dims.rank_in("pp"), activation_shape,
            first.dtype, first.device, autocast,
        )  # fmt: skip
        self.pp_group, self.mp_group = pp_group, dims.group("model_parallel")
        self.dp_group = grad_group(dims)  # dp, or dp x cp
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        tied = [t for t in (tied_copy(c) for c in self.chunks) if t is not None]
        # every rank takes part in making the embedding groups (a collective), middle stages included
        group = dims.group("embedding") if shares_embedding(self.chunks[0]) else None
        self.tied, self.embedding_group = tied, (group if tied else None)
        last_copy = [t for c in self.chunks if c.tok_emb is None and (t := tied_copy(c)) is not None]
        self.norm_params = [
            p for c in self.chunks for p in norm_parameters(c, sharding=sharding_of(c))
            if not any(p is t for t in last_copy)  # the tied weight counts once: on the first stage
        ]  # fmt: skip
        self.buffers = grad_buffers_of(self.chunks[0])  # ZeRO-1
        # FSDP2 reduces each chunk's gradients itself, by a mean over dp (x cp): the loss is scaled by that to keep sums
        self.fsdp = is_fsdp(self.chunks[0])
        self.reduce_dtype = torch.bfloat16 if reduce_bf16 else None  # parallel.grad_reduce_dtype (without ZeRO-1)
        self.loss_factor = dist.get_world_size(self.dp_group) if self.fsdp and self.dp_group is not None else 1
        if self.buffers is not None:
            self.params, self.norm_params, self.mp_group = zero1_update_args(optimizer, self.params, self.norm_params)

    def __call__(self, batches: Sequence[Batch]) -> StepResult:
        n_tokens = count_tokens(batches, self.dp_group)
        scale = self.scaler.scale if self.scaler is not None else (lambda t: t)
        if self.loss_factor != 1:
            base, factor = scale, self.loss_factor
            scale = lambda t: base(t * factor)  # noqa: E731
        if self.buffers is not None:
            self.buffers.sync = False  # the dp reduction waits for the whole schedule (and the tied sum)
        local = self.runner.run(batches, n_tokens, scale)
        if self.buffers is not None:
            self.buffers.fold_pending()  # bf16 parameters: deferred weight gradients into fp32 before the tp sums
        for c in self.chunks:
            finish_tp_grads(c, sharding=sharding_of(c))
        if self.embedding_group is not None and dist.get_world_size(self.embedding_group) > 1:
            for t in self.tied:  # both copies end with the sum: they stay equal after the update
                if t.grad is None and getattr(t, "main_grad", None) is None:
                    t.grad = torch.zeros_like(t)
            allreduce_grads(self.tied, self.embedding_group)
        if self.buffers is not None:
            self.buffers.finish()  # ZeRO-1: reduce-scatter over dp
        elif self.dp_group is not None and not self.fsdp:
            allreduce_grads(self.params, self.dp_group, dtype=self.reduce_dtype)
        grad_norm, skipped, backoff = update(
            self.optimizer, self.params, self.clip, self.scaler, self.mp_group, self.norm_params
        )
        dist.all_reduce(local, group=self.pp_group)  # only the last stage holds a loss
        if self.dp_group is not None:
            dist.all_reduce(local, group=self.dp_group)
        n = int(n_tokens.item())
        return StepResult(local.item() / max(n, 1), grad_norm, n, skipped, scale_backoff=backoff)


def build_step(
    chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer, cfg, dims: ParallelDims, micro: int,
    autocast: Callable[[], contextlib.AbstractContextManager], scaler: torch.amp.GradScaler | None,
):  # fmt: skip
    """The step for a layout: TrainStep over the (DDP-wrapped) model, or with pipeline parallelism a PipelineStep
    running `cfg.parallel.pp_schedule` over this rank's chunks."""
    from engine.training.step import TrainStep

    if not dims.pp_enabled:
        [wrapped] = chunks
        inner = getattr(wrapped, "module", wrapped)
        mp = dims.group("model_parallel") if dims.tp_enabled else None
        return TrainStep(wrapped, inner, optimizer, cfg.optim.clip, autocast, scaler, grad_group(dims), mp)
    micro_batches = cfg.train.global_batch // (micro * dims.dp)
    check_schedule(cfg.parallel.pp_schedule, dims.pp, cfg.parallel.virtual_stages, micro_batches)
    seq = cfg.model.seq_len // (dims.tp if cfg.parallel.sp and dims.tp_enabled else 1) // dims.cp
    shape = (micro, seq, cfg.model.d_model)
    return PipelineStep(chunks, optimizer, cfg.optim.clip, autocast, dims, cfg.parallel.pp_schedule, shape, scaler,
                        cfg.parallel.grad_reduce_dtype == "bf16")  # fmt: skip
