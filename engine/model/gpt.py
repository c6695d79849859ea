"""Decoder-only pre-norm transformer: Llama-style or GPT-2-style, with its shape arithmetic.

- arch "llama": RMSNorm, rotary positions, SwiGLU, grouped-query attention (`n_kv_heads`), no biases.
- arch "gpt2": LayerNorm with bias, learned absolute positions, GELU, biases everywhere (Radford et al. 2019).

The model is plain PyTorch: nn.Embedding, nn.Linear and norms, its layers in an nn.ModuleDict keyed by layer index
(a pipeline stage holds a subset) and the final norm, output projection and loss in their own module (`output`,
head.py). It holds no parallelism: `engine.parallel.parallelize_gpt` converts it from outside (tensor and sequence
parallelism, recomputation, data parallelism). Built under `torch.device("meta")` it allocates nothing and waits for
`materialize_` and `init_weights` (init.py: each parameter from a generator seeded by (seed, its name), so every
layout gets the same values); built otherwise it is allocated on the default device and initialised at once from
`seed` (default `torch.initial_seed()`), never drawing from torch's global generator.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from engine.config import ConfigError, ModelConfig
from engine.model import ops
from engine.model.attention import Attention
from engine.model.head import OutputHead
from engine.model.init import init_weights, materialize_
from engine.model.layers import Dropout, Norm
from engine.model.mlp import MLP


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 64, tp: int = 1) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of `multiple * tp` (Megatron's padding: each
    tensor-parallel shard of the embedding stays a multiple of `multiple` for efficient matmuls).

    `resolve` uses tp = 1 on purpose: a vocabulary that depended on tp would make every layout a different model
    (docs/contracts.md, "Layout invariance"); the vocab-parallel layers pad further to a multiple of tp with masked
    rows instead."""
    if tokenizer_vocab < 1 or multiple < 1 or tp < 1:
        raise ConfigError(f"padded_vocab_size needs positive sizes, got vocab={tokenizer_vocab} {multiple=} {tp=}")
    step = multiple * tp
    return -(-tokenizer_vocab // step) * step


def resolve(cfg: ModelConfig, tokenizer_vocab: int | None = None) -> ModelConfig:
    """A validated copy of `cfg` with derived defaults filled in (the fields documented as "0: derive it").

    - n_kv_heads 0 -> n_heads;
    - ffn_hidden 0 -> 4 * d_model (gpt2), or 8/3 * d_model rounded up to a multiple of 64 (llama);
    - vocab_size 0 -> padded_vocab_size(tokenizer_vocab, 64) (needs `tokenizer_vocab`; independent of tp, so every
      layout trains the same model).
    Raises ConfigError (one line, naming the key) for shapes the model cannot build.
    """
    c = dataclasses.replace(cfg)
    if c.arch not in ("llama", "gpt2", "t5"):
        raise ConfigError(f"model.arch must be llama, gpt2 or t5, got '{c.arch}'")
    ops.check_backend(c.kernels)
    if c.recompute not in ("none", "full", "selective"):
        raise ConfigError(f"model.recompute must be none|full|selective, got '{c.recompute}'")
    for key in ("n_layers", "d_model", "n_heads", "seq_len"):
        if getattr(c, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(c, key)}")
    if c.window < 0:
        raise ConfigError(f"model.window must be >= 0 (0: no sliding window), got {c.window}")
    if c.n_decoder_layers < 0:
        raise ConfigError(f"model.n_decoder_layers must be >= 0 (0: n_layers), got {c.n_decoder_layers}")
    if c.arch == "t5":
        c.n_decoder_layers = c.n_decoder_layers or c.n_layers
        if c.window:
            raise ConfigError("model.window (sliding-window attention) is not supported with model.arch t5")
    elif c.n_decoder_layers:
        raise ConfigError(f"model.n_decoder_layers applies to model.arch t5, not {c.arch}: leave it at 0")
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
    if c.arch in ("llama", "t5") and head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dim, got d_model/n_heads = {head_dim}")
    if c.ffn_hidden == 0:
        c.ffn_hidden = 4 * c.d_model if c.arch == "gpt2" else -(-8 * c.d_model // (3 * 64)) * 64  # llama, t5
    if c.vocab_size == 0:
        if tokenizer_vocab is None:
            raise ConfigError("model.vocab_size is 0 and no tokenizer vocabulary was given to derive it from")
        c.vocab_size = padded_vocab_size(tokenizer_vocab, 64)
    elif tokenizer_vocab is not None and c.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size ({c.vocab_size}) is smaller than the tokenizer's ({tokenizer_vocab})")
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
    t5: the encoder's layers and final norm, and the decoder's layers (each with a cross-attention and its norm).
    """
    d, f, v, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    kv = cfg.n_kv_heads * (d // cfg.n_heads)
    if cfg.arch in ("llama", "t5"):
        layer = (2 * d * d + 2 * d * kv) + 3 * d * f + 2 * d
        final_norm = d
    else:
        layer = (2 * d * d + 2 * d * kv + 2 * d + 2 * kv) + (2 * d * f + f + d) + 4 * d
        final_norm = 2 * d
    n = L * layer + final_norm
    if cfg.arch == "t5":  # the decoder: a cross-attention and its norm beside each layer; the encoder's final norm
        n += cfg.n_decoder_layers * (layer + (2 * d * d + 2 * d * kv) + d) + d
    if non_embedding:
        return n
    n += v * d if cfg.tie_embeddings else 2 * v * d
    if cfg.arch == "gpt2":
        n += cfg.seq_len * d
    return n


def flops_per_token(cfg: ModelConfig) -> int:
    """Model FLOPs per trained token, forward + backward: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022,
    App. B).

    N counts every parameter that takes part in a matmul: the non-embedding parameters plus the output projection
    (vocab_size·d_model; the logits are real compute, as Megatron's 6·h·V term and nanoGPT's tied `wte` count them).
    The embedding lookup is not a matmul. Recomputation is not counted (this is the MFU numerator, not HFU). With a
    sliding window, T is the window (when shorter than the sequence).
    """
    cfg = resolve(cfg)
    head_dim = cfg.d_model // cfg.n_heads
    n = count_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.d_model
    keys = min(cfg.seq_len, cfg.window) if cfg.window else cfg.seq_len  # a sliding window scores only its keys
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim * keys


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). `cfg` must be resolved."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = "rms" if cfg.arch == "llama" else "layer"
        self.attn_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x, cos=None, sin=None, mask=None, causal=True, positions=None, segment_ids=None,
                prefix_lengths=None):  # fmt: skip
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal, positions, segment_ids, prefix_lengths)
        return x + self.mlp(self.mlp_norm(x))


class PositionEmbedding(nn.Module):
    """Learned absolute positions (gpt2): the embedding of positions 0..s-1, broadcast over the batch, or of the
    given `positions` (b, s)."""

    def __init__(self, seq_len: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(seq_len, d_model))

    def forward(self, seq: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight[:seq] if positions is None else self.weight[positions]


class GPT(nn.Module):
    """Decoder-only language model. `cfg` is resolved here; `self.cfg` is the resolved copy.

    `forward(tokens)` gives logits (b, s, vocab_size); `forward(tokens, targets)` the mean loss over targets != -100
    (`reduction="sum"`: the sum of per-token losses). A chunk without `tok_emb` (a later pipeline stage) takes
    hidden states instead of token ids; one without `output` returns hidden states.
    """

    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        cfg = resolve(cfg)
        self.cfg = cfg
        target = torch.get_default_device()
        # Modules are built on meta (no torch.nn default init drawn from the global generator), then allocated on
        # the current default device and initialised once, per parameter; under `torch.device("meta")` they wait.
        with torch.device("meta"):
            self._build(cfg)
        if target.type != "meta":
            materialize_(self, target)
            init_weights(self, torch.initial_seed() if seed is None else seed)

    def _build(self, cfg: ModelConfig) -> None:
        d, V = cfg.d_model, cfg.vocab_size
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = PositionEmbedding(cfg.seq_len, d) if cfg.arch == "gpt2" else None
        self.emb_dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.output = OutputHead(cfg)
        if cfg.tie_embeddings:
            self.output.proj.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            self.register_buffer("rope_cos", torch.empty(cfg.seq_len, d // cfg.n_heads // 2), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.seq_len, d // cfg.n_heads // 2), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    @property
    def tied_aliases(self) -> dict[str, str]:
        """Names a tied weight may appear under in a chunk that lacks its first owner -> its one canonical name."""
        return {"output.proj.weight": "tok_emb.weight"} if self.cfg.tie_embeddings else {}

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recomputes the non-persistent buffers (rotary angles) on their device, e.g. after `to_empty`."""
        if self.rope_cos is not None and not self.rope_cos.is_meta:
            cos, sin = ops.rope_cos_sin(self.cfg.seq_len, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @property
    def lm_head(self) -> nn.Linear | None:
        """The untied output projection (None when tied to the embedding)."""
        return None if self.output is None or self.cfg.tie_embeddings else self.output.proj

    @property
    def output_weight(self) -> torch.Tensor:
        return self.output.proj.weight

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters this module holds, each shared tensor once; non_embedding: without the vocabulary matrices and
        positions (as `count_params`). After tensor parallelism: this rank's local slices (with vocabulary padding)."""
        seen = {id(p): p for p in self.parameters()}
        if non_embedding:
            for m in (self.tok_emb, self.pos_emb, self.output.proj if self.output is not None else None):
                if m is not None:
                    seen.pop(id(m.weight), None)
        return sum(p.numel() for p in seen.values())

    def hidden_states(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream after the last layer held here (before the final norm), (b, s, d) for token ids
        (b, s); a chunk without `tok_emb` takes hidden states (b, s, d) as `tokens`. `positions` (b, s): each token's
        position (default 0..s-1; per-document positions, or a context-parallel rank's chunks); `segment_ids`
        (b, s): each token's document, attention staying inside it; `prefix_lengths` (b,): each row's prefix, which
        every query sees (prefix LM)."""
        s = tokens.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len {self.cfg.seq_len}")
        x = tokens
        if self.tok_emb is not None:
            x = self.tok_emb(tokens)
            if self.pos_emb is not None:
                x = x + self.pos_emb(s, positions)
            x = self.emb_dropout(x)
        # The whole rotary tables: attention slices them to the sequence it sees (the full one, even where this chunk's
        # input is a sequence shard, as a later pipeline stage's is under sequence parallelism).
        cos, sin = self.rope_cos, self.rope_sin
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask, causal, positions, segment_ids, prefix_lengths)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        reduction: str = "mean",
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.hidden_states(tokens, mask, causal, positions, segment_ids, prefix_lengths)
        if self.output is None:
            return h
        return self.output(h, targets, reduction)
