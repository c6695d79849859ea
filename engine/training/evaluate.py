"""Held-out evaluation: the per-token mean loss over a fixed set of validation samples, the same in any layout.

When the validation data is a blend (`--data.valid_path "w1 prefix1 w2 prefix2"`, a `BlendedDataset`), the same
pass also gives each component's loss: the blend's index array `dataset_index` names the component of every sample,
so each component's loss sum and loss-bearing tokens are accumulated apart and reduced over the data-parallel group
together with the totals. The overall loss is then their token-weighted mean, exactly as without a blend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.model.head import IGNORE_INDEX
from engine.training.samples import SequenceLayout, collate, micro_batches, model_inputs


class ValidationLoss(float):
    """The validation loss (a float: the token-weighted mean over every validation sample) with, for a blend, each
    component's: `components` {name: loss} and `component_tokens` {name: loss-bearing tokens}, in the blend's order
    (a component with no token in the evaluated samples is left out). Names are the prefixes' basenames
    (`component_names`); empty without a blend."""

    components: dict[str, float]
    component_tokens: dict[str, int]

    def __new__(cls, value: float, components: dict[str, float] | None = None,
                component_tokens: dict[str, int] | None = None) -> ValidationLoss:  # fmt: skip
        obj = super().__new__(cls, value)
        obj.components = dict(components or {})
        obj.component_tokens = dict(component_tokens or {})
        return obj

    def metrics(self) -> dict[str, float]:
        """The per-component losses as metric keys: {"val_loss/<name>": loss}."""
        return {f"val_loss/{name}": loss for name, loss in self.components.items()}


def component_metrics(val: float) -> dict[str, float]:
    """The metric keys {"val_loss/<name>": loss} of a `ValidationLoss` of a blend; {} for any other loss."""
    return val.metrics() if isinstance(val, ValidationLoss) else {}


def blend_components(ds: Any) -> tuple[np.ndarray | None, list[str]]:
    """(the component index of every sample, the components' names) of a blended dataset; (None, [""]) for any
    other dataset (one component)."""
    index, parts = getattr(ds, "dataset_index", None), getattr(ds, "datasets", None)
    if index is None or parts is None:
        return None, [""]
    return np.asarray(index), component_names([str(getattr(p, "prefix", f"component{i}")) for i, p in enumerate(parts)])


def component_names(prefixes: list[str]) -> list[str]:
    """The metric names of a blend's components: each prefix's basename, with its position appended to every name
    when two basenames are the same."""
    names = [os.path.basename(prefix) for prefix in prefixes]
    if len(set(names)) < len(names):
        names = [f"{name}_{i}" for i, name in enumerate(names)]
    return names


def _result(total: torch.Tensor, names: list[str], blended: bool) -> ValidationLoss:
    """total (2, components): loss sums, loss-bearing tokens."""
    overall = (total[0].sum() / total[1].sum().clamp(min=1)).item()
    if not blended:
        return ValidationLoss(overall)
    sums, tokens = total[0].tolist(), [int(n) for n in total[1].tolist()]
    components = {name: s / n for name, s, n in zip(names, sums, tokens) if n > 0}
    return ValidationLoss(overall, components, {name: n for name, n in zip(names, tokens) if n > 0})


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """The rows `rows` of a per-row model keyword (collate's tensors are batch-first); anything else unchanged."""
    return value[rows] if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch else value


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Any, batches: int, global_batch: int, micro: int, dp_rank: int, dp: int,
    device: torch.device, autocast: Callable, dp_group: dist.ProcessGroup | None = None,
    layout: SequenceLayout | None = None,
) -> ValidationLoss:  # fmt: skip
    """Sum of per-token losses over `batches` global batches of `ds` divided by their loss-bearing tokens (the
    step's normalisation); `model` is put in eval mode for the duration. `dp_group`: the ranks that share the samples
    (dp, with context parallelism dp x cp); `layout`: as the training batches'. For a blend each micro-batch is run
    as one sub-batch per component it holds (its rows: the same tokens, the same compute)."""
    was_training = model.training
    model.eval()
    component_of, names = blend_components(ds)
    total = torch.zeros(2, len(names), device=device, dtype=torch.float64)  # loss sums, tokens; per component
    try:
        for b in range(batches):
            for idx in micro_batches(b * global_batch, global_batch, micro, dp_rank, dp):
                x, y, kwargs = model_inputs(collate(ds, idx, device, layout))
                owners = np.zeros(len(idx), dtype=np.int64) if component_of is None else component_of[idx]
                for c in np.unique(owners).tolist():
                    if (owners == c).all():  # the whole micro-batch: no copy
                        xc, yc, kw = x, y, kwargs
                    else:
                        rows = torch.from_numpy(np.flatnonzero(owners == c)).to(device)
                        xc, yc = x[rows], y[rows]
                        kw = {k: _rows(v, rows, x.shape[0]) for k, v in kwargs.items()}
                    with autocast():
                        total[0, c] += model(xc, yc, reduction="sum", **kw).double()
                    total[1, c] += (yc != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return _result(total, names, component_of is not None)


@torch.no_grad()
def evaluate_pipeline(
    runner: Any, ds: Any, batches: int, global_batch: int, micro: int, dp_rank: int, dp: int, device: torch.device,
    pp_group: dist.ProcessGroup, dp_group: dist.ProcessGroup | None = None, layout: SequenceLayout | None = None,
) -> ValidationLoss:  # fmt: skip
    """`evaluate` through a pipeline (engine.parallel.pipeline.runner.PipelineRunner.forward_only): the last stage
    holds the losses, summed over the pipeline group so every rank returns the same value. The schedule's micro-batch
    shapes are fixed, so a blend is evaluated with one forward pass per component present in a global batch, the
    other components' labels ignored (IGNORE_INDEX): per-component sums that add up to the plain pass's."""
    for chunk in runner.chunks:
        chunk.eval()
    component_of, names = blend_components(ds)
    total = torch.zeros(2, len(names), device=device, dtype=torch.float64)
    try:
        for b in range(batches):
            indices = micro_batches(b * global_batch, global_batch, micro, dp_rank, dp)
            data = [collate(ds, idx, device, layout) for idx in indices]
            if component_of is None:
                total[0, 0] += runner.forward_only(data)
                total[1, 0] += sum((batch[1] != IGNORE_INDEX).sum() for batch in data)
                continue
            owners = [torch.from_numpy(component_of[idx]).to(device) for idx in indices]
            for c in torch.unique(torch.cat(owners)).tolist():  # the same on every rank of the pipeline
                masked = []
                for batch, own in zip(data, owners):
                    yc = torch.where((own == c)[:, None], batch[1], IGNORE_INDEX)
                    masked.append((batch[0], yc, *batch[2:]))
                    total[1, c] += (yc != IGNORE_INDEX).sum()
                total[0, c] += runner.forward_only(masked)
    finally:
        for chunk in runner.chunks:
            chunk.train()
    dist.all_reduce(total[0], group=pp_group)
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return _result(total, names, component_of is not None)
