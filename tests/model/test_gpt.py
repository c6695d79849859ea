"""GPT model: shapes, closed-form parameter and FLOP counts, init, config resolution, recompute, learning."""

import math

import pytest
import torch

from engine.config import ConfigError, ModelConfig
from engine.model import GPT, count_params, flops_per_token, padded_vocab_size, resolve
from engine.model.generate import generate


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=128, seq_len=32, kernels="torch")
    base.update(kw)
    return ModelConfig(**base)


def expected_params(arch, L, d, h, kv, f, V, T, tied):
    """Closed form written out module by module (independent of engine.model.count_params)."""
    hd = d // h
    if arch == "llama":
        attn = d * d + d * (kv * hd) * 2 + d * d  # q, k, v, o; no biases
        mlp = 3 * d * f  # gate, up, down
        norms = 2 * d  # two RMSNorm gains
        final = d
        pos = 0
    else:
        attn = (d * d + d) + 2 * (d * kv * hd + kv * hd) + (d * d + d)
        mlp = (d * f + f) + (f * d + d)
        norms = 2 * (2 * d)  # LayerNorm gain + bias, twice
        final = 2 * d
        pos = T * d
    emb = V * d
    head = 0 if tied else V * d
    total = L * (attn + mlp + norms) + final + emb + head + pos
    non_emb = L * (attn + mlp + norms) + final  # Kaplan's N: no vocabulary matrices, no positions
    return total, non_emb


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_shapes_params_flops(arch, tied):
    cfg = tiny(arch=arch, tie_embeddings=tied, n_kv_heads=2 if arch == "llama" else 0)
    model = GPT(cfg)
    r = model.cfg
    f = 192 if arch == "llama" else 256  # 8/3*64 = 170.7 -> 192; 4*64
    assert r.ffn_hidden == f
    total, non_emb = expected_params(arch, 2, 64, 4, r.n_kv_heads, f, 128, 32, tied)
    assert model.num_params() == total == count_params(r)
    assert model.num_params(non_embedding=True) == non_emb == count_params(r, non_embedding=True)
    # 6N + 12LHQT with N = the matmul parameters: non-embedding + the output projection (the logits)
    assert flops_per_token(cfg) == 6 * (non_emb + 128 * 64) + 12 * 2 * 4 * 16 * 32
    tokens = torch.randint(0, 128, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 128)
    loss = model(tokens, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # untrained, near-uniform predictions: the loss is about ln(V)
    assert abs(model(tokens, torch.randint(0, 128, (3, 17))).item() - math.log(128)) < 0.5


def test_published_parameter_counts():
    """Anchors: Hugging Face GPT-2 small (vocab 50257) has 124,439,808 parameters; Llama-2-7B 6,738,415,616."""
    gpt2 = ModelConfig(arch="gpt2", n_layers=12, d_model=768, n_heads=12, vocab_size=50257, seq_len=1024)
    assert count_params(resolve(gpt2)) == 124_439_808
    llama = ModelConfig(n_layers=32, d_model=4096, n_heads=32, ffn_hidden=11008, vocab_size=32000, seq_len=4096)
    llama.tie_embeddings = False
    assert count_params(resolve(llama)) == 6_738_415_616
    # nanoGPT's estimate_mfu numerator for GPT-2 small: 6 * (params - wpe) + 12 * L * H * Q * T
    assert flops_per_token(gpt2) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024


def test_tied_shares_one_tensor():
    model = GPT(tiny(tie_embeddings=True))
    assert model.lm_head is None and model.output_weight is model.tok_emb.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.output_weight is not untied.tok_emb.weight


def test_resolve_defaults_and_padding():
    r = resolve(ModelConfig(d_model=128, vocab_size=0), tokenizer_vocab=4101)
    assert (r.n_kv_heads, r.ffn_hidden, r.vocab_size) == (4, 384, 4160)
    assert resolve(ModelConfig(arch="gpt2", d_model=96, n_heads=4, vocab_size=64)).ffn_hidden == 384
    assert resolve(ModelConfig(d_model=4096, n_heads=32, vocab_size=64)).ffn_hidden == 10944  # 8/3*4096 -> 10944
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50257, tp=2) == 50304 and padded_vocab_size(50257, tp=4) == 50432
    assert padded_vocab_size(64) == 64
    cfg = ModelConfig(vocab_size=0)
    assert cfg.vocab_size == 0  # resolve returns a copy
    resolve(cfg, tokenizer_vocab=10)
    assert cfg.vocab_size == 0


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(d_model=100, n_heads=3), "n_heads (3) must divide model.d_model (100)"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads (3) must divide model.n_heads (4)"),
        (dict(d_model=12, n_heads=4), "even head dim"),
        (dict(vocab_size=0), "vocab_size is 0"),
        (dict(n_layers=0), "model.n_layers must be >= 1"),
        (dict(kernels="cuda"), "model.kernels must be one of"),
        (dict(dropout=1.0), "model.dropout"),
    ],
)
def test_resolve_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        GPT(ModelConfig(**{"vocab_size": 64, **kw}))
    assert "\n" not in str(e.value)
    # the same model as gpt2 has no rotary embedding and accepts odd head dims
    assert GPT(ModelConfig(arch="gpt2", d_model=12, n_heads=4, vocab_size=64, n_layers=1))


def test_megatron_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layers=8, d_model=128, arch="gpt2", tie_embeddings=False))
    out_std = 0.02 / math.sqrt(16)
    blk = model.layers["3"]
    for w, std in [
        (blk.attn.q_proj.weight, 0.02),
        (blk.mlp.up_proj.weight, 0.02),
        (model.tok_emb.weight, 0.02),
        (model.pos_emb.weight, 0.02),
        (model.lm_head.weight, 0.02),
        (blk.attn.o_proj.weight, out_std),
        (blk.mlp.down_proj.weight, out_std),
    ]:
        assert abs(w.std().item() / std - 1) < 0.08, (w.shape, w.std().item(), std)
        assert abs(w.mean().item()) < 0.1 * std
    assert torch.all(blk.attn.q_proj.bias == 0) and torch.all(blk.attn_norm.bias == 0)
    assert torch.all(blk.attn_norm.weight == 1)
    torch.manual_seed(0)
    again = GPT(tiny(n_layers=8, d_model=128, arch="gpt2", tie_embeddings=False))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal(arch):
    model = GPT(tiny(arch=arch))
    a = torch.randint(0, 128, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 128, (2, 8))
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_mask_argument_reaches_attention():
    model = GPT(tiny())
    tokens = torch.randint(0, 128, (2, 10))
    tril = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(model(tokens, mask=tril, causal=False), model(tokens))
    # prefix-LM style: the first 4 positions see each other both ways; later positions change nothing before them
    prefix = tril.clone()
    prefix[:4, :4] = True
    out = model(tokens, mask=prefix, causal=False)
    assert not torch.allclose(out[:, :3], model(tokens)[:, :3])
    later = tokens.clone()
    later[:, 7] = (later[:, 7] + 1) % 128
    torch.testing.assert_close(model(later, mask=prefix, causal=False)[:, :7], out[:, :7])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sliding_window(arch):
    """model.window 8: no change while the sequence fits the window; beyond it, a token's influence stops 7 positions
    per layer later (2 layers: token 5 reaches position 19, not 20); the triton path (our kernel's window) agrees."""
    import dataclasses

    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 24))
    full, windowed = GPT(tiny(arch=arch), seed=0), GPT(tiny(arch=arch, window=8), seed=0)
    torch.testing.assert_close(windowed(tokens[:, :8]), full(tokens[:, :8]))
    out = windowed(tokens)
    assert not torch.allclose(out[:, 8:], full(tokens)[:, 8:])
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 128
    moved = windowed(changed)
    torch.testing.assert_close(moved[:, 20:], out[:, 20:])
    assert not torch.allclose(moved[:, 19], out[:, 19])
    kernel = GPT(dataclasses.replace(tiny(arch=arch, window=8), kernels="triton"), seed=0)
    torch.testing.assert_close(kernel(tokens), out, rtol=1e-5, atol=1e-5)
    assert flops_per_token(tiny(arch=arch, window=8)) < flops_per_token(tiny(arch=arch))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = GPT(tiny(n_heads=4, n_kv_heads=2))
    mha = GPT(tiny(n_heads=4, n_kv_heads=4))
    state = gqa.state_dict()
    hd = 16
    for k, v in list(state.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head j serves query heads 2j and 2j+1
            state[k] = v.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_ignore_index_and_mean():
    model = GPT(tiny())
    tokens = torch.randint(0, 128, (2, 10))
    targets = torch.randint(0, 128, (2, 10))
    targets[0, :4] = -100
    logits = model(tokens)
    keep = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(tokens, targets), ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_same_loss_and_grads(arch, mode):
    tokens = torch.randint(0, 128, (2, 16))
    results = []
    for recompute in ("none", mode):
        torch.manual_seed(0)
        model = GPT(tiny(arch=arch, recompute=recompute, dropout=0.1))
        torch.manual_seed(1)  # same dropout masks in both runs; checkpoint replays the RNG state
        loss = model(tokens, tokens)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_seq_len_limit_is_one_line_error():
    model = GPT(tiny(seq_len=8))
    with pytest.raises(ValueError, match="exceeds model.seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_overfits_one_batch(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch=arch, n_layers=1, d_model=32, n_heads=2, vocab_size=64, seq_len=16))
    data = torch.randint(0, 64, (2, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(300):
        loss = model(x, y)
        losses.append(loss.item())
        if losses[-1] < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert losses[0] > 3.5 and losses[-1] < 0.1, (losses[0], losses[-1], len(losses))


def test_generate():
    torch.manual_seed(0)
    model = GPT(tiny(seq_len=8))
    model.train()
    prompt = torch.randint(0, 128, (2, 3))
    out = generate(model, prompt, 10, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt)
    assert model.training  # mode restored
    # greedy: each new token is the argmax given its (cropped) context
    for t in range(3, 13):
        ctx = out[:, max(0, t - 8) : t]
        assert torch.equal(model.eval()(ctx)[:, -1].argmax(-1), out[:, t])
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_k=1), out)
    g = torch.Generator().manual_seed(3)
    s1 = generate(model, prompt, 6, temperature=0.8, top_k=5, generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(s1, generate(model, prompt, 6, temperature=0.8, top_k=5, generator=g))
    stop = generate(model, prompt[:1], 10, temperature=0, eos_id=int(out[0, 3]))
    assert stop.shape == (1, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_triton_backend_matches_torch(arch):
    """The whole model through kernels.* (the Triton interpreter on CPU) vs plain PyTorch, fp32."""
    tokens = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    losses, grads = [], []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(tiny(arch=arch, kernels=backend, d_model=32, n_heads=2, n_kv_heads=1, vocab_size=64, seq_len=8))
        loss = model(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_cuda_auto_picks_triton_and_trains_in_bf16():
    from engine.config import OptimConfig
    from engine.model import ops
    from engine.optim import build_optimizer

    dev = torch.device("cuda")
    tokens = torch.randint(0, 128, (4, 32), device=dev)
    assert ops.select("auto", tokens.float()) == "triton"
    losses = {}
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        model = GPT(tiny(kernels=backend, n_kv_heads=2)).to(dev)
        losses[backend] = model(tokens, tokens).item()
    assert losses["auto"] == pytest.approx(losses["torch"], rel=1e-3)  # TF32/reduction order on GPU
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    assert opt.defaults["fused"] is True
    first = None
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
    assert math.isfinite(loss.item()) and loss.item() < first
