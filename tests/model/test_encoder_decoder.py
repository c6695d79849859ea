"""The t5 encoder-decoder (engine/model/encoder_decoder.py): its loss against a model written out by hand, the
masks it runs under, seeded initialisation, the parameter count and the config's refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, ModelConfig
from engine.model.encoder_decoder import EncoderDecoder
from engine.model.gpt import count_params, resolve
from engine.model.init import init_weights, materialize_

CFG = ModelConfig(arch="t5", n_layers=2, n_decoder_layers=3, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=96,
                  seq_len=12, kernels="torch", init_std=0.1)  # fmt: skip


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos):  # x (b, s, h, d), half rotation: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    d = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (torch.arange(pos, dtype=torch.float64)[:, None] * freq)[None, :, None, :]
    x1, x2 = x.double().chunk(2, -1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def _attention(p, x, kv, causal, rope):
    """softmax(q k^T / sqrt(d) + mask) v, written out; 4 query heads share 2 key/value heads (heads 0, 1 -> 0)."""
    b, t, s, hd = x.shape[0], x.shape[1], kv.shape[1], 8
    q = (x @ p["q_proj.weight"].T).view(b, t, 4, hd)
    k = (kv @ p["k_proj.weight"].T).view(b, s, 2, hd)
    v = (kv @ p["v_proj.weight"].T).view(b, s, 2, hd).double()
    if rope:
        q, k = _rope(q, t), _rope(k, s)
    q, k = q.double(), k.double()
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, -1)
    return y @ p["o_proj.weight"].double().T


def _mlp(p, x):
    return (F.silu(x @ p["gate_proj.weight"].double().T) * (x @ p["up_proj.weight"].double().T)) @ p[
        "down_proj.weight"
    ].double().T


def _reference_loss(model, tokens, decoder_inputs, targets):
    """The model's definition in float64: bidirectional encoder, causal decoder with cross-attention, shared
    embedding, tied output projection, mean cross-entropy over targets != -100."""
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def sub(prefix):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    emb = sd["tok_emb.weight"]
    x = emb[tokens]
    for i in range(2):
        p = sub(f"encoder_layers.{i}.")
        h = _rms(x, p["attn_norm.weight"])
        x = x + _attention(sub(f"encoder_layers.{i}.attn."), h, h, False, True)
        x = x + _mlp(sub(f"encoder_layers.{i}.mlp."), _rms(x, p["mlp_norm.weight"]))
    memory = _rms(x, sd["encoder_norm.weight"])
    y = emb[decoder_inputs]
    for i in range(3):
        p = sub(f"decoder_layers.{i}.")
        h = _rms(y, p["attn_norm.weight"])
        y = y + _attention(sub(f"decoder_layers.{i}.attn."), h, h, True, True)
        y = y + _attention(sub(f"decoder_layers.{i}.cross_attn."), _rms(y, p["cross_norm.weight"]), memory, False,
                           False)  # fmt: skip
        y = y + _mlp(sub(f"decoder_layers.{i}.mlp."), _rms(y, p["mlp_norm.weight"]))
    logits = _rms(y, sd["output.norm.weight"]) @ emb.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def test_loss_equals_the_hand_built_encoder_decoder():
    model = EncoderDecoder(CFG, seed=3).double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    decoder_inputs = torch.randint(0, 96, (2, 15), generator=g)  # longer than seq_len: rotary tables for the call
    targets = torch.randint(0, 96, (2, 15), generator=g)
    targets[0, 9:] = -100
    ref = _reference_loss(model, tokens, decoder_inputs, targets)
    got = model(tokens, targets, decoder_inputs=decoder_inputs)  # fp32 loss accumulation and rotary tables
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    total = model(tokens, targets, "sum", decoder_inputs=decoder_inputs).double()
    torch.testing.assert_close(total, ref * (targets != -100).sum(), rtol=1e-6, atol=1e-6)


def test_encoder_sees_every_token_and_decoder_only_the_past():
    model = EncoderDecoder(CFG, seed=1)
    tokens, dec = torch.randint(0, 96, (1, 12)), torch.randint(0, 96, (1, 8))
    logits = model(tokens, decoder_inputs=dec)
    later_enc, later_dec = tokens.clone(), dec.clone()
    later_enc[0, -1] = (later_enc[0, -1] + 1) % 96
    later_dec[0, 5] = (later_dec[0, 5] + 1) % 96
    assert not torch.allclose(model.encode(later_enc)[0, 0], model.encode(tokens)[0, 0])  # bidirectional
    assert not torch.allclose(model(later_enc, decoder_inputs=dec)[0, 0], logits[0, 0])  # cross-attention
    changed = model(tokens, decoder_inputs=later_dec)
    torch.testing.assert_close(changed[0, :5], logits[0, :5])  # causal
    assert not torch.allclose(changed[0, 5], logits[0, 5])


def test_seeded_init_on_meta_and_the_parameter_count():
    direct = EncoderDecoder(CFG, seed=7)
    with torch.device("meta"):
        late = EncoderDecoder(CFG)
    materialize_(late, "cpu")
    init_weights(late, 7)
    for (name, a), b in zip(direct.state_dict().items(), late.state_dict().values()):
        assert torch.equal(a, b), name
    cfg = resolve(CFG)
    assert direct.num_params() == count_params(cfg) and direct.num_params(True) == count_params(cfg, True)
    assert len(direct.layers) == 5 and direct.output.proj.weight is direct.tok_emb.weight
    assert {type(m).__name__ for n, m in direct.named_modules() if n.endswith("_proj")} == {"Linear"}


def test_bad_t5_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="n_decoder_layers applies to model.arch t5"):
        resolve(ModelConfig(n_decoder_layers=2, vocab_size=64))
    with pytest.raises(ConfigError, match="window .* not supported with model.arch t5"):
        resolve(ModelConfig(arch="t5", window=4, vocab_size=64))
    assert resolve(ModelConfig(arch="t5", n_layers=3, vocab_size=64)).n_decoder_layers == 3
    model = EncoderDecoder(CFG, seed=0)
    with pytest.raises(ValueError, match="needs decoder_inputs"):
        model(torch.zeros(1, 4, dtype=torch.long))
