"""Small building blocks of the plain model: the norm and the dropout whose random stream can be redirected.

`Dropout.rng_context` and `AttentionCore.rng_context` (attention.py) are zero-argument callables returning a context
manager that the random draw runs in; the plain model's is a no-op (the default generator). A parallelizer that
splits a region's activations over ranks (attention heads, sequence shards) sets it to a fork of a per-rank stream,
so the model itself knows nothing about parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from engine.model import ops

RNGContext = Callable[[], contextlib.AbstractContextManager]


class Norm(nn.Module):
    """RMSNorm (`kind` "rms", Zhang & Sennrich 2019) or LayerNorm with bias ("layer", Ba et al. 2016) over the last
    dim, through the kernel backend switch (`backend`: auto|torch|triton)."""

    def __init__(self, dim: int, kind: str, eps: float, backend: str = "auto"):
        super().__init__()
        if kind not in ("rms", "layer"):
            raise ValueError(f"Norm kind must be rms or layer, got {kind!r}")
        self.kind, self.eps, self.backend = kind, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kind={self.kind}, eps={self.eps}"


class Dropout(nn.Dropout):
    """nn.Dropout whose mask is drawn inside `self.rng_context()` (a no-op unless a parallelizer sets it)."""

    def __init__(self, p: float = 0.0):
        super().__init__(p)
        self.rng_context: RNGContext = contextlib.nullcontext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        with self.rng_context():
            return super().forward(x)
