"""Context parallelism: the sequence split over `cp` ranks, attention computed across them (ring or all-to-all).

Layout (zigzag, for causal balance; Megatron-Core's context parallelism, ring-flash-attention's zigzag variant):
the sequence is cut into 2 cp chunks and rank r holds chunks r and 2cp-1-r, so every rank holds as much of the
cheap start of the causal triangle as of its expensive end. `zigzag_positions` gives the positions a rank holds;
`shard_sequence` cuts any per-token tensor (tokens, labels, positions, segment ids) the same way.

Ring (`ring_attention`; Liu et al. 2023, "Ring Attention with Blockwise Transformers"): the k/v blocks (and the
keys' segment ids) travel around the cp group, each step's transfer posted before the step's block is computed.
Each block gives a partial output and log-sum-exp; they merge by the log-sum-exp rule
    lse = logaddexp(lse_a, lse_b),  out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse).
With the zigzag layout, at step t rank r holds the k/v of rank s = r - t (mod cp): step 0 is causal attention over
its own two chunks; for s < r both its query chunks see all of s's first chunk (and none of its second); for s > r
only its second query chunk sees anything, all of s's two chunks. Blocks the causal mask hides are never computed,
and every step costs the same (2c x c query-key pairs for chunk length c; with a prefix, up to twice that). The
backward recomputes with the final lse (FlashAttention-2's backward per block), rotating k/v again; each k/v's
gradient accumulator (fp32) travels one rank behind it and arrives at its owner after the last step. A per-row prefix
(prefix LM) widens step 0's causal block by the kernel's own prefix and adds, at each later step, the block the causal
mask hid, its keys limited to the prefix (`_step_blocks`).

All-to-all (`ulysses_attention`; Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns (sequence shard, all
heads) into (whole sequence, heads / cp); attention runs over the whole sequence locally (in natural order: the
gathered zigzag chunks are permuted back) and the inverse all-to-all returns each rank's shard. kv heads not
divisible by cp are repeated to the query heads first.

Block math: our Triton FlashAttention host functions where the model's kernel backend resolves to triton; otherwise on
CPU torch's fused flash attention (its aten op returns the log-sum-exp and its backward takes the merged one), and the
plain-torch references of kernels/attention.py elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from engine.model import ops
from engine.model.attention import AttentionCore
from engine.parallel.state import LayoutError

CP_IMPLS = ("ring", "alltoall")


# --- the zigzag layout ---


def check_context_parallel(seq_len: int, cp: int, impl: str, heads: int | None = None) -> None:
    """One-line LayoutError for a layout context parallelism cannot run: the zigzag layout needs the sequence to split
    into 2 cp equal chunks; all-to-all needs the (this rank's) attention heads divisible by cp."""
    if impl not in CP_IMPLS:
        raise LayoutError(f"parallel.cp_impl must be one of {', '.join(CP_IMPLS)}, got {impl!r}")
    if cp > 1 and seq_len % (2 * cp):
        raise LayoutError(
            f"sequence length {seq_len} is not divisible by 2 x parallel.cp = {2 * cp} (the zigzag layout cuts it into "
            "2 cp equal chunks)"
        )
    if cp > 1 and impl == "alltoall" and heads is not None and heads % cp:
        raise LayoutError(
            f"parallel.cp_impl alltoall scatters attention heads over cp ranks: {heads} heads (per tp rank) are not "
            f"divisible by parallel.cp = {cp}; use cp_impl ring"
        )


def zigzag_positions(seq_len: int, cp: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The sequence positions rank `rank` of `cp` holds: chunks rank and 2cp-1-rank of 2 cp equal chunks."""
    check_context_parallel(seq_len, cp, "ring")
    c = seq_len // (2 * cp)
    ar = torch.arange(c, device=device)
    return torch.cat((rank * c + ar, (2 * cp - 1 - rank) * c + ar))


def shard_sequence(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag chunks of `t` along `dim` (a copy); `t` itself when cp is 1."""
    if cp == 1:
        return t
    return t.index_select(dim, zigzag_positions(t.shape[dim], cp, rank, t.device))


# --- block attention: one (query block, key block) pair, forward and backward ---


def _block_fns(backend: str, q: torch.Tensor):
    """(forward, backward) of one attention block: our kernels' host functions; on CPU otherwise torch's fused flash
    attention (which returns the log-sum-exp and takes one in its backward); elsewhere the torch references."""
    from kernels import attention as fa

    if ops.select(backend, q) == "triton":
        return fa.flash_attention_forward, fa.flash_attention_backward
    if q.device.type == "cpu":
        return _cpu_flash_forward, _cpu_flash_backward
    return fa.flash_attention_forward_reference, fa.flash_attention_backward_reference


def _cpu_block_args(q, k, v, causal, seg_q, seg_k, prefix_lengths=None):
    """(q, k, v as (b, h, s, d) with kv heads repeated to q's, is_causal, additive mask or None, rows with keys or
    None) for torch's CPU flash attention. Segment ids and a prefix become an additive mask of q's dtype (the op takes
    no bool one), with the causal triangle folded in."""
    from kernels.attention import attention_mask

    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    if seg_q is None and prefix_lengths is None:
        return qh, kh, vh, causal, None, None
    segs = None if seg_q is None else (seg_q, seg_k)
    allowed = attention_mask("ring attention", q, k, causal, segs, prefix_lengths=prefix_lengths)  # (b, 1, sq, sk)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return qh, kh, vh, False, mask, allowed.any(-1)


def _cpu_flash_forward(q, k, v, causal, scale, window=None, seg_q=None, seg_k=None, prefix_lengths=None):
    """One block's (out, lse) by torch's fused CPU flash attention (no window: context parallelism takes none)."""
    qh, kh, vh, is_causal, mask, seen = _cpu_block_args(q, k, v, causal, seg_q, seg_k, prefix_lengths)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    if seen is not None:  # the op gives lse 0 to a row without keys; it is -inf (and its output 0)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen.unsqueeze(-1), 0.0)
    return out.transpose(1, 2), lse.float()


def _cpu_flash_backward(dout, dlse, q, k, v, out, lse, causal, scale, window=None, seg_q=None, seg_k=None,
                        prefix_lengths=None):  # fmt: skip
    """One block's (dq, dk, dv) from the merged out and lse by the op's backward (no lse gradient: ring attention
    passes none); kv-head gradients summed over their query-head group."""
    if dlse is not None:
        raise ValueError("the CPU flash block backward takes no lse gradient")
    b, sk, hk, d = k.shape
    qh, kh, vh, is_causal, mask, _ = _cpu_block_args(q, k, v, causal, seg_q, seg_k, prefix_lengths)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # a row without keys: p = exp(s - inf) = 0
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), qh, kh, vh, out.transpose(1, 2), lse, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    group = q.shape[2] // hk
    dk, dv = (t.view(b, hk, group, sk, d).sum(2) if group > 1 else t for t in (dk, dv))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """Merges a block's (out, lse) into the running fp32 (out (b, s, h, d), lse (b, h, s)) in place."""
    new = torch.logaddexp(lse, blk_lse)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # rows without keys so far stay 0
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(blk_lse - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(blk_out.float() * w_new)
    lse.copy_(new)


def _step_plan(t: int, rank: int, cp: int, causal: bool, c: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of ring step t on `rank` in the zigzag layout (chunk length c)."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if t == 0:
        return everything, everything, True  # its own two chunks: causal over their concatenation
    src = (rank - t) % cp
    if src < rank:
        return everything, slice(0, c), False  # both query chunks see all of src's first chunk
    return slice(c, None), everything, False  # only the second query chunk sees src, all of it


def _step_blocks(t: int, rank: int, cp: int, causal: bool, c: int, seg: torch.Tensor | None,
                 seg_kv: torch.Tensor | None, prefix: torch.Tensor | None) -> list[tuple]:  # fmt: skip
    """The blocks ring step t computes on `rank`: (query rows, key rows, causal, seg_q, seg_k, kernel prefix).

    Without a prefix, `_step_plan`'s one block. With a per-row prefix (prefix LM: key j visible to every query when
    j < prefix_lengths[b], besides the causal keys), keys after the queries become visible up to the prefix, where the
    causal plan skips them. The zigzag chunks of a rank are in increasing position order, so the keys inside the
    prefix are always a leading run of a block's keys: at step 0 the kernel's own prefix (the run's length, which may
    span both chunks) widens the causal block; at later steps the block the causal mask hides is computed too, its
    keys past the run masked by segment ids (the documents' ids where there are documents; past the run, an id below
    every query's of the row)."""
    rows, cols, blk_causal = _step_plan(t, rank, cp, causal, c)

    def segs(r, k):
        return (None, None) if seg is None else (seg[:, r].contiguous(), seg_kv[:, k].contiguous())

    if prefix is None or not causal:
        return [(rows, cols, blk_causal, *segs(rows, cols), None)]

    def inside(start: int) -> torch.Tensor:  # keys of the chunk starting at `start` inside each row's prefix
        return (prefix - start).clamp(0, c)

    if t == 0:
        return [(rows, cols, True, *segs(rows, cols), inside(rank * c) + inside((2 * cp - 1 - rank) * c))]
    src = (rank - t) % cp
    first, second = src * c, (2 * cp - 1 - src) * c
    if src < rank:  # hidden: src's second chunk, after both query chunks
        hidden_rows, hidden_cols, run = slice(None), slice(c, None), inside(second)
    else:  # hidden: both of src's chunks, after this rank's first chunk
        hidden_rows, hidden_cols, run = slice(0, c), slice(None), inside(first) + inside(second)
    n_rows = 2 * c if hidden_rows.start is None else c
    n_cols = 2 * c if hidden_cols.start is None else c
    seg_q, seg_k = segs(hidden_rows, hidden_cols)
    if seg_q is None:
        seg_q = torch.zeros(prefix.shape[0], n_rows, dtype=torch.int64, device=prefix.device)
        seg_k = torch.zeros(prefix.shape[0], n_cols, dtype=torch.int64, device=prefix.device)
    seg_q, seg_k = seg_q.long(), seg_k.long()  # the fill below must not wrap around
    past = torch.arange(n_cols, device=prefix.device) >= run[:, None]
    seg_k = torch.where(past, seg_q.amin(1, keepdim=True) - 1, seg_k)  # an id no query of the row has
    return [(rows, cols, blk_causal, *segs(rows, cols), None), (hidden_rows, hidden_cols, False, seg_q, seg_k, None)]


class _Ring:
    """The cp group's ring: this rank's neighbours and the batched transfers of one step."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Posts sends of `tensors` to the next rank and receives of same-shaped ones from the previous rank (one
        batch, so NCCL pairs them without deadlock); returns (the receive buffers, the works to wait on)."""
        recv = [torch.empty_like(t) for t in tensors]
        # torch's own isend/irecv, the only ops P2POp accepts (a collective counter may have wrapped `dist.isend`)
        ops_ = [dist.P2POp(c10d.isend, t, self.next, self.group) for t in tensors]
        ops_ += [dist.P2POp(c10d.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops_)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class RingAttentionFunction(torch.autograd.Function):
    """Ring attention over the cp group (module docstring); q (b, 2c, hq, d), k/v (b, 2c, hk, d) this rank's zigzag
    chunks, `seg` (b, 2c) their segment ids or None."""

    @staticmethod
    def forward(ctx, q, k, v, seg, causal, scale, group, backend, prefix=None):
        with torch.autocast(q.device.type, enabled=False):  # the blocks pick their own precision (fp32 statistics)
            return RingAttentionFunction._forward(ctx, q, k, v, seg, causal, scale, group, backend, prefix)

    @staticmethod
    def _forward(ctx, q, k, v, seg, causal, scale, group, backend, prefix):
        ring = _Ring(group)
        fwd, _ = _block_fns(backend, q)
        c = q.shape[1] // 2
        b, s, h, d = q.shape
        out = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v] if seg is None else [k, v, seg]
        for t in range(ring.size):
            nxt, works = ring.exchange(kv) if t < ring.size - 1 else (None, [])
            seg_kv = None if seg is None else kv[2]
            for rows, cols, blk_causal, sq, sk, blk_prefix in _step_blocks(t, ring.rank, ring.size, causal, c, seg,
                                                                           seg_kv, prefix):  # fmt: skip
                blk_out, blk_lse = fwd(
                    q[:, rows].contiguous(), kv[0][:, cols].contiguous(), kv[1][:, cols].contiguous(), blk_causal,
                    scale, seg_q=sq, seg_k=sk, prefix_lengths=blk_prefix,
                )  # fmt: skip
                _merge(out[:, rows], lse[:, :, rows], blk_out, blk_lse)
            _wait(works)
            kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, seg, out, lse, prefix)
        ctx.causal, ctx.scale, ctx.group, ctx.backend = causal, scale, group, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return RingAttentionFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, seg, out, lse, prefix = ctx.saved_tensors
        ring = _Ring(ctx.group)
        _, bwd = _block_fns(ctx.backend, q)
        c = q.shape[1] // 2
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k, v] if seg is None else [k, v, seg]
        acc, acc_works = None, []  # the gradient accumulator of the k/v held now, arriving from the previous rank
        for t in range(ring.size):
            nxt, works = ring.exchange(kv) if t < ring.size - 1 else (None, [])
            seg_kv = None if seg is None else kv[2]
            grads = []
            for rows, cols, blk_causal, sq, sk, blk_prefix in _step_blocks(t, ring.rank, ring.size, ctx.causal, c, seg,
                                                                           seg_kv, prefix):  # fmt: skip
                dq_b, dk_b, dv_b = bwd(
                    dout[:, rows].contiguous(), None, q[:, rows].contiguous(), kv[0][:, cols].contiguous(),
                    kv[1][:, cols].contiguous(), out[:, rows].contiguous(), lse[:, :, rows].contiguous(), blk_causal,
                    ctx.scale, seg_q=sq, seg_k=sk, prefix_lengths=blk_prefix,
                )  # fmt: skip
                dq[:, rows] += dq_b.float()
                grads.append((cols, dk_b, dv_b))
            _wait(acc_works)
            if acc is None:
                acc = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]
            for cols, dk_b, dv_b in grads:
                acc[0][:, cols] += dk_b.float()
                acc[1][:, cols] += dv_b.float()
            if ring.size > 1:  # on to the next rank; the previous rank's arrives for step t + 1
                sent, (acc, acc_works) = acc, ring.exchange(acc)  # noqa: F841 (`sent` lives until the works end)
            _wait(works)
            kv = nxt
        _wait(acc_works)  # after the last step: this rank's own k/v gradients, home from their trip
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this rank's zigzag chunks q, k, v (b, 2c, heads, head_dim) over the whole sequence held by the
    cp `group` (module docstring); `segment_ids` (b, 2c): this rank's chunks of the documents' ids; `prefix_lengths`
    (b,): each row's prefix in positions of the whole sequence, seen by every query (prefix LM, with `causal`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.shape[1] % 2:
        raise LayoutError(f"ring attention needs an even local sequence (two zigzag chunks), got {q.shape[1]}")
    if segment_ids is not None:
        segment_ids = segment_ids.to(torch.int32).contiguous()
    if prefix_lengths is not None:
        if not causal:
            raise ValueError("ring attention: prefix_lengths needs causal=True (without it every key is visible)")
        p = prefix_lengths
        bad_dtype = p.is_floating_point() or p.is_complex() or p.dtype == torch.bool
        if tuple(prefix_lengths.shape) != (q.shape[0],) or bad_dtype:
            raise ValueError(f"ring attention: prefix_lengths must be an integer tensor of shape ({q.shape[0]},), "
                             f"got {prefix_lengths.dtype} {tuple(prefix_lengths.shape)}")  # fmt: skip
        prefix_lengths = prefix_lengths.to(device=q.device, dtype=torch.int64)
    return RingAttentionFunction.apply(q, k, v, segment_ids, bool(causal), scale, group, backend, prefix_lengths)


# --- all-to-all (Ulysses) ---


class _AllToAll(torch.autograd.Function):
    """`_seq_to_heads` (to_heads) or `_heads_to_seq` over `group`; the backward is the other one."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, g):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(g, ctx.group), None, None


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(b, s_local, h, d) sequence shards -> (b, cp s_local, h / cp, d) head shards (ranks' chunks in group order)."""
    n = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # [j]: the heads rank j gathers
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # [i]: rank i's sequence chunk of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    n = dist.get_world_size(group)
    b, ns, hn, d = x.shape
    send = x.reshape(b, n, ns // n, hn, d).permute(1, 0, 2, 3, 4).contiguous()  # [i]: rank i's sequence chunk
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # [j]: my sequence chunk of rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ns // n, n * hn, d)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this rank's zigzag chunks over the whole sequence by all-to-all (module docstring): each rank
    attends over the whole sequence, in natural order, for its share of the heads, so `prefix_lengths` (b,) (prefix
    LM) applies as in one process."""
    n = dist.get_world_size(group)
    hq, hk = q.shape[2], k.shape[2]
    if hq % n:
        raise LayoutError(f"all-to-all context parallelism needs heads ({hq}) divisible by cp ({n})")
    if hk % n:  # replicate kv heads so each rank's query heads find theirs
        k, v = k.repeat_interleave(hq // hk, dim=2), v.repeat_interleave(hq // hk, dim=2)
    def gathered_order(s_local: int) -> torch.Tensor:
        """The gathered sequence is rank 0's chunks, rank 1's, ...: their natural positions, in that order."""
        return torch.cat([zigzag_positions(s_local * n, n, r, q.device) for r in range(n)])

    order = gathered_order(q.shape[1])
    # k and v have their own order: a cross-attention's may be longer or shorter than q
    natural, kv_natural = torch.argsort(order), torch.argsort(gathered_order(k.shape[1]))
    qg = _AllToAll.apply(q, group, True)[:, natural]
    kg, vg = (_AllToAll.apply(t, group, True)[:, kv_natural] for t in (k, v))
    seg = None
    if segment_ids is not None:
        parts = [torch.empty_like(segment_ids) for _ in range(n)]
        dist.all_gather(parts, segment_ids.contiguous(), group=group)
        seg = torch.cat(parts, dim=1)[:, natural]
    y = ops.attention(qg, kg, vg, causal=causal, backend=backend, segment_ids=seg, prefix_lengths=prefix_lengths)
    return _AllToAll.apply(y[:, order], group, False)


class ContextParallelAttentionCore(AttentionCore):
    """The attention core of a layer under context parallelism: the model's `AttentionCore` with its softmax over the
    whole sequence held by the cp group (ring or all-to-all). No attention dropout (validation refuses it)."""

    def __init__(self, core: AttentionCore, group: dist.ProcessGroup, impl: str):
        if core.window:
            raise LayoutError("sliding-window attention (model.window) under context parallelism is not supported yet")
        super().__init__(core.dropout, core.backend)
        self.rng_context = core.rng_context
        self.group, self.impl = group, impl

    def forward(self, q, k, v, mask=None, causal: bool = True, segment_ids=None, prefix_lengths=None):
        if mask is not None:
            raise ValueError("context parallelism takes no explicit attention mask; use segment ids")
        if self.impl == "ring":
            return ring_attention(q, k, v, self.group, causal, segment_ids, backend=self.backend,
                                  prefix_lengths=prefix_lengths)  # fmt: skip
        return ulysses_attention(q, k, v, self.group, causal, segment_ids, self.backend, prefix_lengths)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, cp={dist.get_world_size(self.group)}"


def apply_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup, impl: str) -> None:
    """Swaps every layer's attention core (the multi-token prediction modules' blocks' too, and a t5 decoder's
    cross-attention: its unmasked attention of this rank's decoder chunks over every rank's encoder chunks) for its
    context-parallel form over `group`."""
    blocks = [*model.layers.values(), *(m.block for m in (getattr(model, "mtp", None) or ()))]
    for block in blocks:
        for attention in (block.attn, getattr(block, "cross_attn", None)):
            if attention is not None:
                attention.core = ContextParallelAttentionCore(attention.core, group, impl)
