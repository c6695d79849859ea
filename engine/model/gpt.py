"""Decoder-only pre-norm transformer: Llama-style or GPT-2-style, with its shape arithmetic.

- arch "llama": RMSNorm, rotary positions, SwiGLU, grouped-query attention (`n_kv_heads`), no biases.
- arch "gpt2": LayerNorm with bias, learned absolute positions, GELU, biases everywhere (Radford et al. 2019).
Init follows Megatron-LM: weights ~ N(0, init_std), output projections (`o_proj`, `down_proj`) ~
N(0, init_std / sqrt(2 * n_layers)) (GPT-2 §2.3), biases 0, norm gains 1.

Tensor parallelism (`GPT(cfg, tp_group=g, sequence_parallel=sp)` with g of size > 1; Megatron-LM, Shoeybi et al.
2019; sequence parallelism, Korthikanti et al. 2022): `tok_emb` is a VocabParallelEmbedding, attention and MLP use
column/row-parallel projections (attention.py, mlp.py), an untied `lm_head` is a vocab-parallel ColumnParallelLinear,
and the loss is the vocab-parallel cross-entropy (no rank holds the full logits). With `sp` the residual stream,
norms, dropout and learned positions live on this rank's s / tp tokens. Every parameter is initialised from the
same full tensor the unsharded model draws (`init_param_`), so a seed gives the same model in every layout. After
backward a trainer must call `engine.parallel.grads.finish_tp_grads` (see there). tp_group None or of size 1 builds
the plain nn.Linear / nn.Embedding model.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ConfigError, ModelConfig
from engine.model import ops
from engine.model.attention import Attention
from engine.model.mlp import MLP
from engine.parallel.random import TP_SEED_OFFSET, RNGStatesTracker, init_param_, maybe_fork, recompute_context_fn
from engine.parallel.sequence import mark_sequence_parallel
from engine.parallel.tensor import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    check_tp_divisibility,
    enter_tp_region,
    gather_from_tp_region,
    parallel_lm_logits,
)


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 64, tp: int = 1) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of `multiple * tp` (Megatron's padding: each
    tensor-parallel shard of the embedding stays a multiple of `multiple` for efficient matmuls).

    `resolve` uses tp = 1 on purpose: a vocabulary that depended on tp would make every layout a different model
    (DESIGN.md contract 1); the vocab-parallel layers pad further to a multiple of tp with masked rows instead."""
    if tokenizer_vocab < 1 or multiple < 1 or tp < 1:
        raise ConfigError(f"padded_vocab_size needs positive sizes, got vocab={tokenizer_vocab} {multiple=} {tp=}")
    step = multiple * tp
    return -(-tokenizer_vocab // step) * step


def resolve(
    cfg: ModelConfig, tokenizer_vocab: int | None = None, tp: int = 1, sequence_parallel: bool = False
) -> ModelConfig:
    """A validated copy of `cfg` with derived defaults filled in (the fields documented as "0: derive it").

    - n_kv_heads 0 -> n_heads;
    - ffn_hidden 0 -> 4 * d_model (gpt2), or 8/3 * d_model rounded up to a multiple of 64 (llama);
    - vocab_size 0 -> padded_vocab_size(tokenizer_vocab, 64) (needs `tokenizer_vocab`; independent of tp, so every
      layout trains the same model).
    `tp` > 1 checks that the shape splits over tp ranks (heads, kv heads, ffn_hidden; with `sequence_parallel` also
    seq_len). Raises ConfigError (one line, naming the key) for shapes the model cannot build.
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
        c.vocab_size = padded_vocab_size(tokenizer_vocab, 64)
    elif tokenizer_vocab is not None and c.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size ({c.vocab_size}) is smaller than the tokenizer's ({tokenizer_vocab})")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"parallel.tp must be a positive integer, got {tp!r}")
    if tp > 1:
        try:
            check_tp_divisibility(c.n_heads, c.n_kv_heads, c.ffn_hidden, tp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if sequence_parallel and c.seq_len % tp:
            raise ConfigError(
                f"model.seq_len = {c.seq_len} is not divisible by parallel.tp = {tp} (needed with parallel.sp = true)"
            )
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
    """RMSNorm (llama) or LayerNorm with bias (gpt2), through the backend switch. `sequence_parallel`: it runs on
    sequence shards, so its parameters' gradients are partial sums over tp (marked for `finish_tp_grads`)."""

    def __init__(self, dim: int, kind: str, eps: float, backend: str, sequence_parallel: bool = False):
        super().__init__()
        self.kind, self.eps, self.backend = kind, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None
        if sequence_parallel:
            mark_sequence_parallel(*(p for p in (self.weight, self.bias) if p is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


def _tp_size(tp_group: dist.ProcessGroup | None) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). With tp: 2 all-reduces forward (attention
    and MLP outputs) and 2 backward (their inputs); with sp an all-gather and a reduce-scatter each instead, and x is
    this rank's sequence shard. `cfg` must be resolved."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        rng_tracker: RNGStatesTracker | None = None,
    ):
        super().__init__()
        kind = "rms" if cfg.arch == "llama" else "layer"
        sp = sequence_parallel and _tp_size(tp_group) > 1
        self.attn_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels, sp)
        self.attn = Attention(cfg, tp_group, sp, rng_tracker)
        self.mlp_norm = Norm(cfg.d_model, kind, cfg.norm_eps, cfg.kernels, sp)
        self.mlp = MLP(cfg, tp_group, sp, rng_tracker)

    def forward(self, x, cos=None, sin=None, mask=None, causal=True):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model. `cfg` is resolved here; `self.cfg` is the resolved copy.

    `tp_group`: the tensor-parallel process group (e.g. `engine.parallel.get_tp_group()`); None or a group of one
    rank builds the plain model. `sequence_parallel` (only with tp > 1): shard the residual stream over the sequence.
    Under tp every rank gets the same full `tokens`/`targets` and returns the same loss; parameters are this rank's
    shards (`engine.parallel.tensor.gather_full` rebuilds a full tensor). Seed every rank alike (`torch.manual_seed`)
    before building: the weights are drawn from the default generator. Dropout in regions that differ per tp rank
    draws from `self.rng_tracker` (stream "tp", seeded `torch.initial_seed() + 2718 + tp_rank` as Megatron); a
    checkpoint that must resume dropout exactly saves `rng_tracker.get_states()`.
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        tp = _tp_size(tp_group)
        cfg = resolve(cfg, tp=tp, sequence_parallel=sequence_parallel)
        self.cfg = cfg
        self.tp_group = tp_group if tp > 1 else None
        self.sequence_parallel = sp = sequence_parallel and tp > 1
        self.rng_tracker = None
        if tp > 1:
            self.rng_tracker = RNGStatesTracker()
            self.rng_tracker.add("tp", torch.initial_seed() + TP_SEED_OFFSET + dist.get_rank(tp_group))
        d, V = cfg.d_model, cfg.vocab_size
        if self.tp_group is None:
            self.tok_emb = nn.Embedding(V, d)
        else:
            self.tok_emb = VocabParallelEmbedding(V, d, sequence_parallel=sp, group=tp_group)
        self.pos_emb = nn.Embedding(cfg.seq_len, d) if cfg.arch == "gpt2" else None
        if self.pos_emb is not None and sp:
            mark_sequence_parallel(self.pos_emb.weight)  # each rank adds (and gets gradient for) its positions only
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, self.tp_group, sp, self.rng_tracker) for _ in range(cfg.n_layers))
        self.norm = Norm(d, "rms" if cfg.arch == "llama" else "layer", cfg.norm_eps, cfg.kernels, sp)
        if cfg.tie_embeddings:
            self.lm_head = None
        elif self.tp_group is None:
            self.lm_head = nn.Linear(d, V, bias=False)
        else:  # vocab-parallel output layer; its padding columns are masked in the loss
            self.lm_head = ColumnParallelLinear(d, V, False, pad_output=True, sequence_parallel=sp, group=tp_group)
        if cfg.arch == "llama":
            cos, sin = ops.rope_cos_sin(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron init; draws from the default generator in module order, so a seed fixes the weights.

        A tp-sharded parameter draws its full unsharded tensor and keeps its slice (`init_param_`), and the layers'
        constructors drew full tensors too, so every layout consumes the same stream and gets the same model.
        """
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                leaf = name.rsplit(".", 2)[-2]
                s = out_std if leaf in ("o_proj", "down_proj") else std
                init_param_(p, lambda t, s=s: nn.init.normal_(t, 0.0, s))
            elif name.endswith("bias"):
                init_param_(p, nn.init.zeros_)
            else:
                init_param_(p, nn.init.ones_)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once; non_embedding: without the vocabulary matrices and positions
        (as `count_params`). Under tp: this rank's (sharded parameters count their local slice, with padding)."""
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
        """Final-norm hidden states (b, s, d) for token ids (b, s); under sequence parallelism this rank's
        (b, s / tp, d) shard, positions [rank * s / tp, (rank + 1) * s / tp)."""
        s = tokens.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len {self.cfg.seq_len}")
        positions = torch.arange(s, device=tokens.device)
        if self.sequence_parallel:
            tp = dist.get_world_size(self.tp_group)
            if s % tp:
                raise ValueError(f"sequence length {s} is not divisible by parallel.tp = {tp} (sequence parallelism)")
            positions = positions.chunk(tp)[dist.get_rank(self.tp_group)]
        x = self.tok_emb(tokens)  # under SP the embedding's reduce-scatter leaves this rank's sequence shard
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        with maybe_fork(self.rng_tracker, self.sequence_parallel and self.training and self.cfg.dropout > 0):
            x = self.emb_dropout(x)
        # RoPE needs the full sequence's angles even under SP: attention runs after the all-gather.
        cos = self.rope_cos[:s] if self.rope_cos is not None else None
        sin = self.rope_sin[:s] if self.rope_sin is not None else None
        full = self.cfg.recompute == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if full:
                x = checkpoint(
                    layer, x, cos, sin, mask, causal,
                    use_reentrant=False,
                    context_fn=recompute_context_fn(self.rng_tracker),
                )  # fmt: skip
            else:
                x = layer(x, cos, sin, mask, causal)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits (b, s, vocab_size) from `hidden_states`; under tp gathered from the vocab shards."""
        if self.tp_group is None:
            return nn.functional.linear(h, self.output_weight)
        local = parallel_lm_logits(h, self.output_weight, self.tp_group, self.sequence_parallel)
        return gather_from_tp_region(local, self.tp_group)[..., : self.cfg.vocab_size]

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -100 (fp32 accumulation). Under tp: logits stay split over the
        vocabulary (b, s, V_padded / tp) and the vocab-parallel cross-entropy masks the padding columns."""
        if self.tp_group is not None:
            h = enter_tp_region(h, self.tp_group, self.sequence_parallel)  # SP: the all-gather of the sequence
            return ops.vocab_parallel_linear_cross_entropy(
                h, self.output_weight, targets, self.tp_group, self.cfg.vocab_size, backend=self.cfg.kernels
            )
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
