"""Encoder-decoder transformer (`--model.arch t5`; Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", sec. 3.1.1 and Fig. 4 left; Vaswani et al. 2017) built from the engine's
decoder-only blocks, for the span-corruption and UL2 objectives (engine/objectives).

- Encoder: `n_layers` Llama-style blocks (gpt.py `Block`: RMSNorm, SwiGLU, grouped-query attention) run without the
  causal mask, so every input token sees every other; then a final RMSNorm (T5 normalises the encoder's output
  before the decoder reads it).
- Decoder: `n_decoder_layers` blocks (0: n_layers) of causal self-attention, then cross-attention (queries from the
  decoder, keys and values from the encoder's output), then the MLP, each a pre-norm residual branch.
- One token embedding shared by encoder and decoder, and the output head of the decoder-only model (head.py: the
  final norm, the projection tied to the embedding by default, the loss); the loss is over the decoder's targets.
- Positions: rotary embeddings on the self-attention of both stacks (each counts its own positions from 0); no
  position signal in the cross-attention, which relates two different sequences (T5 has none there either; its
  relative-position bias is not used). The decoder may be longer than `seq_len` (UL2's extreme denoisers give it
  about as many tokens as the encoder, plus one): its rotary table is then computed for the call.

The decoder's inputs are the targets shifted right behind a start id; the objective builds them (they are data) and
they reach the model as the keyword `decoder_inputs`, as the trainer passes every per-row keyword of an objective.
All projections are nn.Linear under the names tensor parallelism addresses in the decoder-only model (`q_proj`,
`k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`; the cross-attention under `cross_attn`), and
every parameter is initialised from its own (seed, name) generator (init.py), `o_proj` and `down_proj` of every
residual branch with std init_std / sqrt(2 n_layers), n_layers being the encoder's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from engine.config import Config, ConfigError, ModelConfig
from engine.model import ops
from engine.model.attention import Attention
from engine.model.gpt import GPT, Block
from engine.model.head import OutputHead
from engine.model.layers import Dropout, Norm
from engine.model.mlp import MLP
from engine.model.shared_cast import shared_autocast_inputs
from engine.objectives.sample_objective import ENCODER_DECODER_OBJECTIVES


def check_encoder_decoder(cfg: Config) -> None:
    """Refuses, in one line, an objective the arch cannot run (span and ul2 need the encoder-decoder; it trains only
    with them) and the layouts and data options the encoder-decoder does not support yet."""
    objective, arch, p = cfg.train.objective, cfg.model.arch, cfg.parallel
    if objective in ENCODER_DECODER_OBJECTIVES and arch != "t5":
        raise ConfigError(f"train.objective {objective} trains an encoder-decoder: use --model.arch t5 (or "
                          f"--train.objective prefix for a decoder-only {arch} model)")  # fmt: skip
    if arch != "t5":
        return
    if objective not in ENCODER_DECODER_OBJECTIVES:
        raise ConfigError(f"model.arch t5 (an encoder-decoder) trains with train.objective span or ul2, not "
                          f"{objective}: use --model.arch llama for {objective}")  # fmt: skip
    if p.pp > 1:
        raise ConfigError("model.arch t5 with parallel.pp > 1 is not supported yet: use tp, sp, cp, dp or dp_shard")
    if cfg.data.document_mask or cfg.data.reset_positions:
        raise ConfigError("model.arch t5 does not support data.document_mask or data.reset_positions: each sample "
                          "is one denoising task")  # fmt: skip


def block_config(cfg: ModelConfig) -> ModelConfig:
    """The config the blocks of a t5 model are built from: Llama-style blocks (RMSNorm, rotary, SwiGLU, no biases)."""
    return dataclasses.replace(cfg, arch="llama")


class CrossAttention(Attention):
    """Attention whose queries come from `x` (b, t, d) and keys and values from `memory` (b, s, d), every key
    visible to every query, no rotary positions. Same projections and names as `Attention`."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, t, _ = x.shape
        [xq] = shared_autocast_inputs(x, 1)  # F.linear's cast, or the one sequence parallelism made (regather)
        q = self.q_proj(xq).view(b, t, -1, self.head_dim)
        mk, mv = shared_autocast_inputs(memory, 2)  # one 16-bit copy of the encoder output for k and v
        k = self.k_proj(mk).view(b, memory.shape[1], -1, self.head_dim)
        v = self.v_proj(mv).view(b, memory.shape[1], -1, self.head_dim)
        y = self.core(q, k, v, None, False)
        return self.resid_dropout(self.o_proj(y.reshape(b, t, -1)))


class DecoderBlock(nn.Module):
    """x + self_attn(norm(x)) causal, then x + cross_attn(norm(x), memory), then x + mlp(norm(x)). `cfg`: the blocks'
    (block_config)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg)
        self.cross_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.cross_attn = CrossAttention(cfg)
        self.mlp_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        x = x + self.attn(self.attn_norm(x), cos, sin, None, True, positions)
        x = x + self.cross_attn(self.cross_norm(x), memory)
        return x + self.mlp(self.mlp_norm(x))


class EncoderDecoder(GPT):
    """The t5 model. `forward(tokens, targets, decoder_inputs=...)`: `tokens` (b, s) the encoder's input,
    `decoder_inputs` (b, t) the decoder's, `targets` (b, t) what each decoder position predicts (-100: no loss); the
    mean loss (`reduction="sum"`: the sum of per-token losses), or logits (b, t, vocab) without targets. `cfg` is
    resolved here (arch t5); the parameters are those of `encoder_layers`, `encoder_norm`, `decoder_layers`, the
    shared `tok_emb` and `output`."""

    def _build(self, cfg: ModelConfig) -> None:
        blocks = block_config(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = None
        self.emb_dropout = Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleDict({str(i): Block(blocks) for i in range(cfg.n_layers)})
        self.encoder_norm = Norm(cfg.d_model, "rms", cfg.norm_eps, cfg.kernels)
        self.decoder_layers = nn.ModuleDict({str(i): DecoderBlock(blocks) for i in range(cfg.n_decoder_layers)})
        self.output = OutputHead(blocks)
        if cfg.tie_embeddings:
            self.output.proj.weight = self.tok_emb.weight
        half = cfg.d_model // cfg.n_heads // 2
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, half), persistent=False)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """Every block, encoder's then decoder's, for the passes that treat each block alike (recomputation)."""
        return {f"encoder.{k}": v for k, v in self.encoder_layers.items()} | {
            f"decoder.{k}": v for k, v in self.decoder_layers.items()
        }

    def _rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables covering n positions: the stored ones, or for a longer decoder, computed for this call."""
        if n <= self.rope_cos.shape[0]:
            return self.rope_cos, self.rope_sin
        return ops.rope_cos_sin(n, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, self.rope_cos.device)

    def encode(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's normalised output (b, s, d) for input ids (b, s), attended bidirectionally. `positions`
        (b, s): each token's position (default 0..s-1; a context-parallel rank's chunks)."""
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"encoder input length {tokens.shape[1]} exceeds model.seq_len {self.cfg.seq_len}")
        x = self.emb_dropout(self.tok_emb(tokens))
        for layer in self.encoder_layers.values():
            x = layer(x, self.rope_cos, self.rope_sin, None, False, positions)
        return self.encoder_norm(x)

    def decode(self, decoder_inputs: torch.Tensor, memory: torch.Tensor,
               positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The decoder's last hidden states (b, t, d), before the output head's norm. `positions` (b, t): each
        decoder token's position (default 0..t-1)."""
        n = decoder_inputs.shape[1] if positions is None else int(positions.max()) + 1
        cos, sin = self._rope(n)
        x = self.emb_dropout(self.tok_emb(decoder_inputs))
        for layer in self.decoder_layers.values():
            x = layer(x, memory, cos, sin, positions)
        return x

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        raise ValueError("the t5 model has two stacks: use encode(tokens) and decode(decoder_inputs, memory)")

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        decoder_inputs: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        decoder_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`positions`, `decoder_positions`: the encoder's and the decoder's token positions, where a rank holds
        chunks of each sequence (context parallelism); default 0..length-1."""
        if decoder_inputs is None:
            raise ValueError("the t5 model needs decoder_inputs (the targets shifted right behind a start id)")
        if targets is not None and targets.shape != decoder_inputs.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and decoder_inputs {tuple(decoder_inputs.shape)} differ")
        memory = self.encode(tokens, positions)
        return self.output(self.decode(decoder_inputs, memory, decoder_positions), targets, reduction)
