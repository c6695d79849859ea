"""Feed-forward blocks: SwiGLU (llama; Shazeer 2020) and GELU (gpt2).

Projections are separate named layers. With a tensor-parallel group of size > 1, `gate_proj` and `up_proj` are
column-parallel and `down_proj` row-parallel: the hidden dimension is split over tp (Shoeybi et al. 2019, sec. 3),
so the activation needs no communication and the block costs one all-reduce forward and one backward (with sequence
parallelism an all-gather and a reduce-scatter each instead).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model import ops
from engine.parallel.random import RNGStatesTracker, maybe_fork
from engine.parallel.tensor import ColumnParallelLinear, RowParallelLinear, enter_tp_region


class MLP(nn.Module):
    """`tp_group` None (or of size 1): plain nn.Linear projections; otherwise the tp layers over that group."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        rng_tracker: RNGStatesTracker | None = None,
    ):
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        self.backend = cfg.kernels
        d, f = cfg.d_model, cfg.ffn_hidden
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_group = tp_group if tp > 1 else None
        self.sequence_parallel = sequence_parallel and tp > 1
        self.rng_tracker = rng_tracker if tp > 1 else None  # dropout on sequence shards (sp) draws per tp rank
        if self.tp_group is None:
            if self.gated:
                self.gate_proj = nn.Linear(d, f, bias=False)
            self.up_proj = nn.Linear(d, f, bias=bias)
            self.down_proj = nn.Linear(f, d, bias=bias)
        else:
            kw = dict(sequence_parallel=self.sequence_parallel, group=tp_group)
            if self.gated:
                self.gate_proj = ColumnParallelLinear(d, f, False, skip_input_comm=True, **kw)
            self.up_proj = ColumnParallelLinear(d, f, bias, skip_input_comm=True, **kw)
            self.down_proj = RowParallelLinear(f, d, bias, **kw)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:  # once for gate and up
            x = enter_tp_region(x, self.tp_group, self.sequence_parallel)
        if self.gated:
            h = ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's tanh approximation
        y = self.down_proj(h)
        with maybe_fork(self.rng_tracker, self.sequence_parallel and self.training and self.dropout.p > 0):
            return self.dropout(y)
