"""Held-out evaluation: the per-token mean loss over a fixed set of validation samples, the same in any layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.model.head import IGNORE_INDEX
from engine.training.samples import SequenceLayout, collate, micro_batches, model_inputs


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Any, batches: int, global_batch: int, micro: int, dp_rank: int, dp: int,
    device: torch.device, autocast: Callable, dp_group: dist.ProcessGroup | None = None,
    layout: SequenceLayout | None = None,
) -> float:  # fmt: skip
    """Sum of per-token losses over `batches` global batches of `ds` divided by their loss-bearing tokens (the
    step's normalisation); `model` is put in eval mode for the duration. `dp_group`: the ranks that share the samples
    (dp, with context parallelism dp x cp); `layout`: as the training batches'."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, tokens
    try:
        for b in range(batches):
            for idx in micro_batches(b * global_batch, global_batch, micro, dp_rank, dp):
                x, y, kwargs = model_inputs(collate(ds, idx, device, layout))
                with autocast():
                    total[0] += model(x, y, reduction="sum", **kwargs).double()
                total[1] += (y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def evaluate_pipeline(
    runner: Any, ds: Any, batches: int, global_batch: int, micro: int, dp_rank: int, dp: int, device: torch.device,
    pp_group: dist.ProcessGroup, dp_group: dist.ProcessGroup | None = None, layout: SequenceLayout | None = None,
) -> float:  # fmt: skip
    """`evaluate` through a pipeline (engine.parallel.pipeline.runner.PipelineRunner.forward_only): the last stage
    holds the losses, summed over the pipeline group so every rank returns the same value."""
    for chunk in runner.chunks:
        chunk.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    try:
        for b in range(batches):
            indices = micro_batches(b * global_batch, global_batch, micro, dp_rank, dp)
            data = [collate(ds, idx, device, layout) for idx in indices]
            total[0] += runner.forward_only(data)
            total[1] += sum((batch[1] != IGNORE_INDEX).sum() for batch in data)
    finally:
        for chunk in runner.chunks:
            chunk.train()
    dist.all_reduce(total[:1], group=pp_group)
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return (total[0] / total[1].clamp(min=1)).item()
