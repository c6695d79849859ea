"""Feed-forward blocks: SwiGLU (llama; Shazeer 2020) and GELU (gpt2).

Projections are separate named layers (`gate_proj`, `up_proj` column-parallel seams; `down_proj` row-parallel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model import ops


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        self.backend = cfg.kernels
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's tanh approximation
        return self.dropout(self.down_proj(h))
