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
