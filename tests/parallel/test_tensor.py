"""Each tensor-parallel layer against its torch.nn twin on the gathered weights, forward and backward, at tp=4 and
tp=2 (two tp groups beside each other in one 4-process world), including init equality and odd vocabularies."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel import state
from engine.parallel.grads import finish_tp_grads
from engine.parallel.sequence import all_gather, allreduce_grads, split
from engine.parallel.sharding import ParamSharding
from engine.parallel.tensor import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    attention_heads_per_rank,
    check_tp_divisibility,
    gather_full,
    shard_full_,
    vocab_parallel_cross_entropy,
)
from tests.distributed import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(a, b, what, rtol=TOL["rtol"], atol=TOL["atol"]):
    # Not torch.testing.assert_close: its first call costs seconds of imports in every spawned process.
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    err = (a.double() - b.double()).abs()
    bad = err > atol + rtol * b.double().abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{a.numel()} elements differ, max abs error {err.max().item():.3g}"


def _grad_full(param, spec, group):
    """The full (unpadded) gradient of a sharded parameter."""
    full = all_gather(param.grad, spec.dim, group)
    return full.narrow(spec.dim, 0, spec.global_shape[spec.dim])


def _inputs(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _check_column(group, tp):
    for gather_output, out in ((True, 8), (False, 8), (True, 7)):  # 7: padded to a multiple of tp
        torch.manual_seed(10)
        ref = nn.Linear(6, out)
        torch.manual_seed(10)
        col = ColumnParallelLinear(6, out, gather_output=gather_output, pad_output=out % tp != 0, group=group)
        assert torch.equal(gather_full(col.weight, col.weight_spec, group), ref.weight), "init differs from nn.Linear"
        converted = ColumnParallelLinear.from_linear(ref, gather_output=gather_output, pad_output=out % tp != 0,
                                                     group=group)  # fmt: skip
        assert torch.equal(converted.weight, col.weight) and torch.equal(converted.bias, col.bias), "from_linear"
        assert torch.equal(gather_full(col.bias, col.bias_spec, group), ref.bias)
        assert col.weight.shape == (-(-out // tp), 6)
        x, x_ref = _inputs(3, 5, 6, seed=1), _inputs(3, 5, 6, seed=1)
        dy = torch.randn(3, 5, out, generator=torch.Generator().manual_seed(2))
        y, y_ref = col(x), ref(x_ref)
        if gather_output:
            _close(y, y_ref, "column output")
            y.backward(dy)
        else:  # this rank's output columns, and their slice of the upstream gradient
            _close(y, split(y_ref, -1, group), "column output")
            y.backward(split(dy, -1, group))
        y_ref.backward(dy)
        _close(x.grad, x_ref.grad, "column input grad")
        _close(_grad_full(col.weight, col.weight_spec, group), ref.weight.grad, "column weight grad")
        _close(_grad_full(col.bias, col.bias_spec, group), ref.bias.grad, "column bias grad")
        if out % tp:
            assert torch.count_nonzero(all_gather(col.weight.grad, 0, group)[out:]) == 0, "padding rows got gradient"


def _check_row(group, tp):
    for input_is_parallel in (True, False):
        torch.manual_seed(11)
        ref = nn.Linear(8, 5)
        torch.manual_seed(11)
        row = RowParallelLinear(8, 5, input_is_parallel=input_is_parallel, group=group)
        assert torch.equal(gather_full(row.weight, row.weight_spec, group), ref.weight)
        assert torch.equal(row.bias, ref.bias)
        converted = RowParallelLinear.from_linear(ref, input_is_parallel=input_is_parallel, group=group)
        assert torch.equal(converted.weight, row.weight) and torch.equal(converted.bias, row.bias), "from_linear"
        x, x_ref = _inputs(2, 4, 8, seed=3), _inputs(2, 4, 8, seed=3)
        y = row(split(x, -1, group) if input_is_parallel else x)
        y_ref = ref(x_ref)
        _close(y, y_ref, "row output")
        dy = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(4))
        y.backward(dy)
        y_ref.backward(dy)
        x_grad = x.grad if not input_is_parallel else x.grad.narrow(-1, dist.get_rank(group) * 8 // tp, 8 // tp)
        x_grad_ref = x_ref.grad if not input_is_parallel else split(x_ref.grad, -1, group)
        _close(x_grad, x_grad_ref, "row input grad")
        _close(_grad_full(row.weight, row.weight_spec, group), ref.weight.grad, "row weight grad")
        _close(row.bias.grad, ref.bias.grad, "row bias grad")


def _check_embedding(group, tp):
    for vocab in (11, 5):  # 5 at tp=4: padded to 8, the last rank's shard is all padding
        torch.manual_seed(12)
        ref = nn.Embedding(vocab, 6)
        torch.manual_seed(12)
        emb = VocabParallelEmbedding(vocab, 6, group=group)
        assert emb.num_embeddings_padded % tp == 0 and emb.num_embeddings_padded - vocab < tp
        assert torch.equal(gather_full(emb.weight, emb.weight_spec, group), ref.weight), "init"
        ids = torch.tensor([[0, vocab - 1, 3, 3], [1, 2, vocab - 2, 0]])
        y, y_ref = emb(ids), ref(ids)
        _close(y, y_ref, "embedding output")
        dy = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(5))
        y.backward(dy)
        y_ref.backward(dy)
        _close(_grad_full(emb.weight, emb.weight_spec, group), ref.weight.grad, "embedding grad")
        assert torch.count_nonzero(all_gather(emb.weight.grad, 0, group)[vocab:]) == 0


def _check_cross_entropy(group, tp):
    gen = torch.Generator().manual_seed(6)
    for vocab in (11, 5, 12):
        padded = -(-vocab // tp) * tp
        full = torch.randn(3, 4, padded, generator=gen) * 3  # padding columns hold junk: they must be masked
        target = torch.randint(0, vocab, (3, 4), generator=gen)
        target[0, 1] = target[2, 3] = -100
        ref_logits = full[..., :vocab].clone().requires_grad_()
        local = split(full, -1, group).requires_grad_()
        for reduction in ("mean", "sum", "none"):
            loss = vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab, reduction=reduction)
            ref = F.cross_entropy(ref_logits.transpose(1, 2), target, reduction=reduction)
            _close(loss, ref, f"cross-entropy {reduction} (vocab {vocab})")
        w = torch.randn(3, 4, generator=gen)
        (vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab, reduction="none") * w).sum().backward()
        (F.cross_entropy(ref_logits.transpose(1, 2), target, reduction="none") * w).sum().backward()
        grad_ref = F.pad(ref_logits.grad, (0, padded - vocab))
        _close(local.grad, split(grad_ref, -1, group), f"cross-entropy grad (vocab {vocab})")
    # bf16 logits: the loss is computed in fp32, the gradient comes back in bf16.
    local = split(full, -1, group).to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group, vocab_size=vocab)
    loss.backward()
    assert loss.dtype == torch.float32 and local.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(full[..., :vocab].to(torch.bfloat16).float().transpose(1, 2), target)
    _close(loss, ref, "bf16 cross-entropy", atol=1e-5)


def _check_replicated_kv(group, tp):
    """GQA with fewer kv heads than tp ranks (tp=4: 2 kv heads; tp=2: 1): each rank keeps its q heads' kv head."""
    n_kv, hd = tp // 2, 3
    assert attention_heads_per_rank(8, n_kv, tp) == (8 // tp, 1, True)
    torch.manual_seed(13)
    ref = nn.Linear(6, n_kv * hd)
    torch.manual_seed(13)
    kv = ReplicatedKVLinear(6, n_kv, hd, bias=True, group=group)
    assert torch.equal(kv.weight, ref.weight) and torch.equal(kv.bias, ref.bias)
    converted = ReplicatedKVLinear.from_linear(ref, n_kv, hd, group=group)
    assert torch.equal(converted.weight, kv.weight) and torch.equal(converted.bias, kv.bias), "from_linear"
    rank = dist.get_rank(group)
    head = rank // (tp // n_kv)
    x, x_ref = _inputs(2, 4, 6, seed=7), _inputs(2, 4, 6, seed=7)
    y, y_ref = kv(x), ref(x_ref)
    _close(y, y_ref[..., head * hd : (head + 1) * hd], "replicated kv output")
    # Every rank's attention sends back its own gradient; the unsharded kv head receives the sum over its ranks.
    dys = torch.randn(tp, 2, 4, hd, generator=torch.Generator().manual_seed(8))
    y.backward(dys[rank])
    assert kv.weight_spec.grad_needs_tp_sum and kv.bias_spec.grad_needs_tp_sum
    # a layer used on its own (no parallelize_gpt registry): finish_tp_grads reads the layer's own shardings
    assert finish_tp_grads(kv, group) == 2
    assert allreduce_grads([], group) == 0
    dy_full = torch.cat([dys[h * (tp // n_kv) : (h + 1) * (tp // n_kv)].sum(0) for h in range(n_kv)], dim=-1)
    y_ref.backward(dy_full)
    _close(x.grad, x_ref.grad, "replicated kv input grad")
    _close(kv.weight.grad, ref.weight.grad, "replicated kv weight grad")
    _close(kv.bias.grad, ref.bias.grad, "replicated kv bias grad")


def _check_errors(group, tp):
    messages = []
    for make in (
        lambda: ColumnParallelLinear(6, 4 * tp + 1, group=group),
        lambda: RowParallelLinear(4 * tp + 1, 6, group=group),
        lambda: ColumnParallelLinear(6, 8, gather_output=True, sequence_parallel=True, group=group),
        lambda: RowParallelLinear(8, 6, input_is_parallel=False, sequence_parallel=True, group=group),
        lambda: vocab_parallel_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), group),
        lambda: check_tp_divisibility(4 * tp + 1, 1, 8 * tp, tp),
        lambda: check_tp_divisibility(4 * tp, 3, 8 * tp, tp),
        lambda: check_tp_divisibility(6 * tp, 3 * tp // 2, 8 * tp, tp),
        lambda: check_tp_divisibility(8 * tp, 8, 8 * tp + 1, tp),
    ):
        try:
            make()
        except ValueError as e:
            messages.append(str(e))
    return messages


def _layers_worker(rank, world):
    out = {}
    for tp in (4, 2):
        state.initialize(tp=tp)
        try:
            group = state.get_tp_group()
            _check_column(group, tp)
            _check_row(group, tp)
            _check_embedding(group, tp)
            _check_cross_entropy(group, tp)
            _check_replicated_kv(group, tp)
            out[tp] = _check_errors(group, tp)
        finally:
            state.destroy()
    return out


@pytest.mark.distributed
def test_layers_match_torch_nn_at_tp4_and_tp2():
    results = run_distributed(_layers_worker, 4, timeout=240)
    for by_tp in results:
        for tp, messages in by_tp.items():
            assert len(messages) == 9, messages
            assert f"out_features = {4 * tp + 1} is not divisible by the tensor-parallel size {tp}" in messages[0]
            assert f"in_features = {4 * tp + 1} is not divisible" in messages[1]
            assert "gather_output=True cannot be combined with sequence_parallel" in messages[2]
            assert "needs input_is_parallel=True" in messages[3]
            assert "disagree before the vocab dim" in messages[4]
            assert f"model.n_heads = {4 * tp + 1} is not divisible by parallel.tp = {tp}" in messages[5]
            assert "is not a multiple of model.n_kv_heads = 3" in messages[6]
            assert f"model.n_kv_heads = {3 * tp // 2} and parallel.tp = {tp}: one must divide the other" in messages[7]
            assert f"model.ffn_hidden = {8 * tp + 1} is not divisible by parallel.tp = {tp}" in messages[8]
            assert all("\n" not in m for m in messages)


def test_shard_range_places_each_ranks_rows_and_its_padding():
    """5 rows over tp 4 pad to 8: ranks hold rows [0, 2), [2, 4), [4, 5) + one padding row, and two padding rows."""
    specs = [ParamSharding((5, 3), dim=0, rank=r, size=4, padded=8) for r in range(4)]
    full = torch.arange(15.0).reshape(5, 3)
    assert [s.shard_range() for s in specs] == [(0, 0, 2), (0, 2, 2), (0, 4, 1), (0, 6, 0)]
    assert [s.offsets() for s in specs] == [[0, 0], [2, 0], [4, 0], [6, 0]]
    parts = [shard_full_(torch.full((2, 3), 7.0), s, full) for s in specs]
    torch.testing.assert_close(torch.cat(parts)[:5], full, rtol=0, atol=0)
    assert not torch.cat(parts)[5:].any()  # padding rows are zero
    assert [tuple(s.valid_local(p).shape) for s, p in zip(specs, parts)] == [(2, 3), (2, 3), (1, 3), (0, 3)]
    with pytest.raises(ValueError, match="full shape|shape"):
        shard_full_(torch.zeros(2, 3), specs[0], torch.zeros(4, 3))


def test_rng_tracker_forks_and_restores():
    from engine.parallel.rng import RNGStatesTracker, model_parallel_seed
    from engine.parallel.tensor import init_param_

    draws = []
    for tp_rank in (0, 1):
        tracker = model_parallel_seed(7, tp_rank)
        a = torch.rand(3)
        with tracker.fork("tp"):
            b = torch.rand(3)
        with tracker.fork("tp"):
            c = torch.rand(3)  # the tracked stream advanced: no repeat
        d = torch.rand(3)  # the default stream continues as if the forks never happened
        draws.append((a, b, c, d))
    torch.manual_seed(7)
    assert torch.equal(draws[0][0], torch.rand(3)) and torch.equal(draws[0][3], torch.rand(3))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][3], draws[1][3])  # same on every tp rank
    assert not torch.equal(draws[0][1], draws[1][1])  # tp stream differs per tp rank
    assert not torch.equal(draws[0][1], draws[0][2])
    tracker = RNGStatesTracker()
    with pytest.raises(ValueError, match="never added"):
        with tracker.fork("tp"):
            pass
    tracker.add("x", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("x", 2)
    saved = tracker.get_states()
    with tracker.fork("x"):
        first = torch.rand(2)
    tracker.set_states(saved)
    with tracker.fork("x"):
        assert torch.equal(torch.rand(2), first)  # checkpointed states replay
    p = nn.Parameter(torch.empty(4))
    init_param_(p, ParamSharding((4,)), nn.init.ones_)  # an unsharded parameter: init_fn runs on it directly
    assert torch.equal(p.detach(), torch.ones(4))
