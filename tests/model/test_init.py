"""Per-parameter seeded initialisation: each parameter's values depend on (seed, its canonical name) only."""

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.gpt import GPT
from engine.model.init import canonical_name, param_seed
from engine.parallel.parallelize import materialize_and_init


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layers=2, d_model=32, n_heads=4, vocab_size=64, seq_len=16, kernels="torch"), **kw})


def test_canonical_names_strip_wrappers():
    for wrapped in (
        "module.layers.0.attn.q_proj.weight",
        "_orig_mod.layers.0.attn.q_proj.weight",
        "module._orig_mod.layers.0._checkpoint_wrapped_module.attn.q_proj.weight",
        "layers.0._fsdp_wrapped_module.attn.q_proj.weight",
    ):
        assert canonical_name(wrapped) == "layers.0.attn.q_proj.weight"
    assert canonical_name("layers.0.module.weight") == "layers.0.module.weight"  # a real submodule named module
    assert param_seed(1, "a") == param_seed(1, "a") != param_seed(1, "b") != param_seed(2, "a")


def test_values_depend_on_seed_and_name_only():
    """A 4-layer and a 2-layer model share their first layers' values; the embedding does not move when layers are
    added; another seed changes everything; the torch default generator is not touched."""
    before = torch.get_rng_state()
    four, two = GPT(tiny(n_layers=4), seed=7), GPT(tiny(n_layers=2), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    p4 = dict(four.named_parameters())
    for name, p in two.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):  # std init_std / sqrt(2 L): the same draws, scaled
            torch.testing.assert_close(p, p4[name] * 2**0.5, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, p4[name]), name
    other = GPT(tiny(n_layers=2), seed=8)
    assert not torch.equal(other.layers["0"].attn.q_proj.weight, two.layers["0"].attn.q_proj.weight)
    # two matrices of one shape in one layer get different values (their names differ)
    assert not torch.equal(two.layers["0"].attn.q_proj.weight, two.layers["0"].attn.o_proj.weight * 4)


def test_meta_build_then_materialise_equals_eager_build():
    for arch in ("llama", "gpt2"):
        eager = GPT(tiny(arch=arch), seed=3)
        with torch.device("meta"):
            lazy = GPT(tiny(arch=arch))
        assert all(p.is_meta for p in lazy.parameters())
        materialize_and_init(lazy, "cpu", 3)
        assert lazy.output.proj.weight is lazy.tok_emb.weight  # the tie survives materialisation
        for (n, a), (_, b) in zip(eager.named_parameters(), lazy.named_parameters()):
            assert torch.equal(a, b), (arch, n)
        tokens = torch.randint(0, 64, (2, 16))
        assert torch.equal(eager(tokens), lazy(tokens))  # the rotary buffers are recomputed too


def test_tied_weight_has_one_name_in_a_chunk_without_the_embedding():
    """A last pipeline stage holds the output head but not the embedding: its copy of the tied weight gets the
    embedding's values (one canonical name, tok_emb.weight)."""
    full = GPT(tiny(), seed=5)
    with torch.device("meta"):
        stage = GPT(tiny())
    stage.tok_emb = None
    del stage.layers["0"]
    materialize_and_init(stage, "cpu", 5)
    assert torch.equal(stage.output.proj.weight, full.tok_emb.weight)
    assert torch.equal(stage.layers["1"].mlp.down_proj.weight, full.layers["1"].mlp.down_proj.weight)
    h = torch.randn(2, 16, 32)
    assert stage(h).shape == (2, 16, 64)  # hidden states in, logits out


def test_chunk_without_head_returns_hidden_states():
    model = GPT(tiny(), seed=1)
    model.output = None
    assert model(torch.randint(0, 64, (2, 16))).shape == (2, 16, 32)


def test_init_touches_a_param_only_through_its_own_generator():
    """Re-initialising after zeroing one parameter restores exactly its values and leaves the others as they were."""
    from engine.model.init import init_weights

    model = GPT(tiny(), seed=9)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.layers["1"].mlp.up_proj.weight.zero_()
    init_weights(model, 9)
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert isinstance(model.layers, nn.ModuleDict) and list(model.layers) == ["0", "1"]
