"""The collective counter, and Megatron's accounting checked with it on the real model (engine.model.gpt): per
block, 2 all-reduces forward and 2 backward with tp; with sp none, an all-gather and a reduce-scatter in their place,
and 2 all-gathers more in the backward pass (the projections' saved inputs gathered again); the whole GPT's calls
and bytes against bench_tp's closed form."""

import pytest
import torch
import torch.distributed as dist

from benchmarks.bench_tp import closed_form, measure
from engine.config import ModelConfig
from engine.model.gpt import Block, resolve
from engine.model.ops import rope_cos_sin
from engine.parallel import state
from engine.parallel.comm_count import CommCounter, Record, count_collectives
from engine.parallel.grads import finish_tp_grads
from engine.parallel.parallelize import apply_tensor_parallel, block_plan
from engine.parallel.sequence import scatter_to_sequence_parallel_region
from engine.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from tests.distributed import run_distributed


def test_ring_bytes():
    assert Record("all_reduce", 4, 1000).wire_bytes == 1500
    assert Record("all_gather", 4, 1000).wire_bytes == 750
    assert Record("reduce_scatter", 2, 1000).wire_bytes == 500
    assert Record("all_reduce", 1, 1000).wire_bytes == 0
    c = CommCounter([Record("all_reduce", 2, 8), Record("all_gather", 2, 8), Record("all_reduce", 2, 4)])
    assert c.by_op() == {"all_reduce": 2, "all_gather": 1}
    assert (c.calls("all_reduce"), c.payload_bytes(), c.wire_bytes()) == (2, 20, 16)


def test_counter_restores_torch_distributed():
    before = dist.all_reduce
    with count_collectives() as counter:
        assert dist.all_reduce is not before
    assert dist.all_reduce is before and counter.calls() == 0


def _block_counts(group, sp):
    cfg = resolve(ModelConfig(n_layers=1, d_model=16, n_heads=4, ffn_hidden=32, vocab_size=13, kernels="torch"))
    block = Block(cfg)  # llama: RMSNorm, RoPE, SwiGLU, no biases
    apply_tensor_parallel(block, group, sp, model_cfg=cfg, plan=block_plan())
    cos, sin = rope_cos_sin(8, 4, cfg.rope_theta)
    x = torch.randn(2, 8, 16)
    if sp:
        x = scatter_to_sequence_parallel_region(x, group)
    with count_collectives() as fwd:
        y = block(x, cos, sin)
    with count_collectives() as bwd:
        y.sum().backward()
    with count_collectives() as grads:
        reduced = finish_tp_grads(block, group)
    assert reduced == (2 if sp else 0)  # the two RMSNorm gains
    return {k: (c.by_op(), c.payload_bytes()) for k, c in (("fwd", fwd), ("bwd", bwd), ("sp_grads", grads))}


def _layer_counts(group):
    x = torch.randn(2, 8, 16, requires_grad=True)
    res = {}
    for name, layer, inp in (
        ("column", ColumnParallelLinear(16, 8, group=group), x),
        ("row", RowParallelLinear(16, 8, group=group), x[..., :8]),
        ("embedding", VocabParallelEmbedding(11, 16, group=group), torch.randint(0, 11, (2, 8))),
    ):
        with count_collectives() as fwd:
            y = layer(inp)
        with count_collectives() as bwd:
            y.sum().backward()
        res[name] = (fwd.by_op(), bwd.by_op())
    logits = torch.randn(2, 8, 6, requires_grad=True)
    with count_collectives() as fwd:
        loss = vocab_parallel_cross_entropy(logits, torch.randint(0, 11, (2, 8)), group, vocab_size=11)
    with count_collectives() as bwd:
        loss.backward()
    res["cross_entropy"] = (fwd.by_op(), bwd.by_op(), fwd.payload_bytes())
    # A deprecated alias that forwards to the new name is counted once.
    with count_collectives() as alias:
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(4), group=group)
    res["alias"] = alias.by_op()
    return res


def _comm_worker(rank, world):
    state.initialize(tp=2)
    try:
        group = state.get_tp_group()
        out = {"tp": _block_counts(group, False), "sp": _block_counts(group, True), "layers": _layer_counts(group)}
    finally:
        state.destroy()
    # the whole GPT: llama with and without sp, gpt2 (biases, positions) with sp, one kv head (replicated at tp=2)
    variants = [("llama", 4, False), ("llama", 4, True), ("gpt2", 0, True), ("llama", 1, False), ("llama", 1, True)]
    out["model"] = {
        v: measure(rank, world, dict(arch=v[0], kv_heads=v[1], sp=v[2], vocab=13, d_model=16, heads=4, ffn=32,
                                     layers=3, batch=2, seq=8))
        for v in variants
    }  # fmt: skip
    return out


@pytest.mark.distributed
def test_megatron_communication_accounting():
    results = run_distributed(_comm_worker, 2, timeout=240)
    act = 2 * 8 * 16 * 4  # b * s * d fp32 bytes
    for r in results:
        assert r["tp"]["fwd"] == ({"all_reduce": 2}, 2 * act)
        assert r["tp"]["bwd"] == ({"all_reduce": 2}, 2 * act)
        assert r["tp"]["sp_grads"] == ({}, 0)
        assert r["sp"]["fwd"] == ({"all_gather": 2, "reduce_scatter": 2}, 4 * act)
        # and the projections' inputs, saved as this rank's shard, gathered again (engine/parallel/regather.py)
        assert r["sp"]["bwd"] == ({"reduce_scatter": 2, "all_gather": 4}, 6 * act)
        assert r["sp"]["sp_grads"] == ({"all_reduce": 1}, 2 * 16 * 4)  # 2 norm gains, one flat buffer
        layers = r["layers"]
        assert layers["column"] == ({}, {"all_reduce": 1})
        assert layers["row"] == ({"all_reduce": 1}, {})
        assert layers["embedding"] == ({"all_reduce": 1}, {})
        assert layers["cross_entropy"] == ({"all_reduce": 2}, {}, 2 * 8 * 4 * 3)
        assert layers["alias"] == {"reduce_scatter": 1}
        for (arch, kv_heads, sp), got in r["model"].items():
            expected = closed_form(2, sp, 3, 16, 16, arch=arch, seq_len=8, n_heads=4, kv_heads=kv_heads)
            assert got["calls"] == expected["calls"]
            assert got["wire_bytes"] == pytest.approx(expected["wire_bytes"], rel=1e-12)
