"""Causal self-attention with rotary (llama) or no (gpt2) position encoding and grouped-query heads.

q/k/v/o are separate named projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) so the tensor-parallel layers can
replace them (column-parallel q/k/v, row-parallel o). The number of local heads is read from the projections' output
width at run time, so the same module serves any tensor-parallel degree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.model import ops


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope = cfg.arch == "llama"
        self.backend = cfg.kernels
        self.dropout = cfg.dropout
        self.selective_recompute = cfg.recompute == "selective"
        kv_width = cfg.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.rope:
            q = ops.apply_rope(q, cos, sin, backend=self.backend)
            k = ops.apply_rope(k, cos, sin, backend=self.backend)
        dropout_p = self.dropout if self.training else 0.0
        if self.selective_recompute and torch.is_grad_enabled():
            # Recompute only the attention core in backward (Korthikanti et al. 2022, "selective recomputation").
            y = checkpoint(self._core, q, k, v, mask, causal, dropout_p, use_reentrant=False)
        else:
            y = self._core(q, k, v, mask, causal, dropout_p)
        return self.resid_dropout(self.o_proj(y.reshape(b, s, -1)))

    def _core(self, q, k, v, mask, causal, dropout_p):
        return ops.attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p, backend=self.backend)
