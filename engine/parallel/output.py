"""The vocabulary-parallel output head: the tensor-parallel form of `engine.model.head.OutputHead`.

The output projection is column-parallel over the vocabulary (padded to a multiple of tp, as the embedding), and the
loss is the vocab-parallel cross-entropy, so no rank ever holds the full logits (Megatron-LM, Shoeybi et al. 2019).
With tied embeddings the projection's weight is the VocabParallelEmbedding's tensor: both split the padded vocabulary
the same way. Under sequence parallelism the final norm runs on sequence shards and the head all-gathers the sequence
before the projection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model import ops
from engine.parallel.tensor import (
    ColumnParallelLinear,
    enter_tp_region,
    gather_from_tp_region,
    vocab_parallel_cross_entropy,
)


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup,
    vocab_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T with `weight` this rank's vocabulary shard (mean or sum over
    targets != ignore_index). `hidden` must already be inside the tp region (`enter_tp_region`: the same full tokens on
    every rank, with the backward that sums the hidden gradient over tp); columns >= `vocab_size` are padding.
    torch: vocab-sharded logits + `vocab_parallel_cross_entropy`; triton: the chunked kernel, which never holds more
    than a chunk of them (it leaves the hidden gradient to the region)."""
    if ops.select(backend, hidden) == "triton":
        fn = ops._kernel("vocab_parallel_fused_linear_cross_entropy")
        return fn(hidden, weight, target, group, ignore_index=ignore_index, vocab_size=vocab_size,
                  reduction=reduction, reduce_hidden_grad=False)  # fmt: skip
    logits = F.linear(hidden, weight)
    return vocab_parallel_cross_entropy(logits, target, group, vocab_size, ignore_index, reduction)


class VocabParallelOutputHead(nn.Module):
    """Final norm (the plain head's own module, kept), column-parallel projection, vocab-parallel loss."""

    def __init__(self, head: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False,
                 tied_weight: nn.Parameter | None = None):  # fmt: skip
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size, self.backend = head.vocab_size, head.backend
        self.norm = head.norm
        self.proj = ColumnParallelLinear.from_linear(
            head.proj, pad_output=True, sequence_parallel=sequence_parallel, skip_input_comm=True, group=group
        )
        if tied_weight is not None:
            if tuple(tied_weight.shape) != tuple(self.proj.weight.shape):
                raise ValueError(f"tied output weight {tuple(tied_weight.shape)} != {tuple(self.proj.weight.shape)}")
            self.proj.weight = tied_weight

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        h = enter_tp_region(self.norm(h), self.group, self.sequence_parallel)  # SP: the all-gather of the sequence
        if targets is None:
            local = F.linear(h, self.proj.weight)
            return gather_from_tp_region(local, self.group)[..., : self.vocab_size]
        return vocab_parallel_linear_cross_entropy(
            h, self.proj.weight, targets, self.group, self.vocab_size, reduction=reduction, backend=self.backend
        )
