"""Decoder-only pre-norm transformer: Llama-style or GPT-2-style, with its shape arithmetic.

- arch "llama": RMSNorm, rotary positions, SwiGLU, grouped-query attention (`n_kv_heads`), no biases.
- arch "gpt2": LayerNorm with bias, learned absolute positions, GELU, biases everywhere (Radford et al. 2019).
Init follows Megatron-LM: weights ~ N(0, init_std), output projections (`o_proj`, `down_proj`) ~
N(0, init_std / sqrt(2 * n_layers)) (GPT-2 §2.3), biases 0, norm gains 1.

Seams for the parallel layers: `tok_emb`, `pos_emb`, `layers[i].attn.{q,k,v,o}_proj`,
`layers[i].mlp.{gate,up,down}_proj`, `norm`, `lm_head` (None when tied) are plain modules that can be swapped,
and `loss()` is one method a vocab-parallel cross-entropy can override.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ConfigError, ModelConfig
from engine.model import ops
from engine.model.attention import Attention
from engine.model.mlp import MLP


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 64, tp: int = 1) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of `multiple * tp` (Megatron's padding: each
    tensor-parallel shard of the embedding stays a multiple of `multiple` for efficient matmuls)."""
    if tokenizer_vocab < 1 or multiple < 1 or tp < 1:
        raise ConfigError(f"padded_vocab_size needs positive sizes, got vocab={tokenizer_vocab} {multiple=} {tp=}")
    step = multiple * tp
    return -(-tokenizer_vocab // step) * step


def resolve(cfg: ModelConfig, tokenizer_vocab: int | None = None, tp: int = 1) -> ModelConfig:
    """A validated copy of `cfg` with derived defaults filled in (the fields documented as "0: derive it").

    - n_kv_heads 0 -> n_heads;
    - ffn_hidden 0 -> 4 * d_model (gpt2), or 8/3 * d_model rounded up to a multiple of 64 (llama);
    - vocab_size 0 -> padded_vocab_size(tokenizer_vocab, 64, tp) (needs `tokenizer_vocab`).
    Raises ConfigError (one line, naming the key) for shapes the model cannot build.
    """
    c = dataclasses.replace(cfg)
    if c.arch not in ("llama", "gpt2"):
        raise ConfigError(f"model.arch must be llama or gpt2, got '{c.arch}'")
    ops.check_backend(c.kernels)
    if c.recompute not in ("none", "full", "selective"):
        raise ConfigError(f"model.recompute must be none|full|selective, got '{c.recompute}'")
    for key in ("n_layers", "d_model", "n_heads", "seq_len"):
        if getattr(c, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(c, key)}")
    for key in ("n_kv_heads", "ffn_hidden", "vocab_size"):
        if getattr(c, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0 (0 derives it), got {getattr(c, key)}")
    if c.d_model % c.n_heads:
        raise ConfigError(f"model.n_heads ({c.n_heads}) must divide model.d_model ({c.d_model})")
    if c.n_kv_heads == 0:
        c.n_kv_heads = c.n_heads
    if c.n_heads % c.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads ({c.n_kv_heads}) must divide model.n_heads ({c.n_heads})")
    head_dim = c.d_model // c.n_heads
    if c.arch == "llama" and head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dim, got d_model/n_heads = {head_dim}")
    if c.ffn_hidden == 0:
        c.ffn_hidden = 4 * c.d_model if c.arch == "gpt2" else -(-8 * c.d_model // (3 * 64)) * 64
    if c.vocab_size == 0:
        if tokenizer_vocab is None:
            raise ConfigError("model.vocab_size is 0 and no tokenizer vocabulary was given to derive it from")
        c.vocab_size = padded_vocab_size(tokenizer_vocab, 64, tp)
    elif tokenizer_vocab is not None and c.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size ({c.vocab_size}) is smaller than the tokenizer's ({tokenizer_vocab})")
    if c.vocab_size % tp:
        raise ConfigError(f"model.vocab_size ({c.vocab_size}) must be divisible by parallel.tp ({tp})")
    if tp > 1 and (c.n_heads % tp or c.n_kv_heads % tp):
        raise ConfigError(f"parallel.tp ({tp}) must divide model.n_heads ({c.n_heads}) and n_kv_heads ({c.n_kv_heads})")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {c.dropout}")
    for key in ("norm_eps", "init_std", "rope_theta"):
        if not getattr(c, key) > 0:
            raise ConfigError(f"model.{key} must be > 0, got {getattr(c, key)}")
    return c


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Closed-form parameter count of GPT(cfg) (cfg resolved), without building it; shared tensors once.

    non_embedding=True counts the transformer layers and final norm only, leaving out the vocabulary matrices
    (token embedding and output projection, tied or not) and learned positions: Kaplan et al. 2020's N.
    """
    d, f, v, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    kv = cfg.n_kv_heads * (d // cfg.n_heads)
    if cfg.arch == "llama":
        layer = (2 * d * d + 2 * d * kv) + 3 * d * f + 2 * d
        final_norm = d
    else:
        layer = (2 * d * d + 2 * d * kv + 2 * d + 2 * kv) + (2 * d * f + f + d) + 4 * d
        final_norm = 2 * d
    n = L * layer + final_norm
    if non_embedding:
        return n
    n += v * d if cfg.tie_embeddings else 2 * v * d
    if cfg.arch == "gpt2":
        n += cfg.seq_len * d
    return n


def flops_per_token(cfg: ModelConfig) -> int:
    """Model FLOPs per trained token, forward + backward: 6N + 12·L·H·Q·T (PaLM App. B; reference/methods.md §1.5).

    N counts every parameter that takes part in a matmul: the non-embedding parameters plus the output projection
    (vocab_size·d_model; the logits are real compute, as Megatron's 6·h·V term and nanoGPT's tied `wte` count them).
    The embedding lookup is not a matmul. Recomputation is not counted (this is the MFU numerator, not HFU).
    """
    cfg = resolve(cfg)
    head_dim = cfg.d_model // cfg.n_heads
    n = count_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim * cfg.seq_len


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm with bias (gpt2), through the backend switch."""

    def __init__(self, dim: int, kind: str, eps: float, backend: str):
        super().__init__()
        self.kind, self.eps, self.backend = kind, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = "rms" if cfg.arch == "llama" else "layer"
        self.attn_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x, cos=None, sin=None, mask=None, causal=True):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model. `cfg` is resolved here; `self.cfg` is the resolved copy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, "rms" if cfg.arch == "llama" else "layer", cfg.norm_eps, cfg.kernels)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.arch == "llama":
            cos, sin = ops.rope_cos_sin(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron init; draws from the default generator in module order, so a seed fixes the weights."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                leaf = name.rsplit(".", 2)[-2]
                nn.init.normal_(p, 0.0, out_std if leaf in ("o_proj", "down_proj") else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once; non_embedding: without the vocabulary matrices and positions
        (as `count_params`)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def hidden_states(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Final-norm hidden states (b, s, d) for token ids (b, s)."""
        s = tokens.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len {self.cfg.seq_len}")
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(s, device=tokens.device))
        x = self.emb_dropout(x)
        cos = self.rope_cos[:s] if self.rope_cos is not None else None
        sin = self.rope_sin[:s] if self.rope_sin is not None else None
        full = self.cfg.recompute == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if full:
                x = checkpoint(layer, x, cos, sin, mask, causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, causal)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.output_weight)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -100 (fp32 accumulation)."""
        return ops.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.output_weight, targets.reshape(-1), backend=self.cfg.kernels
        )

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Logits (b, s, vocab_size) for tokens (b, s), or the mean loss when `targets` (b, s) is given."""
        h = self.hidden_states(tokens, mask, causal)
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets)
