"""Causal (or prefix-LM) self-attention with rotary (llama) or no (gpt2) position encoding and grouped-query heads.

q/k/v/o are separate nn.Linear projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`); the softmax core is its own
parameter-free module (`core`), so a parallelizer can recompute it alone (selective recomputation, Korthikanti et al.
2022) or run its dropout on a per-rank stream. The number of heads is read from the projections' output width at run
time: a tensor-parallel conversion that gives each rank a slice of the heads needs no change here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model import ops
from engine.model.layers import Dropout, RNGContext
from engine.model.shared_cast import shared_autocast_inputs


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the probabilities, through the backend switch."""

    def __init__(self, dropout: float, backend: str, window: int | None = None):
        super().__init__()
        self.dropout, self.backend, self.window = dropout, backend, window
        self.rng_context: RNGContext = contextlib.nullcontext

    def forward(self, q, k, v, mask=None, causal: bool = True, segment_ids=None, prefix_lengths=None):
        dropout_p = self.dropout if self.training else 0.0
        with self.rng_context() if dropout_p > 0 else contextlib.nullcontext():
            return ops.attention(
                q, k, v, causal=causal, mask=mask, dropout_p=dropout_p, backend=self.backend, segment_ids=segment_ids,
                window=self.window, prefix_lengths=prefix_lengths,
            )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope = cfg.arch == "llama"
        self.backend = cfg.kernels
        d, kv_width = cfg.d_model, cfg.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv_width, bias=bias)
        self.v_proj = nn.Linear(d, kv_width, bias=bias)
        self.core = AttentionCore(cfg.dropout, cfg.kernels, cfg.window or None)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`positions` (b, s): each token's rotary position (default 0..s-1); `segment_ids` (b, s): the document of
        each token, attention staying within one (packed sequences); `prefix_lengths` (b,): each row's prefix, seen
        by every query (prefix LM)."""
        b, s, _ = x.shape
        xq, xk, xv = shared_autocast_inputs(x, 3)  # one 16-bit copy of x kept for the three, not three
        q = self.q_proj(xq).view(b, s, -1, self.head_dim)
        k = self.k_proj(xk).view(b, s, -1, self.head_dim)
        v = self.v_proj(xv).view(b, s, -1, self.head_dim)
        if self.rope:  # cos, sin: (>= s, head_dim / 2) rotary tables
            if positions is None:
                cos, sin = cos[:s], sin[:s]
            q = ops.apply_rope(q, cos, sin, backend=self.backend, positions=positions)
            k = ops.apply_rope(k, cos, sin, backend=self.backend, positions=positions)
        # Passed only when set: a replaced core (context parallelism's) takes no prefix.
        extra = {} if prefix_lengths is None else {"prefix_lengths": prefix_lengths}
        y = self.core(q, k, v, mask, causal, segment_ids, **extra)
        return self.resid_dropout(self.o_proj(y.reshape(b, s, -1)))
