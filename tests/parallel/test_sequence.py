"""Sequence-parallel mappings, and the real decoder block (engine.model.gpt.Block) over tp against the unsharded block,
forward and backward, with and without sequence parallelism, at tp=4 and tp=2 (one 4-process world). Whole-model
training in every layout: test_model_tp.py."""

import copy

import pytest
import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.model.gpt import Block, resolve
from engine.model.ops import rope_cos_sin
from engine.parallel import state
from engine.parallel.grads import finish_tp_grads
from engine.parallel.parallelize import apply_tensor_parallel, block_plan
from engine.parallel.sequence import (
    ShapeError,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    split,
)
from engine.parallel.tensor import gather_full
from tests.distributed import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _close(a, b, what, rtol=TOL["rtol"], atol=TOL["atol"]):
    # Not torch.testing.assert_close: its first call costs seconds of imports in every spawned process.
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    err = (a.double() - b.double()).abs()
    bad = err > atol + rtol * b.double().abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{a.numel()} elements differ, max abs error {err.max().item():.3g}"


def _check_mappings(group, tp):
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(0)
    for dim in (1, 0):
        full = torch.randn(4, 8, 3, generator=gen)  # both dims divisible by tp = 2 and 4
        dy = torch.randn(4, 8, 3, generator=gen)
        n = full.shape[dim] // tp
        mine = full.narrow(dim, rank * n, n)
        # scatter: forward keeps my slice, backward all-gathers.
        x = full.clone().requires_grad_()
        y = scatter_to_sequence_parallel_region(x, group, seq_dim=dim)
        assert torch.equal(y, mine)
        y.backward(dy.narrow(dim, rank * n, n))
        assert torch.equal(x.grad, dy)
        # gather: forward all-gathers; backward reduce-scatters (tp_output_grad) or splits.
        for tp_grad in (True, False):
            x = mine.clone().requires_grad_()
            y = gather_from_sequence_parallel_region(x, group, seq_dim=dim, tp_output_grad=tp_grad)
            assert torch.equal(y, full)
            y.backward(dy * (rank + 1))  # a different upstream gradient on every rank
            expected = dy.narrow(dim, rank * n, n) * (tp * (tp + 1) / 2 if tp_grad else rank + 1)
            _close(x.grad, expected, f"gather backward (tp_output_grad={tp_grad})")
        # reduce-scatter: forward sums and keeps my slice; backward all-gathers.
        x = (full * (rank + 1)).requires_grad_()
        y = reduce_scatter_to_sequence_parallel_region(x, group, seq_dim=dim)
        _close(y, mine * tp * (tp + 1) / 2, "reduce-scatter forward")
        y.backward(dy.narrow(dim, rank * n, n))
        _close(x.grad, dy, "reduce-scatter backward")
    try:
        split(torch.zeros(2, tp + 1), 1, group)
    except ShapeError as e:
        return str(e)


def _check_block(group, tp, sp, arch):
    """The block over tp (gpt2: biases, LayerNorm; llama: GQA, RoPE, SwiGLU) against the unsharded block."""
    cfg = resolve(ModelConfig(arch=arch, n_layers=1, d_model=16, n_heads=4, n_kv_heads=2 if arch == "llama" else 0,
                              ffn_hidden=32, vocab_size=13, kernels="torch"))  # fmt: skip
    torch.manual_seed(20)
    ref = Block(cfg)
    block = copy.deepcopy(ref)
    sharding = apply_tensor_parallel(block, group, sp, model_cfg=cfg, plan=block_plan())
    cos, sin = rope_cos_sin(8, 4, cfg.rope_theta) if arch == "llama" else (None, None)
    params = dict(block.named_parameters())
    assert params.keys() == dict(ref.named_parameters()).keys()
    for name, p in ref.named_parameters():  # converted layers hold their slices of the plain block's weights
        assert torch.equal(gather_full(params[name], sharding.get(name), group), p), f"init of {name}"
    gen = torch.Generator().manual_seed(21)
    x, dy = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    h = scatter_to_sequence_parallel_region(x_par, group) if sp else x_par
    y = block(h, cos, sin)
    assert y.shape == (2, 8 // tp if sp else 8, 16)
    if sp:
        y = gather_from_sequence_parallel_region(y, group, tp_output_grad=False)
    (y * dy).sum().backward()
    reduced = finish_tp_grads(block, group)
    # sp: norm gains (llama 2; gpt2 2 + 2 norm biases + 2 row-parallel biases); llama's 2 kv heads are replicated at
    # tp=4: the k and v weights
    expected = ({"llama": 2, "gpt2": 6}[arch] if sp else 0) + (2 if arch == "llama" and tp == 4 else 0)
    assert reduced == expected
    y_ref = ref(x_ref, cos, sin)
    (y_ref * dy).sum().backward()
    _close(y, y_ref, f"{arch} block output (sp={sp})")
    _close(x_par.grad, x_ref.grad, f"{arch} block input grad (sp={sp})")
    for name, p in ref.named_parameters():
        q = params[name]
        grad = gather_full(q.grad, sharding.get(name), group)
        _close(grad, p.grad, f"{arch} grad of {name} (sp={sp})")


def _sequence_worker(rank, world):
    out = {}
    for tp in (4, 2):
        state.initialize(tp=tp)
        try:
            group = state.get_tp_group()
            out[tp] = {"split_error": _check_mappings(group, tp)}
            for sp in (False, True):
                for arch in ("llama", "gpt2"):
                    _check_block(group, tp, sp, arch)
        finally:
            state.destroy()
    return out


@pytest.mark.distributed
def test_sequence_parallel_mappings_and_block_match_unsharded():
    results = run_distributed(_sequence_worker, 4, timeout=240)
    for by_tp in results:
        for tp, res in by_tp.items():
            assert res["split_error"] == f"dimension 1 of size {tp + 1} is not divisible by the group size {tp}"
