"""Context parallelism (engine/parallel/context.py): ring and all-to-all attention over real gloo groups against
attention over the whole sequence in one process, forward and backward, fp32 to 1e-5; the zigzag layout; the
communication of one ring attention call against its closed form; one-line errors."""

import pytest
import torch
import torch.distributed as dist

from engine.model.ops import attention
from engine.parallel.comm_count import count_collectives
from engine.parallel.context import (
    check_context_parallel,
    ring_attention,
    shard_sequence,
    ulysses_attention,
    zigzag_positions,
)
from engine.parallel.state import LayoutError
from engine.scaling.layout import cp_wire_bytes
from tests.distributed import run_distributed


def _close(a, b, what, tol=1e-5):
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    err = (a.double() - b.double()).abs()
    bad = err > tol + tol * b.double().abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{a.numel()} elements differ, max abs error {err.max().item():.3g}"


def _documents(b, s, gen):
    """Segment ids of packed documents: 1 to 5 per row, random lengths."""
    seg = torch.zeros(b, s, dtype=torch.long)
    for row in range(b):
        cuts = torch.randperm(s - 1, generator=gen)[: int(torch.randint(0, 5, (1,), generator=gen))] + 1
        for c in cuts.tolist():
            seg[row, c:] += 1
    return seg


def _case(seed, b=2, s=24, hq=4, hk=2, d=8, docs=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(b, s, h, d, generator=gen) for h in (hq, hk, hk, hq))
    return q, k, v, dy, _documents(b, s, gen) if docs else None


def _check_layouts(rank, world, impls, backend="torch", s=24):
    """Each case (impl, causal, docs, kv heads[, per-row prefix lengths]) against one-process attention."""
    group = dist.group.WORLD
    for seed, (impl, causal, docs, hk, *prefix) in enumerate(impls):
        prefix = torch.tensor(prefix[0]) if prefix else None
        q, k, v, dy, seg = _case(seed, b=2 if prefix is None else len(prefix), s=s, hk=hk, docs=bool(docs))
        if docs == "negative":  # any integer ids: none may meet the ring's fill past a prefix
            seg = seg - 1
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, causal=causal, backend="torch", segment_ids=seg, prefix_lengths=prefix)
        ref.backward(dy)
        mine = [shard_sequence(t, world, rank).requires_grad_() for t in (q, k, v)]
        my_seg = None if seg is None else shard_sequence(seg, world, rank)
        if impl == "ring":
            out = ring_attention(*mine, group, causal=causal, segment_ids=my_seg, backend=backend,
                                 prefix_lengths=prefix)  # fmt: skip
        else:
            out = ulysses_attention(*mine, group, causal=causal, segment_ids=my_seg, backend=backend,
                                    prefix_lengths=prefix)  # fmt: skip
        out.backward(shard_sequence(dy, world, rank))
        what = f"{impl} cp={world} causal={causal} docs={docs} hk={hk} prefix={prefix} {backend}"
        _close(out, shard_sequence(ref, world, rank), f"{what} out")
        for name, m, full in zip("qkv", mine, leaves):
            _close(m.grad, shard_sequence(full.grad, world, rank), f"{what} d{name}")
    return True


# Per-row prefixes (prefix LM) over 24 tokens (cp 2: chunks of 6, rank 0 holding positions 0-5 and 18-23; cp 4:
# chunks of 3): none, inside the first chunk, across a chunk boundary, into the last chunk, the whole row.
PREFIXES = (0, 5, 8, 19, 24)


def test_ring_and_alltoall_match_whole_sequence_attention_cp2():
    cases = [("ring", True, False, 2), ("ring", True, True, 2), ("ring", False, True, 4), ("ring", True, True, 1),
             ("alltoall", True, False, 2), ("alltoall", True, True, 1), ("alltoall", False, True, 4),
             ("ring", True, False, 2, PREFIXES), ("ring", True, True, 1, PREFIXES),
             ("ring", True, "negative", 2, PREFIXES)]  # fmt: skip
    assert all(run_distributed(_check_layouts, 2, cases))


def test_ring_and_alltoall_match_whole_sequence_attention_cp4():
    cases = [("ring", True, True, 2), ("ring", False, False, 2), ("alltoall", True, True, 4),
             ("ring", True, False, 2, PREFIXES + (13, 2))]  # fmt: skip
    assert all(run_distributed(_check_layouts, 4, cases))


def test_ring_with_our_flash_attention_kernel_cp2():
    """The ring's blocks through the Triton kernel's host functions (interpreter): segment ids of the query and the
    travelling key blocks, of different lengths in the half-sequence steps; 40 tokens make 20-token chunks, more than
    one 16-wide tile; per-row prefixes (the kernel's own at step 0, a key run by segment ids after it)."""
    cases = [("ring", True, True, 2), ("ring", False, True, 1), ("ring", True, False, 2, (0, 7, 23, 31, 40)),
             ("ring", True, True, 1, (3, 27))]  # fmt: skip
    env = {"TRITON_INTERPRET": "1"}
    assert all(run_distributed(_check_layouts, 2, cases, "triton", 40, env=env))


def _ring_comm(rank, world, b, s, hk, d, docs):
    q, k, v, dy, seg = _case(0, b=b, s=s, hq=hk, hk=hk, d=d, docs=docs)
    mine = [shard_sequence(t, world, rank).requires_grad_() for t in (q, k, v)]
    my_seg = None if seg is None else shard_sequence(seg, world, rank)
    with count_collectives() as fwd:
        out = ring_attention(*mine, dist.group.WORLD, segment_ids=my_seg, backend="torch")
    with count_collectives() as bwd:
        out.backward(shard_sequence(dy, world, rank))
    return [(r.op, r.payload_bytes) for r in fwd.records], [(r.op, r.payload_bytes) for r in bwd.records]


@pytest.mark.parametrize("world, docs", [(2, True), (4, False)])
def test_ring_communication_matches_closed_form(world, docs):
    """One ring attention call on an fp32 (b, s/cp, h, d) shard: the forward sends k and v (and the int32 segment
    ids) to the next rank cp - 1 times and receives as many; the backward rotates them again and sends each k/v
    gradient accumulator (fp32) cp times, the last one home."""
    b, s, hk, d = 2, 8 * world, 2, 8
    kv_bytes = b * (s // world) * hk * d * 4
    seg_bytes = b * (s // world) * 4
    per_step = [kv_bytes, kv_bytes] + ([seg_bytes] if docs else [])
    rotations = world - 1
    for fwd, bwd in run_distributed(_ring_comm, world, b, s, hk, d, docs):
        assert sorted(fwd) == sorted([("send", n) for n in per_step] * rotations + [("recv", n) for n in per_step]
                                     * rotations)  # fmt: skip
        grads = [kv_bytes, kv_bytes] * world
        expect = [("send", n) for n in per_step] * rotations + [("recv", n) for n in per_step] * rotations
        expect += [("send", n) for n in grads] + [("recv", n) for n in grads]
        assert sorted(bwd) == sorted(expect)
        sent = sum(n for op, n in fwd + bwd if op == "send")
        assert sent == 2 * rotations * sum(per_step) + world * 2 * kv_bytes
        # the layout planner's per-layer figure (engine.scaling.layout.cp_wire_bytes), K and V together
        assert sent == cp_wire_bytes(2 * kv_bytes, world) + (2 * rotations * seg_bytes if docs else 0)


def test_cpu_flash_blocks_match_the_references():
    """The ring's CPU block math (torch's fused flash attention op) against kernels/attention.py's references: GQA,
    causal and not, segment ids of different query and key lengths with rows that see no key (out 0, lse -inf,
    gradients 0), and the backward from a given lse."""
    from engine.parallel.context import _cpu_flash_backward, _cpu_flash_forward
    from kernels.attention import flash_attention_backward_reference, flash_attention_forward_reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8, generator=gen), torch.randn(2, 6, 2, 8, generator=gen), torch.randn(2, 6, 2, 8)
    seg_q, seg_k = torch.tensor([[0] * 4 + [1] * 4 + [7] * 4] * 2), torch.tensor([[0] * 3 + [1] * 3] * 2)
    dout = torch.randn(2, 12, 4, 8, generator=gen)
    for causal, segs in ((True, None), (False, None), (False, (seg_q, seg_k))):
        sq, sk = segs or (None, None)
        kq = q[:, :6] if causal else q  # the causal ring block is square
        out, lse = _cpu_flash_forward(kq, k, v, causal, 0.3, seg_q=sq, seg_k=sk)
        want = flash_attention_forward_reference(kq, k, v, causal, 0.3, seg_q=sq, seg_k=sk)
        _close(out, want[0], "out")
        _close(lse, want[1], "lse")
        got = _cpu_flash_backward(dout[:, : kq.shape[1]], None, kq, k, v, out, lse, causal, 0.3, seg_q=sq, seg_k=sk)
        ref = flash_attention_backward_reference(dout[:, : kq.shape[1]], None, kq, k, v, out, lse, causal, 0.3,
                                                 seg_q=sq, seg_k=sk)  # fmt: skip
        for name, a, b in zip(("dq", "dk", "dv"), got, ref):
            _close(a, b, f"{name} causal={causal} segments={segs is not None}")
    assert torch.isneginf(lse[:, :, 8:]).all() and (out[:, 8:] == 0).all()  # segment 7 has no keys


def test_zigzag_layout_and_errors():
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    held = torch.cat([zigzag_positions(24, 4, r) for r in range(4)]).sort().values
    assert torch.equal(held, torch.arange(24))
    t = torch.arange(32).view(2, 16)
    assert torch.equal(shard_sequence(t, 2, 1), t[:, 4:12])
    assert shard_sequence(t, 1, 0) is t
    with pytest.raises(LayoutError, match="not divisible by 2 x parallel.cp = 4"):
        check_context_parallel(30, 2, "ring")
    with pytest.raises(LayoutError, match="heads .* not divisible by parallel.cp = 4"):
        check_context_parallel(32, 4, "alltoall", heads=6)
    with pytest.raises(LayoutError, match="cp_impl must be one of"):
        check_context_parallel(32, 2, "star")
