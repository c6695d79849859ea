"""Hugging Face `config.json` <-> our `ModelConfig`, for Llama (`model_type` "llama") and GPT-2 ("gpt2").

Only what our model computes exactly is accepted; anything else is refused in one line naming the key, so a
conversion never yields a model that silently differs from the Hugging Face one:
- llama: SiLU gates, no attention or MLP biases, head_dim = hidden_size / num_attention_heads, the default RoPE
  (no rope_scaling: Llama 3.1's, linear, dynamic or YaRN frequencies are not ours), full rotary dimension.
- gpt2: the tanh-approximate GELU ("gelu_new"), 1/sqrt(head_dim) scores (scale_attn_weights), no per-layer score
  scaling, no cross-attention.

Keys a `config.json` leaves out take the Hugging Face class defaults (`save_pretrained` writes only what differs
from them for the keys shared by every model, such as tie_word_embeddings).
"""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig

SUPPORTED = ("llama", "gpt2")
# Hugging Face's GELU names for the tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), which ours is.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class ConvertError(ValueError):
    """Input a conversion cannot take (missing file, unsupported model, mismatched tensors); one line."""


def _get(hf: dict[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ConvertError(f"{source}: config.json has no '{key}'")
    return default


def _refuse(source: str, what: str) -> ConvertError:
    return ConvertError(f"{source}: {what} is not supported (our model would compute something else)")


def _llama_rope_theta(hf: dict[str, Any], source: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the top level (4.x), refusing scaled frequencies."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for table in (params, scaling):
        kind = table.get("rope_type", table.get("type", "default"))
        if kind != "default":
            raise _refuse(source, f"rope type '{kind}'")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise _refuse(source, "a partial rotary factor")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig (vocab exactly the Hugging Face one, dropout 0) for a Hugging Face config dict."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ConvertError(f"{source}: model_type '{kind}' is not supported (supported: {', '.join(SUPPORTED)})")
    if kind == "llama":
        d, heads = int(_get(hf, "hidden_size", source)), int(_get(hf, "num_attention_heads", source))
        if _get(hf, "hidden_act", source, "silu") != "silu":
            raise _refuse(source, f"hidden_act '{hf['hidden_act']}'")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise _refuse(source, f"{key} true")
        if heads < 1 or d % heads or int(_get(hf, "head_dim", source, d // heads)) != d // heads:
            raise _refuse(source, f"head_dim {hf.get('head_dim')} with hidden_size {d} and {heads} heads")
        return ModelConfig(
            arch="llama", n_layers=int(_get(hf, "num_hidden_layers", source)), d_model=d, n_heads=heads,
            n_kv_heads=int(_get(hf, "num_key_value_heads", source, heads)),
            ffn_hidden=int(_get(hf, "intermediate_size", source)), vocab_size=int(_get(hf, "vocab_size", source)),
            seq_len=int(_get(hf, "max_position_embeddings", source, 2048)),
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", source, True)),
            norm_eps=float(_get(hf, "rms_norm_eps", source, 1e-6)), rope_theta=_llama_rope_theta(hf, source),
            init_std=float(_get(hf, "initializer_range", source, 0.02)), dropout=0.0,
        )  # fmt: skip
    act = _get(hf, "activation_function", source, "gelu_new")
    if act not in _TANH_GELU:
        raise _refuse(source, f"activation_function '{act}'")
    if not _get(hf, "scale_attn_weights", source, True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise _refuse(source, "GPT-2 attention scores not scaled by 1/sqrt(head_dim)")
    if hf.get("add_cross_attention"):
        raise _refuse(source, "add_cross_attention")
    d, heads = int(_get(hf, "n_embd", source)), int(_get(hf, "n_head", source))
    return ModelConfig(
        arch="gpt2", n_layers=int(_get(hf, "n_layer", source)), d_model=d, n_heads=heads, n_kv_heads=heads,
        ffn_hidden=int(_get(hf, "n_inner", source, 4 * d)), vocab_size=int(_get(hf, "vocab_size", source)),
        seq_len=int(_get(hf, "n_positions", source, 1024)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", source, True)),
        norm_eps=float(_get(hf, "layer_norm_epsilon", source, 1e-5)),
        init_std=float(_get(hf, "initializer_range", source, 0.02)), dropout=0.0,
    )  # fmt: skip


def hf_config_from_model(cfg: ModelConfig, vocab_size: int | None = None,
                         base: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The Hugging Face config dict of our (resolved) model config; `vocab_size`: the vocabulary written (a padded
    vocabulary sliced back); `base`: the config.json the model came from, whose token ids are kept."""
    if cfg.window:
        raise ConvertError(f"model.window {cfg.window}: sliding-window attention has no Llama or GPT-2 config")
    vocab = vocab_size or cfg.vocab_size
    if cfg.arch == "llama":
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout,
        }  # fmt: skip
    elif cfg.arch == "gpt2":
        if cfg.n_kv_heads != cfg.n_heads:
            raise ConvertError(f"model.n_kv_heads {cfg.n_kv_heads}: GPT-2 has no grouped-query attention")
        out = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden, "n_positions": cfg.seq_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        }  # fmt: skip
    else:
        raise ConvertError(f"model.arch '{cfg.arch}' has no Hugging Face counterpart here (llama, gpt2)")
    out.update(vocab_size=vocab, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
               dtype="float32")  # fmt: skip
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # not the classes' defaults, outside small vocabs
        out[key] = (base or {}).get(key)
    return out
