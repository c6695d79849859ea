"""Feed-forward blocks: SwiGLU (llama; Shazeer 2020) and GELU (gpt2), each projection a named nn.Linear
(`gate_proj`, `up_proj`, `down_proj`), so a tensor-parallel plan can address them by name."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model import ops
from engine.model.layers import Dropout
from engine.model.shared_cast import shared_autocast_inputs


class SwiGLU(nn.Module):
    """silu(gate) * up (Shazeer 2020), a module of its own so that selective recomputation can address its output."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up, backend=self.backend)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        d, f = cfg.d_model, cfg.ffn_hidden
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act = SwiGLU(cfg.kernels) if self.gated else nn.GELU(approximate="tanh")  # GPT-2's tanh approximation
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            xg, xu = shared_autocast_inputs(x, 2)  # one 16-bit copy of x kept for gate and up, not two
            h = self.act(self.gate_proj(xg), self.up_proj(xu))
        else:
            [xu] = shared_autocast_inputs(x, 1)  # F.linear's cast, or the one sequence parallelism made (regather)
            h = self.act(self.up_proj(xu))
        return self.dropout(self.down_proj(h))
