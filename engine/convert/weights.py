"""Tensor names and layouts: a Hugging Face Llama or GPT-2 state dict <-> ours (`engine.model.GPT`).

Llama maps one to one, with no permutation: Hugging Face's Llama applies RoPE in the half-rotation ("rotate_half")
layout, pairing dimension i with i + head_dim/2, and so does ours (`engine.model.ops.apply_rope`); the q/k rows of a
Hugging Face checkpoint were already permuted into that layout when it was converted from Meta's interleaved one.
GPT-2 stores its linears as `Conv1D` (weight (in, out), y = x W + b: the transpose of nn.Linear's) and q, k, v fused
in one `c_attn` whose output columns are q, then k, then v. Buffers that are not weights (`rotary_emb.inv_freq`,
GPT-2's causal `attn.bias` / `attn.masked_bias`) are skipped; any other tensor not mapped is refused.

A vocabulary larger than the Hugging Face one (padded for the tokenizer's reserved ids) gets zero rows in the
embedding and the output projection; `ours_to_hf` slices it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.config import ModelConfig
from engine.convert.hf_config import ConvertError

# (our names, Hugging Face name, transposed): several names of ours are row blocks of one Hugging Face tensor.
Entry = tuple[tuple[str, ...], str, bool]
_LLAMA_LAYER = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight"),
)
_GPT2_LAYER: tuple[Entry, ...] = (
    (("attn_norm.weight",), "ln_1.weight", False),
    (("attn_norm.bias",), "ln_1.bias", False),
    (("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"), "attn.c_attn.weight", True),
    (("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"), "attn.c_attn.bias", False),
    (("attn.o_proj.weight",), "attn.c_proj.weight", True),
    (("attn.o_proj.bias",), "attn.c_proj.bias", False),
    (("mlp_norm.weight",), "ln_2.weight", False),
    (("mlp_norm.bias",), "ln_2.bias", False),
    (("mlp.up_proj.weight",), "mlp.c_fc.weight", True),
    (("mlp.up_proj.bias",), "mlp.c_fc.bias", False),
    (("mlp.down_proj.weight",), "mlp.c_proj.weight", True),
    (("mlp.down_proj.bias",), "mlp.c_proj.bias", False),
)
_SKIPPED = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_VOCAB = ("tok_emb.weight", "output.proj.weight")


def _prefix(names: Mapping[str, object], arch: str) -> str:
    """The Hugging Face prefix of the body's tensors: "model." / "transformer." (a *ForCausalLM / *LMHeadModel
    checkpoint) or "" (the bare model's, as the original GPT-2 files are)."""
    body = "model." if arch == "llama" else "transformer."
    return body if any(n.startswith(body) for n in names) else ""


def entries(cfg: ModelConfig, prefix: str) -> list[Entry]:
    """Every tensor of the model: our names, the Hugging Face name, whether the layout is transposed."""
    if cfg.arch == "llama":
        out = [(("tok_emb.weight",), f"{prefix}embed_tokens.weight", False)]
        for i in range(cfg.n_layers):
            out += [((f"layers.{i}.{ours}",), f"{prefix}layers.{i}.{hf}", False) for ours, hf in _LLAMA_LAYER]
        out.append((("output.norm.weight",), f"{prefix}norm.weight", False))
    else:
        out = [(("tok_emb.weight",), f"{prefix}wte.weight", False), (("pos_emb.weight",), f"{prefix}wpe.weight", False)]
        for i in range(cfg.n_layers):
            out += [(tuple(f"layers.{i}.{n}" for n in ours), f"{prefix}h.{i}.{hf}", t) for ours, hf, t in _GPT2_LAYER]
        out += [(("output.norm.weight",), f"{prefix}ln_f.weight", False),
                (("output.norm.bias",), f"{prefix}ln_f.bias", False)]  # fmt: skip
    if not cfg.tie_embeddings:
        out.append((("output.proj.weight",), "lm_head.weight", False))
    return out


def _split_sizes(cfg: ModelConfig, ours: tuple[str, ...]) -> list[int]:
    kv = cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
    return [cfg.d_model, kv, kv] if len(ours) == 3 else [-1]


def hf_to_ours(
    hf: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Our state dict (fp32; tied weights under `tok_emb.weight` only) from a Hugging Face one; a missing or
    unexpected tensor is a one-line ConvertError."""
    prefix = _prefix(hf, cfg.arch)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, name, transposed in entries(cfg, prefix):
        if name not in hf:
            raise ConvertError(f"{source} has no tensor '{name}' (expected for a {cfg.n_layers}-layer {cfg.arch})")
        used.add(name)
        t = hf[name].to(torch.float32)
        t = t.t() if transposed else t
        sizes = _split_sizes(cfg, ours)
        parts = t.split(sizes, dim=0) if len(ours) > 1 else (t,)
        if len(ours) > 1 and t.shape[0] != sum(sizes):
            raise ConvertError(f"{source}: '{name}' has shape {tuple(hf[name].shape)}, not q, k and v of {sizes}")
        out.update((n, p.contiguous()) for n, p in zip(ours, parts))
    unexpected = [n for n in hf if n not in used and not n.endswith(_SKIPPED) and not (
        cfg.tie_embeddings and n == "lm_head.weight")]  # fmt: skip  (some tied checkpoints store the copy too)
    if unexpected:
        raise ConvertError(f"{source} has tensors a {cfg.arch} model does not: {', '.join(sorted(unexpected)[:3])}")
    for n in _VOCAB:
        if n in out and out[n].shape[0] < cfg.vocab_size:  # rows for the reserved ids past the Hugging Face vocab
            out[n] = torch.cat([out[n], out[n].new_zeros(cfg.vocab_size - out[n].shape[0], out[n].shape[1])])
    return out


def ours_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int | None = None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The Hugging Face state dict (a *ForCausalLM's names, contiguous, nothing shared) of our state dict; the
    vocabulary sliced to `vocab_size` when given, floating tensors cast to `dtype` when given."""
    out: dict[str, torch.Tensor] = {}
    prefix = "model." if cfg.arch == "llama" else "transformer."
    for ours, name, transposed in entries(cfg, prefix):
        missing = [n for n in ours if n not in state]
        if missing:
            raise ConvertError(f"the model has no tensor '{missing[0]}' (expected for a {cfg.arch} model)")
        parts = [state[n][:vocab_size] if vocab_size and n in _VOCAB else state[n] for n in ours]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        t = t.t() if transposed else t
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        out[name] = t.to(dtype=cast, memory_format=torch.contiguous_format, copy=True)  # safetensors shares nothing
    return out
