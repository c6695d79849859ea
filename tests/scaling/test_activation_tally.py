"""The engine's activation tally (engine.scaling.activations) equals what its model saves for the backward pass.

Measured with `torch.autograd.graph.saved_tensors_hooks` under bf16 autocast, each storage counted once. Growing the
batch and the layer count by one each isolates what scales with them: (L=2, b=2) - (L=1, b=2) - (L=2, b=1) +
(L=1, b=1) is one layer of one sample, (L=1, b=2) - (L=1, b=1) - that is the embedding and output of one sample; the
tally's figures go through the same differences, so the comparison is exact (to the byte). The Triton kernels run in
the interpreter (bf16 math is wrong there, but shapes and dtypes are not)."""

from dataclasses import replace

import pytest
import torch

from engine.config import Config, ModelConfig
from engine.model.gpt import GPT, resolve
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import apply_recompute, parallelize_gpt
from engine.scaling.activations import (
    autocast_weight_bytes,
    embedding_bytes,
    engine_activation_bytes,
    layer_terms,
    output_terms,
    rank_activation_bytes,
)
from engine.scaling.memory import activation_bytes_per_layer, estimate_activations
from tests.distributed import run_distributed

S, D, VOCAB = 24, 32, 128  # distinct from each other and from ffn_hidden (gpt2 128, llama 64)


def _cfg(arch, layers, kernels, kv=0, recompute="none"):
    return ModelConfig(arch=arch, n_layers=layers, d_model=D, n_heads=4, n_kv_heads=kv, seq_len=S,
                       vocab_size=VOCAB, kernels=kernels, recompute=recompute)  # fmt: skip


def _build(model_cfg, tp=1, sp=False):
    if tp == 1:
        model = GPT(resolve(model_cfg), seed=1)
        apply_recompute(model, model_cfg.recompute)
        return model
    conf = Config(model=model_cfg)
    conf.parallel.tp, conf.parallel.sp = tp, sp
    with torch.device("meta"):
        model = GPT(resolve(model_cfg))
    [wrapped] = parallelize_gpt(model, ParallelDims.from_world(tp=tp), conf, device="cpu")
    return wrapped


def _saved_bytes(model, batch):
    """Bytes of the distinct storages the forward saves for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    # two storages, as a training batch has (one would hide whichever of the two a path does not keep)
    pair = torch.randint(0, VOCAB, (2, batch, S), generator=torch.Generator().manual_seed(0))
    tokens, targets = pair[0].clone(), pair[1].clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, targets)
    return sum(seen.values()), model


def _measure(arch, kernels, kv=0, recompute="none", tp=1, sp=False):
    """(one layer of one sample, embedding + output of one sample, the (L=2, b=2) total)."""
    got = {}
    for layers in (1, 2):
        for b in (1, 2):
            got[layers, b] = _saved_bytes(_build(_cfg(arch, layers, kernels, kv, recompute), tp, sp), b)
    m = {k: v[0] for k, v in got.items()}
    layer = m[2, 2] - m[1, 2] - m[2, 1] + m[1, 1]
    return layer, m[1, 2] - m[1, 1] - layer, m[2, 2]


def _expected(arch, kernels, kv=0, recompute="none", tp=1, sp=False):
    cfg = resolve(_cfg(arch, 2, kernels, kv, recompute))
    layer = sum(layer_terms(cfg, S, tp, sp, recompute, kernels).values())

    def ends(n):
        return embedding_bytes(n, tp) + sum(output_terms(cfg, n, tp, sp, kernels).values())

    total = engine_activation_bytes(cfg, 2, 2, tp, sp, recompute=recompute, kernels=kernels)
    return layer, ends(2 * S) - ends(S), total + autocast_weight_bytes(cfg, 2, tp, recompute, kernels)


def _check(case, measured):
    layer, ends, total = measured
    want_layer, want_ends, want = _expected(**case)
    assert layer == want_layer, (case, "layer", layer, want_layer)
    assert ends == want_ends, (case, "embedding + output", ends, want_ends)
    # Absolute: activations plus autocast's weight copies, to within the small tensors the tally leaves out
    # (rotary tables, 3 KiB here; scalars; masks of a few bytes).
    assert abs(total - want) <= 4096 + 0.002 * want, (case, "total", total, want)


SINGLE = [
    dict(arch="gpt2", kernels="torch"),
    dict(arch="gpt2", kernels="torch", recompute="selective"),
    dict(arch="gpt2", kernels="torch", recompute="full"),
    dict(arch="llama", kernels="torch", kv=2),
    dict(arch="llama", kernels="triton", kv=2),
    dict(arch="llama", kernels="torch", kv=2, recompute="full"),
]


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_tally_equals_saved_tensors(case):
    _check(case, _measure(**case))


TP = [
    dict(arch="gpt2", kernels="torch", tp=2),
    dict(arch="llama", kernels="torch", kv=2, tp=2, sp=True),
    dict(arch="llama", kernels="torch", kv=1, tp=2, recompute="selective"),
    dict(arch="gpt2", kernels="torch", tp=2, sp=True, recompute="selective"),  # regathered, and the GELU recomputed
]


def _tp_worker(rank, world):
    return [_measure(**case) for case in TP]


@pytest.mark.distributed
def test_tally_equals_saved_tensors_under_tp():
    measured = run_distributed(_tp_worker, 2)[0]
    for case, got in zip(TP, measured, strict=True):
        _check(case, got)


def test_engine_layers_store_more_than_korthikantis_block():
    """The engine's layers against Korthikanti's selective-recompute figure (no s x s scores, as flash stores) at a
    7B-like shape (d_model 4096, 32 heads, seq 4096): 1.06x gpt2, 1.06x llama (Triton), 1.45x llama (torch)."""
    s, h, a = 4096, 4096, 32
    korthikanti = activation_bytes_per_layer(s, 1, h, a, recompute="selective")
    ratios = {}
    for arch, kernels in (("gpt2", "torch"), ("llama", "triton"), ("llama", "torch")):
        cfg = resolve(ModelConfig(arch=arch, n_layers=1, d_model=h, n_heads=a, seq_len=s, vocab_size=VOCAB))
        ratios[arch, kernels] = float(sum(layer_terms(cfg, s, kernels=kernels).values()) / korthikanti)
    assert 1.05 < ratios["gpt2", "torch"] < 1.07, ratios
    assert 1.05 < ratios["llama", "triton"] < 1.07, ratios
    assert 1.44 < ratios["llama", "torch"] < 1.46, ratios


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(arch="gpt2", dropout=0.1), "dropout 0"),
        (dict(arch="llama", recompute="some"), "recompute must be"),
        (dict(arch="llama", kernels="cuda"), "kernels must be"),
        (dict(arch="llama", tp=3), "tp must be"),
    ],
)
def test_bad_arguments(kw, message):
    kw = dict(kw)
    recompute, kernels, tp = kw.pop("recompute", "none"), kw.pop("kernels", "torch"), kw.pop("tp", 1)
    cfg = resolve(ModelConfig(n_layers=1, d_model=D, n_heads=4, seq_len=S, vocab_size=VOCAB, **kw))
    with pytest.raises(ValueError, match=message):
        layer_terms(cfg, S, tp, recompute=recompute, kernels=kernels)


def test_rank_bytes_fall_back_to_korthikanti_with_dropout():
    """dropout > 0 is outside the tally: the dry run and the planner count Korthikanti's figure (masks included)."""
    cfg = resolve(_cfg("llama", 2, "triton"))
    want = estimate_activations(S, 2, D, 4, VOCAB, 2, tp=2, sp=True).total_bytes
    assert rank_activation_bytes(replace(cfg, dropout=0.1), 2, 2, tp=2, sp=True) == want
    tally = engine_activation_bytes(cfg, 2, 2, tp=2, sp=True) + autocast_weight_bytes(cfg, 2, tp=2)
    assert rank_activation_bytes(cfg, 2, 2, tp=2, sp=True) == tally != want
