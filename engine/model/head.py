"""The output head: final norm, output projection and the language-model loss, in one module.

It is separate from the layers so that a model chunk without it (a pipeline stage that is not the last) returns
hidden states, and so that a parallelizer can replace it whole (tensor parallelism swaps in a vocabulary-parallel
head that never gathers the logits). With tied embeddings `proj.weight` is the token embedding's tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.model import ops
from engine.model.layers import Norm

IGNORE_INDEX = -100


class OutputHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = "rms" if cfg.arch == "llama" else "layer"
        self.norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.vocab_size, self.backend = cfg.vocab_size, cfg.kernels

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (b, s, vocab) from pre-norm hidden states (b, s, d), or the loss against `targets` (b, s).

        reduction "mean": over targets != -100 (fp32 accumulation); "sum": the sum of per-token losses, for a
        trainer that divides by the loss-bearing tokens of the whole global batch.
        """
        h = self.norm(h)
        if targets is None:
            return F.linear(h, self.proj.weight)
        return ops.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.proj.weight, targets.reshape(-1), reduction=reduction, backend=self.backend
        )
