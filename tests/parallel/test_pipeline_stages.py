"""Splitting the plain model into pipeline stages: balance, explicit splits, names and values kept, and stages that
compose back into the whole model."""

import re

import pytest
import torch

from engine.config import ConfigError, ModelConfig
from engine.model.gpt import GPT
from engine.parallel.parallelize import materialize_and_init
from engine.parallel.pipeline.stages import split_model, stage_layer_counts, stage_layers


def test_balance_costs_the_embedding_and_the_head_as_a_layer_each():
    assert stage_layer_counts(16, 4) == [3, 5, 5, 3]  # costs 4, 5, 5, 4
    assert stage_layer_counts(8, 2) == [4, 4]  # costs 5, 5
    assert stage_layer_counts(7, 3) == [2, 3, 2]
    assert stage_layer_counts(4, 4) == [0, 2, 2, 0]  # the ends carry only the embedding / the head
    assert stage_layer_counts(3, 1) == [3]
    for layers, stages in ((16, 4), (32, 8), (5, 2), (12, 8), (9, 6)):
        counts = stage_layer_counts(layers, stages)
        assert sum(counts) == layers and min(counts) >= 0
        costs = [c + (i == 0) + (i == stages - 1) for i, c in enumerate(counts)]
        assert max(costs) - min(costs) <= 1, (layers, stages, counts)
    assert list(stage_layers(16, 4, 2)) == [8, 9, 10, 11, 12]
    assert stage_layer_counts(16, 4, "2,6,6,2") == [2, 6, 6, 2]


def test_balance_costs_multi_token_prediction_modules_on_the_last_stage():
    assert stage_layer_counts(8, 2, last_stage_extra=1) == [5, 3]  # costs 6, 5
    assert stage_layer_counts(16, 4, last_stage_extra=2) == [4, 5, 5, 2]  # costs 5, 5, 5, 5
    assert stage_layer_counts(2, 2, last_stage_extra=2) == [2, 0]
    assert stage_layer_counts(4, 4, last_stage_extra=5) == [2, 1, 1, 0]  # every middle stage keeps a layer
    assert stage_layer_counts(4, 4, last_stage_extra=3) == [1, 2, 1, 0]
    for layers, stages in ((4, 4), (6, 4), (8, 8), (5, 3)):
        for extra in range(8):
            counts = stage_layer_counts(layers, stages, last_stage_extra=extra)
            assert sum(counts) == layers and min(counts[1:-1]) >= 1, (layers, stages, extra, counts)
    for layers, stages, extra in ((16, 4, 1), (32, 8, 3), (5, 2, 2), (12, 8, 1), (9, 3, 2)):
        counts = stage_layer_counts(layers, stages, last_stage_extra=extra)
        assert sum(counts) == layers and min(counts) >= 0
        costs = [c + (i == 0) + (i == stages - 1) * (1 + extra) for i, c in enumerate(counts)]
        assert max(costs) - min(costs) <= 1, (layers, stages, extra, counts)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
@pytest.mark.parametrize("tie", [True, False])
def test_multi_token_prediction_stages_compose_into_the_whole_models_loss(kind, tie):
    """The modules go to the last stage; for the sequential kind with a copy of the embedding (named `mtp_emb`, placed
    before the output head) that embeds the token ids it is given."""
    from engine.model.mtp import MultiTokenGPT

    cfg = ModelConfig(n_layers=4, d_model=32, n_heads=2, seq_len=16, vocab_size=64, tie_embeddings=tie)
    model = MultiTokenGPT(cfg, depth=2, weight=0.5, kind=kind, seed=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    first, last = split_model(model, 2, 0), split_model(model, 2, 1)
    assert first.mtp is None and first.output is None and len(last.mtp) == 2 and last.tok_emb is None
    assert last.takes_input_ids == (kind == "sequential") and hasattr(last, "mtp_emb") == (kind == "sequential")
    if kind == "sequential":
        names = [n for n, _ in last.named_modules() if n in ("mtp_emb", "output")]
        assert names == ["mtp_emb", "output"] and torch.equal(last.mtp_emb.weight, model.tok_emb.weight)
        assert (last.mtp_emb.weight is last.output.proj.weight) == tie
        with pytest.raises(ValueError, match="needs the token ids"):
            last(first(x), y, reduction="sum")
    kw = {"input_ids": x} if last.takes_input_ids else {}
    got = last(first(x), y, reduction="sum", **kw)
    assert got.item() == pytest.approx(model(x, y, reduction="sum").item(), rel=1e-6)


@pytest.mark.parametrize(
    "layers, stages, explicit, needle",
    [
        (3, 4, "", "4 pipeline stages (parallel.pp x parallel.virtual_stages) need at least as many layers"),
        (16, 4, "3,5,5", "must give 4 stages"),
        (16, 4, "3,5,5,4", "summing to model.n_layers = 16"),
        (16, 4, "a,b", "comma-separated integers"),
    ],
)
def test_impossible_splits_are_one_line(layers, stages, explicit, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        stage_layer_counts(layers, stages, explicit)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("gpt2", False), ("gpt2", True)])
def test_stages_keep_names_and_values_and_compose_into_the_model(arch, tied):
    cfg = ModelConfig(arch=arch, n_layers=5, d_model=32, n_heads=4, vocab_size=64, seq_len=8, kernels="torch",
                      tie_embeddings=tied)  # fmt: skip
    full = GPT(cfg, seed=4)
    with torch.device("meta"):
        whole = GPT(cfg)
    stages = [split_model(whole, 3, s) for s in range(3)]
    for stage in stages:
        materialize_and_init(stage, "cpu", 4)
    assert [list(s.layers) for s in stages] == [["0"], ["1", "2", "3"], ["4"]]
    assert stages[0].output is None and stages[1].tok_emb is None and stages[2].tok_emb is None
    params = dict(full.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            source = "tok_emb.weight" if name == "output.proj.weight" and tied else name
            assert torch.equal(p, params[source]), name  # the tied copy on the last stage starts equal
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    h = stages[1](stages[0](tokens))
    torch.testing.assert_close(stages[2](h, tokens), full(tokens, tokens), rtol=0, atol=0)
