"""Small random-weight Hugging Face models saved as directories (transformers builds them; nothing downloaded)."""

from pathlib import Path

import torch

VOCAB = 101  # not a multiple of 64: our vocabulary must be the Hugging Face one, unpadded


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Weights far from an identity-ish init (norm gains and biases included), so a wrong layout or activation
    moves the logits well past the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight")  # a norm's gain: around 1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if gain else 0.0))


def save_llama(path: Path, **overrides) -> torch.nn.Module:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads), an untied head and a non-default
    rope_theta and eps, saved to `path`; returns the model in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=500000.0,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)  # fmt: skip
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    randomize(model)
    model.save_pretrained(path)
    return model.eval()


def save_gpt2(path: Path, **overrides) -> torch.nn.Module:
    """A 2-layer GPT-2 (tied embeddings, learned positions, biases, tanh GELU) saved to `path`; eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=VOCAB - 1,
              eos_token_id=VOCAB - 1)  # fmt: skip
    kw.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kw))
    randomize(model, seed=1)
    model.save_pretrained(path)
    return model.eval()
