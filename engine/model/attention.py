"""Causal self-attention with rotary (llama) or no (gpt2) position encoding and grouped-query heads.

q/k/v/o are separate named projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`). With a tensor-parallel group of
size > 1 (Megatron, Shoeybi et al. 2019 sec. 3) q/k/v are column-parallel (each rank holds n_heads / tp query heads
and their kv heads; with fewer kv heads than ranks, `ReplicatedKVLinear` keeps the one kv head this rank's q heads
use) and o is row-parallel; the input enters the tp region once (one all-reduce in backward, or with sequence
parallelism one all-gather forward) and o's output leaves it (all-reduce, or reduce-scatter along the sequence).
The number of local heads is read from the projections' output width at run time. Masks must broadcast over heads
(a heads dim of 1) under tp: each rank holds only its heads. Dropout under tp: the attention probabilities (this
rank's heads) and, with sp, the output (this rank's tokens) draw from the model's per-tp-rank stream (`rng_tracker`);
without sp the output is replicated over tp and draws from the default generator, the same mask on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.model import ops
from engine.parallel.random import RNGStatesTracker, maybe_fork, recompute_context_fn
from engine.parallel.tensor import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    attention_heads_per_rank,
    enter_tp_region,
)


class Attention(nn.Module):
    """`tp_group` None (or of size 1): plain nn.Linear projections. Otherwise the tp layers over that group, with
    `sequence_parallel`: input and output are this rank's (b, s / tp, d) sequence shard."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        rng_tracker: RNGStatesTracker | None = None,
    ):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope = cfg.arch == "llama"
        self.backend = cfg.kernels
        self.dropout = cfg.dropout
        self.selective_recompute = cfg.recompute == "selective"
        d, kv_width = cfg.d_model, cfg.n_kv_heads * self.head_dim
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_group = tp_group if tp > 1 else None
        self.sequence_parallel = sequence_parallel and tp > 1
        self.rng_tracker = rng_tracker if tp > 1 else None
        if self.tp_group is None:
            self.q_proj = nn.Linear(d, d, bias=bias)
            self.k_proj = nn.Linear(d, kv_width, bias=bias)
            self.v_proj = nn.Linear(d, kv_width, bias=bias)
            self.o_proj = nn.Linear(d, d, bias=bias)
        else:
            _, _, kv_replicated = attention_heads_per_rank(cfg.n_heads, cfg.n_kv_heads, tp)
            kw = dict(sequence_parallel=self.sequence_parallel, group=tp_group)
            self.q_proj = ColumnParallelLinear(d, d, bias, skip_input_comm=True, **kw)
            # Built in the unsharded model's order (q, k, v, o), each drawing its full weight: same RNG stream.
            if kv_replicated:
                self.k_proj = ReplicatedKVLinear(d, cfg.n_kv_heads, self.head_dim, bias, skip_input_comm=True, **kw)
                self.v_proj = ReplicatedKVLinear(d, cfg.n_kv_heads, self.head_dim, bias, skip_input_comm=True, **kw)
            else:
                self.k_proj = ColumnParallelLinear(d, kv_width, bias, skip_input_comm=True, **kw)
                self.v_proj = ColumnParallelLinear(d, kv_width, bias, skip_input_comm=True, **kw)
            self.o_proj = RowParallelLinear(d, d, bias, **kw)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        if self.tp_group is not None:  # once for q, k and v (they are built with skip_input_comm)
            x = enter_tp_region(x, self.tp_group, self.sequence_parallel)
        b, s, _ = x.shape  # the full sequence under SP (after the all-gather)
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.rope:
            q = ops.apply_rope(q, cos, sin, backend=self.backend)
            k = ops.apply_rope(k, cos, sin, backend=self.backend)
        dropout_p = self.dropout if self.training else 0.0
        if self.selective_recompute and torch.is_grad_enabled():
            # Recompute only the attention core in backward (Korthikanti et al. 2022, "selective recomputation").
            y = checkpoint(
                self._core,
                q, k, v, mask, causal, dropout_p,
                use_reentrant=False,
                context_fn=recompute_context_fn(self.rng_tracker),
            )  # fmt: skip
        else:
            y = self._core(q, k, v, mask, causal, dropout_p)
        y = self.o_proj(y.reshape(b, s, -1))
        with maybe_fork(self.rng_tracker, self.sequence_parallel and self.training and self.dropout > 0):
            return self.resid_dropout(y)

    def _core(self, q, k, v, mask, causal, dropout_p):
        with maybe_fork(self.rng_tracker, dropout_p > 0):  # this rank's heads: its own stream
            return ops.attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p, backend=self.backend)
