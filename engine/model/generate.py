"""Autoregressive sampling from a GPT: greedy, temperature and top-k (Fan et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    tokens: torch.Tensor,
    max_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Appends up to `max_new` sampled tokens to `tokens` (b, s) and returns (b, s + n).

    temperature 0 is greedy (argmax); top_k keeps the k most likely tokens before sampling. The context is cropped to
    the model's last `cfg.seq_len` tokens (no KV cache: the tiny models this serves recompute the prefix cheaply).
    With `eos_id`, stops once every row has produced it. The model is run in eval mode and restored afterwards.
    """
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"generate needs a (batch, seq) prompt with seq >= 1, got shape {tuple(tokens.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    seq_len = model.cfg.seq_len
    was_training = model.training
    model.eval()
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    try:
        for _ in range(max_new):
            logits = model(tokens[:, -seq_len:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat((tokens, nxt), dim=1)
            if eos_id is not None:
                done |= nxt.squeeze(1) == eos_id
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return tokens
