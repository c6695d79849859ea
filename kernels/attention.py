"""FlashAttention-2 forward and backward (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning"), with its autograd Function and a plain-PyTorch reference.

`flash_attention(q, k, v, causal=False, softmax_scale=None, return_lse=False)`: q is (batch, seq_q, heads_q, d),
k and v (batch, seq_k, heads_kv, d) with heads_q a multiple of heads_kv (grouped-query / multi-query attention:
query head h reads kv head h // (heads_q // heads_kv)). Returns the output in q's dtype, and with `return_lse` also
the log-sum-exp of each row's scaled scores, (batch, heads_q, seq_q) in fp32 (natural log), which ring attention
needs to merge partial results; a gradient may flow into it.

Masks, keyword-only, ANDed with `causal`: `window=w` (a sliding window on the same bottom-right diagonal: with
causal, query i sees keys i + off - w < j <= i + off, where off = seq_k - seq_q; without, |i + off - j| < w; a
window covering both sequences is no window) and `segment_ids` (packed documents: one integer tensor (batch, seq) for
self-attention, or a pair (seg_q (batch, seq_q), seg_k (batch, seq_k)); query i sees key j only when
seg_q[b, i] == seg_k[b, j]; any integer values, in any order). `prefix_lengths` (batch,) integers, with causal
only (prefix LM): keys j < prefix_lengths[b] are visible to every query of row b as well (ORed with the causal mask,
then ANDed with the segment mask; not combined with a window). `flash_attention_forward` / `flash_attention_backward`
(no autograd, what ring attention calls per block) take the same as `window`, `seg_q`, `seg_k`, `prefix_lengths`,
and have plain-PyTorch twins `flash_attention_forward_reference` / `flash_attention_backward_reference` with the
same semantics.

Forward: one program per (block of BLOCK_M queries, batch x query head) streams the kv blocks with an online
softmax in fp32 (exp2, the scale folded with log2(e)); only the output and the lse are written. Causal attention with
seq_q != seq_k uses the bottom-right alignment of `torch.ones(seq_q, seq_k).tril(seq_k - seq_q)` (query i sees keys
j <= i + seq_k - seq_q, as engine/model/ops.py's torch path and flash-attn >= 2.1); a row that sees no key at all
(seq_q > seq_k, or a window or segment without keys) gives output 0 and lse -inf, and gradients 0. Each program visits
only the kv blocks some row of its block can see (causal and window bounds, `_kv_range`; the dK/dV kernel inverts it
over query blocks, `_q_range`), and skips at run time a block whose segment ids cannot match its rows' (their
(min, max) ranges are disjoint: every cross-document block of sorted, packed documents). Blocks every row sees whole
run without the positional mask arithmetic; the segment mask applies to every block visited.

Backward, FA2's scheme with the attention matrix recomputed from q, k and the saved lse (never stored):
1. preprocessing: D = rowsum(dO * O) - dlse per query row (with dlse, the gradient of the returned lse,
   ds = p * (dp - D) is the softmax-score gradient of both outputs);
2. one program per (kv block, batch x kv head) accumulates dK and dV in registers over every query block and over
   the query heads of its group (GQA), so no atomics and no per-query-head buffer: deterministic;
3. one program per (query block, batch x query head) accumulates dQ over the kv blocks.
Inputs may have any strides (e.g. q, k, v as views of one fused qkv projection): the kernels take all four strides.

Numerics: statistics and accumulators in fp32 (fp64 for fp64 inputs, so the kernel itself can be gradchecked);
fp32 dots use `input_precision="ieee"` (not TF32) so the GPU meets the 1e-5 fp32 contract like the interpreter;
fp16/bf16 dots take 16-bit operands (p and ds are rounded to the input dtype before their dots, as in FA2). Under the
Triton interpreter bf16 operands are upcast to fp32 first (the interpreter's bf16 arithmetic is wrong on CPU). head_dim
may be any size up to 256; it is padded to a power of two (at least 16) with masked loads.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from kernels.utils import acc_dtype, check_tensors, import_triton, interpreting, next_power_of_2, use_triton

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. Every kernel takes (batch, seq, head) strides; the head_dim stride is 1 (the host ensures it).
#
# Masks. Query row i sits at key position p = i + seq_k - seq_q (bottom-right alignment) and sees the keys j with
#   begin(p) <= j < end(p):  begin = p - window + 1 with a window, else 0;
#                            end = p + 1 if causal, p + window with a (non-causal) window, else seq_k,
# and, with segment ids, only the keys of its own segment. A prefix length P (causal only) raises end to max(p + 1, P)
# (and lowers the first row that sees key j < P to 0), so the bounds stay monotone and the block skipping holds.
# begin and end grow with i, which is what lets each program
# visit only the blocks some row can see (the rest are skipped, never loaded) and run the blocks that every row sees
# whole without the mask arithmetic. Segment ids are arbitrary, so their blocks are skipped at run time instead, when
# the (min, max) of the block's query ids and key ids do not overlap (sorted ids of packed documents: every
# cross-document block).


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _kv_range(
    start_m, seq_q, seq_k, window, prefix,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The kv blocks of the query block at start_m as (lo, full_lo, full_hi, hi): the blocks starting in [lo, full_lo)
    and [full_hi, hi) need the mask, every row sees every key of those in [full_lo, full_hi), and no row sees a key
    outside [lo, hi) (skipped). lo, full_lo, full_hi are multiples of BLOCK_N; hi is one past the last key any row
    sees (rounding it up as well cost the dQ kernel 56-88 bytes of register spills in its sm_90 compile). The block's
    first row bounds the keys all rows see from above, its last (valid) row from below."""
    off = seq_k - seq_q
    p0 = start_m + off
    p1 = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + off  # rows past seq_q are never stored: they set no bound
    if CAUSAL:
        end0 = p0 + 1
        end1 = p1 + 1
        if PREFIX:  # every row also sees the keys below the prefix length
            end0 = tl.maximum(end0, prefix)
            end1 = tl.maximum(end1, prefix)
    elif WINDOW:
        end0 = p0 + window
        end1 = p1 + window
    else:
        end0 = seq_k
        end1 = seq_k
    if WINDOW:
        begin0 = p0 - window + 1
        begin1 = p1 - window + 1
    else:
        begin0 = 0
        begin1 = 0
    # Clamped into [0, seq_k] before any division: integer division of negatives rounds differently in the compiler
    # (towards zero) and the interpreter (down).
    lo_key = _clamp(begin0, 0, seq_k)
    lo = lo_key // BLOCK_N * BLOCK_N
    hi = tl.where(end1 > lo_key, tl.minimum(end1, seq_k), lo)  # lo: no row of the block sees any key
    # In blocks; the products below tell the compiler the loops start on multiples of BLOCK_N.
    n_lo = tl.minimum(tl.cdiv(_clamp(begin1, 0, seq_k), BLOCK_N), tl.cdiv(hi, BLOCK_N))
    n_hi = tl.maximum(_clamp(end0, 0, seq_k) // BLOCK_N, n_lo)  # a ragged last kv block is never whole
    return lo, n_lo * BLOCK_N, n_hi * BLOCK_N, hi


@triton.jit
def _q_range(
    start_n, seq_q, seq_k, window, prefix,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The inverse of _kv_range for the kv block at start_n: its query blocks as (lo, full_lo, full_hi, hi) (masked,
    whole, masked; no row outside [lo, hi) sees a key of the block; hi is a row bound, the others multiples of
    BLOCK_M). Key j is seen by the rows [first(j), stop(j)), with t = j - (seq_k - seq_q): first = t if causal,
    t - window + 1 with a window, else 0 (and 0 for a key below the prefix length); stop = t + window with a window,
    else seq_q."""
    off = seq_k - seq_q
    t0 = start_n - off
    t1 = tl.minimum(start_n + BLOCK_N, seq_k) - 1 - off  # keys past seq_k only reach dK/dV rows that are not stored
    if CAUSAL:
        first0 = t0
        first1 = t1
        if PREFIX:  # a key below the prefix length is seen from row 0 on
            first0 = tl.where(start_n < prefix, 0, t0)
            first1 = tl.where(t1 + off < prefix, 0, t1)
    elif WINDOW:
        first0 = t0 - window + 1
        first1 = t1 - window + 1
    else:
        first0 = 0
        first1 = 0
    if WINDOW:
        stop0 = t0 + window
        stop1 = t1 + window
    else:
        stop0 = seq_q
        stop1 = seq_q
    lo_row = _clamp(first0, 0, seq_q)
    lo = lo_row // BLOCK_M * BLOCK_M
    hi = tl.where(stop1 > lo_row, tl.minimum(stop1, seq_q), lo)
    n_lo = tl.minimum(tl.cdiv(_clamp(first1, 0, seq_q), BLOCK_M), tl.cdiv(hi, BLOCK_M))
    # The ragged last query block may run unmasked: its rows past seq_q have p = 0 (_row_stats).
    full_stop = _clamp(stop0, 0, seq_q)
    n_hi = tl.maximum(tl.where(full_stop == seq_q, tl.cdiv(seq_q, BLOCK_M), full_stop // BLOCK_M), n_lo)
    return lo, n_lo * BLOCK_M, n_hi * BLOCK_M, hi


@triton.jit
def _row_prefix(PREFIX_LEN, b, PREFIX: tl.constexpr):
    """Batch row b's prefix length (0, never read, without PREFIX)."""
    prefix = 0
    if PREFIX:
        prefix = tl.load(PREFIX_LEN + b)
    return prefix


@triton.jit
def _seg_ids(seg_base, offs, start, n):
    """(ids, min, max) of the segment ids of positions offs (start = offs[0] < n); positions past n take the id at
    start, so the (min, max) are those of the real ones."""
    ok = offs < n
    ids = tl.load(seg_base + offs, mask=ok, other=0)
    ids = tl.where(ok, ids, tl.load(seg_base + start))
    return ids, tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _kv_tile(
    k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k,
    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """The k and v rows offs_n of one kv head (MASK: the block may pass seq_k), in the dot dtype."""
    kv_mask = offs_d[None, :] < HEAD_DIM
    if MASK:
        kv_mask = kv_mask & (offs_n[:, None] < seq_k)
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(k_base + rows * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
    v = tl.load(v_base + rows * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
    return k, v


@triton.jit
def _keys_seen(
    offs_m, offs_n, seq_k, off, window, prefix, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr
):  # fmt: skip
    """(rows, keys) mask of the positions each row sees: keys below seq_k, within [begin(p), end(p)) (see above)."""
    p = offs_m[:, None] + off
    j = offs_n[None, :]
    valid = j < seq_k
    if CAUSAL:
        if PREFIX:
            valid = valid & ((j <= p) | (j < prefix))
        else:
            valid = valid & (j <= p)
    if WINDOW:
        valid = valid & (j > p - window)
        if not CAUSAL:
            valid = valid & (j < p + window)
    return valid


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d, lo, hi, seq_k,
    off, window, prefix, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Online softmax over the kv blocks [lo, hi): the updated (acc, m_i, l_i), m_i in log2 units. MASK: the
    positional mask; the segment mask applies to every block visited when HAS_SEG."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visit = True
        if HAS_SEG:
            ids_k, kmin, kmax = _seg_ids(seg_k, offs_n, start_n, seq_k)
            visit = (kmin <= qmax) & (kmax >= qmin)  # else no key of the block shares a row's segment
        if visit:
            k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k, MASK, HEAD_DIM, DOT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
            if MASK:
                seen = _keys_seen(offs_m, offs_n, seq_k, off, window, prefix, CAUSAL, WINDOW, PREFIX)
                s = tl.where(seen, s, float("-inf"))
            if HAS_SEG:
                s = tl.where(ids_q[:, None] == ids_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0, no NaN
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC, out_dtype=ACC)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_tile(n_heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch x query head) index and query rows: (bh, b, h, start_m, offs_m, offs_d, the in-bounds
    mask of its (rows, head_dim) tile, the rows as int64 for pointer arithmetic)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    return bh, bh // n_heads, bh % n_heads, start_m, offs_m, offs_d, mask, offs_m[:, None].to(tl.int64)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, SEG_Q, SEG_K, PREFIX_LEN,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_sqb, stride_skb,
    n_heads, group, seq_q, seq_k, window, qk_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M query rows of one (batch, query head): its output rows and their lse (natural log)."""
    bh, b, h, start_m, offs_m, offs_d, mask, rows = _query_tile(n_heads, seq_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    hk = h // group
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :], mask=mask, other=0.0)
    q = q.to(DOT)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    seg_k = SEG_K + b * stride_skb
    ids_q, qmin, qmax = offs_m, 0, 0  # read only when HAS_SEG
    if HAS_SEG:
        ids_q, qmin, qmax = _seg_ids(SEG_Q + b * stride_sqb, offs_m, start_m, seq_q)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    off = seq_k - seq_q
    prefix = _row_prefix(PREFIX_LEN, b, PREFIX)
    lo, full_lo, full_hi, hi = _kv_range(
        start_m, seq_q, seq_k, window, prefix, CAUSAL, WINDOW, PREFIX, BLOCK_M, BLOCK_N
    )  # fmt: skip
    if WINDOW:  # without a window every row sees from key 0: lo == full_lo
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d, lo,
            full_lo, seq_k, off, window, prefix, qk_scale, True,
            CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
        )  # fmt: skip
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d, full_lo,
        full_hi, seq_k, off, window, prefix, qk_scale, False,
        CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d, full_hi,
        hi, seq_k, off, window, prefix, qk_scale, True,
        CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
    )  # fmt: skip
    empty = l_i == 0.0  # a row that sees no key: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask,
    )
    tl.store(LSE + bh * seq_q + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DLSE, DELTA,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    n_heads, seq_q,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """DELTA = rowsum(dO * O) - dlse for one block of query rows of one (batch, query head)."""
    bh, b, h, start_m, offs_m, offs_d, mask, rows = _query_tile(n_heads, seq_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0.0).to(ACC)
    tl.store(DELTA + bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _row_stats(LSE, DELTA, offs_m, seq_q):
    """(lse in log2 units, delta) of rows offs_m; rows past seq_q or without any key get lse +inf, so p = 0."""
    m_ok = offs_m < seq_q
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(m_ok & (lse != float("-inf")), lse * _LOG2E, float("inf"))
    # An empty row's p is 0, so its delta must be finite: a NaN/inf dlse there (e.g. from logaddexp of two -inf lse in
    # a ring-attention merge) would otherwise turn 0 * NaN into NaN in every key's dK and in dQ.
    delta = tl.load(DELTA + offs_m, mask=m_ok & (lse != float("-inf")), other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, ids_k, kmin, kmax, q_base, do_base, seg_q, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_d, lo, hi,
    seq_q, seq_k, off, window, prefix, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one kv block accumulated over the query blocks [lo, hi) of one query head (MASK: the positional
    mask; the segment mask applies to every block visited when HAS_SEG)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        visit = True
        if HAS_SEG:
            ids_q, qmin, qmax = _seg_ids(seg_q, offs_m, start_m, seq_q)
            visit = (qmin <= kmax) & (qmax >= kmin)
        if visit:
            mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
            rows = offs_m[:, None].to(tl.int64)
            q = tl.load(q_base + rows * stride_qs + offs_d[None, :], mask=mask, other=0.0).to(DOT)
            do = tl.load(do_base + rows * stride_dos + offs_d[None, :], mask=mask, other=0.0).to(DOT)
            lse2, delta = _row_stats(LSE, DELTA, offs_m, seq_q)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if MASK:
                p = tl.where(_keys_seen(offs_m, offs_n, seq_k, off, window, prefix, CAUSAL, WINDOW, PREFIX), p, 0.0)
            if HAS_SEG:
                p = tl.where(ids_q[:, None] == ids_k[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC, out_dtype=ACC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision=PREC, out_dtype=ACC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEG_Q, SEG_K, PREFIX_LEN,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_sqb, stride_skb,
    n_heads, group, seq_q, seq_k, window, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one block of BLOCK_N keys of one (batch, kv head), summed over the `group` query heads that read it
    (in a fixed order: deterministic)."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    n_kv = n_heads // group
    b = bhk // n_kv
    hk = bhk % n_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + rows * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + rows * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    k = k.to(DOT)
    v = v.to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    seg_q = SEG_Q + b * stride_sqb
    ids_k, kmin, kmax = offs_n, 0, 0  # read only when HAS_SEG
    if HAS_SEG:
        ids_k, kmin, kmax = _seg_ids(SEG_K + b * stride_skb, offs_n, start_n, seq_k)
    off = seq_k - seq_q
    prefix = _row_prefix(PREFIX_LEN, b, PREFIX)
    # Query rows [lo, full_lo) (the causal band, or the window's leading edge) and [full_hi, hi) (the window's
    # trailing edge) see part of this kv block, rows [full_lo, full_hi) all of it; no other row sees any of it.
    lo, full_lo, full_hi, hi = _q_range(
        start_n, seq_q, seq_k, window, prefix, CAUSAL, WINDOW, PREFIX, BLOCK_M, BLOCK_N
    )  # fmt: skip
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row0 = (b * n_heads + h) * seq_q
        if CAUSAL or WINDOW:  # otherwise lo == full_lo
            dk, dv = _dkdv_inner(
                dk, dv, k, v, ids_k, kmin, kmax, q_base, do_base, seg_q, LSE + row0, DELTA + row0, stride_qs,
                stride_dos, offs_n, offs_d, lo, full_lo, seq_q, seq_k, off, window, prefix, qk_scale,
                True, CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_M, DOT, PREC, ACC,
            )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, ids_k, kmin, kmax, q_base, do_base, seg_q, LSE + row0, DELTA + row0, stride_qs,
            stride_dos, offs_n, offs_d, full_lo, full_hi, seq_q, seq_k, off, window, prefix, qk_scale,
            False, CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_M, DOT, PREC, ACC,
        )  # fmt: skip
        if WINDOW:  # otherwise [full_hi, hi) is empty: every row past the band sees the whole block
            dk, dv = _dkdv_inner(
                dk, dv, k, v, ids_k, kmin, kmax, q_base, do_base, seg_q, LSE + row0, DELTA + row0, stride_qs,
                stride_dos, offs_n, offs_d, full_hi, hi, seq_q, seq_k, off, window, prefix, qk_scale,
                True, CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_M, DOT, PREC, ACC,
            )  # fmt: skip
    dk *= sm_scale
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows * stride_dks + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvs + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d, lo, hi,
    seq_k, off, window, prefix, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dQ of one query block accumulated over the kv blocks [lo, hi) (masks as in _fwd_inner)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visit = True
        if HAS_SEG:
            ids_k, kmin, kmax = _seg_ids(seg_k, offs_n, start_n, seq_k)
            visit = (kmin <= qmax) & (kmax >= qmin)
        if visit:
            k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k, MASK, HEAD_DIM, DOT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if MASK:
                p = tl.where(_keys_seen(offs_m, offs_n, seq_k, off, window, prefix, CAUSAL, WINDOW, PREFIX), p, 0.0)
            if HAS_SEG:
                p = tl.where(ids_q[:, None] == ids_k[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(DOT), k, input_precision=PREC, out_dtype=ACC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEG_Q, SEG_K, PREFIX_LEN,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_sqb, stride_skb,
    n_heads, group, seq_q, seq_k, window, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PREFIX: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """dQ of one block of BLOCK_M query rows of one (batch, query head)."""
    bh, b, h, start_m, offs_m, offs_d, mask, rows = _query_tile(n_heads, seq_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    hk = h // group
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :], mask=mask, other=0.0)
    q = q.to(DOT)
    do = do.to(DOT)
    lse2, delta = _row_stats(LSE + bh * seq_q, DELTA + bh * seq_q, offs_m, seq_q)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    seg_k = SEG_K + b * stride_skb
    ids_q, qmin, qmax = offs_m, 0, 0  # read only when HAS_SEG
    if HAS_SEG:
        ids_q, qmin, qmax = _seg_ids(SEG_Q + b * stride_sqb, offs_m, start_m, seq_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    off = seq_k - seq_q
    prefix = _row_prefix(PREFIX_LEN, b, PREFIX)
    lo, full_lo, full_hi, hi = _kv_range(
        start_m, seq_q, seq_k, window, prefix, CAUSAL, WINDOW, PREFIX, BLOCK_M, BLOCK_N
    )  # fmt: skip
    if WINDOW:  # without a window lo == full_lo
        dq = _dq_inner(
            dq, q, do, lse2, delta, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d,
            lo, full_lo, seq_k, off, window, prefix, qk_scale, True,
            CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC,
            ACC,
        )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d,
        full_lo, full_hi, seq_k, off, window, prefix, qk_scale, False,
        CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC,
        ACC,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, ids_q, qmin, qmax, k_base, v_base, seg_k, stride_ks, stride_vs, offs_m, offs_d,
        full_hi, hi, seq_k, off, window, prefix, qk_scale, True,
        CAUSAL, WINDOW, PREFIX, HAS_SEG, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
    )  # fmt: skip
    dq *= sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Host side


def block_d(head_dim: int) -> int:
    """The head_dim tile: head_dim rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, next_power_of_2(head_dim))


def launch_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, dK/dV and dQ kernels: one config, no autotune
    (the Triton interpreter cannot run an autotune with more than one config).

    Under the interpreter 16 x 16 tiles, so CPU tests reach multi-block loops, ragged blocks and the causal band
    with small shapes. On GPU, for 16-bit inputs at head_dim 128: the winners of `benchmarks/sweep_kernels.py` on an
    H200 (bf16, causal, MHA and GQA; benchmarks/RESULTS.md): forward 64 x 64 with 4 warps, dK/dV 64 queries x 64 keys
    with 4 warps, dQ 128 queries x 64 keys with 8 warps, 3 stages each (the whole backward 1.8x faster than the
    first guess). 64 x 64 tiles at head_dim <= 64 (no spills when compiled for sm_90), smaller at 256; fp32/fp64
    operands take two/four times the registers and shared memory of 16-bit ones, so their tiles are halved/quartered.
    """
    if interpreting() or device.type != "cuda":
        return {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
    d = block_d(head_dim)
    if dtype in (torch.float16, torch.bfloat16):
        if d <= 64:  # no register spills at these sizes on sm_90 (cuobjdump); the larger head dims spill some
            return {"fwd": (64, 64, 4, 3), "dkdv": (32, 64, 4, 2), "dq": (64, 64, 4, 2)}
        if d <= 128:
            return {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (128, 64, 8, 3)}
        return {"fwd": (64, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)}
    if dtype == torch.float32:
        if d <= 64:
            return {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}
        if d <= 128:
            return {"fwd": (64, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)}
        return {"fwd": (32, 16, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)}
    return {"fwd": (32, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}  # fp64: for tests, not speed


def _dot_args(dtype: torch.dtype) -> tuple:
    """(DOT, PREC, ACC) constexprs: dot operand dtype, tl.dot input precision, accumulator dtype."""
    if dtype == torch.float64:
        return tl.float64, "ieee", tl.float64
    if dtype == torch.float16:
        return tl.float16, "tf32", tl.float32  # PREC only matters for fp32 operands
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16, "tf32", tl.float32
    return tl.float32, "ieee", tl.float32  # fp32, and bf16 upcast under the interpreter (its bf16 math is broken)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its head_dim stride is 1 (views of a fused qkv projection are), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_grid(fn: str, programs_y: int) -> None:
    if programs_y > 65535:
        raise ValueError(f"{fn}: batch x heads = {programs_y} exceeds the 65535 programs of a grid's second axis")


def _short(x: object) -> str:
    """repr(x) on one line, at most 60 characters (for error messages)."""
    text = " ".join(repr(x).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _split_segment_ids(fn: str, segment_ids, seq_q: int, seq_k: int) -> tuple:
    """(seg_q, seg_k, their names for errors) of the public `segment_ids`: one tensor for both (seq_q == seq_k) or a
    (seg_q, seg_k) pair; (None, None, ...) for None."""
    if segment_ids is None:
        return None, None, ("seg_q", "seg_k")
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{fn}: segment_ids as a tuple must be (seg_q, seg_k), got {len(segment_ids)} items")
        return segment_ids[0], segment_ids[1], ("segment_ids[0]", "segment_ids[1]")
    if seq_q != seq_k:
        raise ValueError(
            f"{fn}: one segment_ids tensor needs seq_q == seq_k, got {seq_q} and {seq_k}; pass (seg_q, seg_k)"
        )
    return segment_ids, segment_ids, ("segment_ids", "segment_ids")


def _mask_args(
    fn: str, q: torch.Tensor, k: torch.Tensor, window, seg_q, seg_k, names: tuple[str, str] = ("seg_q", "seg_k")
) -> tuple[int | None, torch.Tensor | None, torch.Tensor | None]:
    """Validated (window, seg_q, seg_k) for q (batch, seq_q, ...) and k (batch, seq_k, ...), one-line ValueErrors.

    A window covering both sequences masks nothing and becomes None (the kernels then skip its arithmetic). Segment
    ids become contiguous int32 (int64 when given as 64-bit, so distinct ids stay distinct); only equality matters."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"{fn}: window must be a positive int or None, got {_short(window)}")
        window = None if window >= max(sq, sk) else int(window)
    if seg_q is None and seg_k is None:
        return window, None, None
    if seg_q is None or seg_k is None:
        raise ValueError(f"{fn}: segment ids for both queries and keys are needed, got only one of {', '.join(names)}")
    ids = []
    for name, t, seq, dim in ((names[0], seg_q, sq, "seq_q"), (names[1], seg_k, sk, "seq_k")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be an integer tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be an integer tensor of segment ids, got {t.dtype}")
        if tuple(t.shape) != (b, seq):
            raise ValueError(f"{fn}: {name} must have shape (batch, {dim}) = {(b, seq)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
        ids.append(t)
    wide = any(t.dtype in (torch.int64, torch.uint32, torch.uint64) for t in ids)
    dtype = torch.int64 if wide else torch.int32
    return window, ids[0].to(dtype).contiguous(), ids[1].to(dtype).contiguous()


def _check_lse(fn: str, lse: torch.Tensor, dlse: torch.Tensor | None, shape: tuple[int, int, int]) -> None:
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (tuple(t.shape) != shape or not t.is_floating_point()):
            raise ValueError(
                f"{fn}: {name} must be a float tensor of shape (batch, heads_q, seq_q) = {shape}, got {t.dtype} "
                f"{tuple(t.shape)}"
            )


def _seg_launch_args(seg_q: torch.Tensor | None, seg_k: torch.Tensor | None, unused: torch.Tensor) -> tuple:
    """(SEG_Q, SEG_K, their batch strides, HAS_SEG); without ids the pointers are `unused` (never read)."""
    if seg_q is None:
        return unused, unused, 0, 0, False
    return seg_q, seg_k, seg_q.stride(0), seg_k.stride(0), True


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: int | None = None,
    seg_q: torch.Tensor | None = None,
    seg_k: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for q, k, v whose last dim has stride 1 (no autograd). lse is fp32 (fp64 for fp64 inputs).

    `window`, the segment ids (batch, seq_q) and (batch, seq_k) and `prefix_lengths` as in `flash_attention`."""
    fn = "flash_attention_forward"
    window, seg_q, seg_k = _mask_args(fn, q, k, window, seg_q, seg_k)
    prefix = _check_prefix(fn, q, causal, window, prefix_lengths)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _check_grid("flash_attention", b * hq)
    bm, bn, warps, stages = launch_config(d, q.dtype, q.device)["fwd"]
    DOT, PREC, ACC = _dot_args(q.dtype)
    SEG_Q, SEG_K, stride_sqb, stride_skb, has_seg = _seg_launch_args(seg_q, seg_k, lse)
    _attn_fwd_kernel[(triton.cdiv(sq, bm), b * hq)](
        q, k, v, out, lse, SEG_Q, SEG_K, lse if prefix is None else prefix, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out),
        stride_sqb, stride_skb, hq, hq // hk, sq, sk, window or 0, softmax_scale * LOG2E,
        CAUSAL=causal, WINDOW=window is not None, PREFIX=prefix is not None, HAS_SEG=has_seg,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=block_d(d), DOT=DOT, PREC=PREC, ACC=ACC, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def flash_attention_backward(
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: int | None = None,
    seg_q: torch.Tensor | None = None,
    seg_k: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the gradients of out and of lse (either may be None: zero) and the forward's out and lse.

    `lse` may be any lse consistent with `out` (ring attention passes the merged, final one): P = exp(S - lse).
    The masks (`causal`, `window`, segment ids, prefix lengths) must be the forward's.
    """
    fn = "flash_attention_backward"
    window, seg_q, seg_k = _mask_args(fn, q, k, window, seg_q, seg_k)
    prefix = _check_prefix(fn, q, causal, window, prefix_lengths)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    _check_lse(fn, lse, dlse, (b, hq, sq))
    # The row statistics stay in the accumulation dtype (fp32; fp64 for fp64) whatever a caller's merge produced.
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, sk, hk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, sk, hk, d), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _check_grid("flash_attention", b * hq)
    dout = torch.zeros_like(out) if dout is None else _unit_last(dout)
    lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    if dlse is not None:
        dlse = dlse.to(lse.dtype).contiguous()
    DOT, PREC, ACC = _dot_args(q.dtype)
    cfg = launch_config(d, q.dtype, q.device)
    bd = block_d(d)
    pm = 64 if q.is_cuda else 16
    _attn_bwd_preprocess_kernel[(triton.cdiv(sq, pm), b * hq)](
        out, dout, delta if dlse is None else dlse, delta, *_bsh(out), *_bsh(dout), hq, sq,
        HAS_DLSE=dlse is not None, HEAD_DIM=d, BLOCK_M=pm, BLOCK_D=bd, ACC=ACC, num_warps=4,
    )  # fmt: skip
    scales = (softmax_scale * LOG2E, softmax_scale)
    SEG_Q, SEG_K, stride_sqb, stride_skb, has_seg = _seg_launch_args(seg_q, seg_k, lse)
    masks = dict(CAUSAL=causal, WINDOW=window is not None, PREFIX=prefix is not None, HAS_SEG=has_seg)
    PREFIX_LEN = lse if prefix is None else prefix  # never read without a prefix
    bm, bn, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(sk, bn), b * hk)](
        q, k, v, dout, lse, delta, dk, dv, SEG_Q, SEG_K, PREFIX_LEN, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout),
        *_bsh(dk),
        *_bsh(dv), stride_sqb, stride_skb, hq, hq // hk, sq, sk, window or 0, *scales,
        **masks, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=DOT, PREC=PREC, ACC=ACC,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    bm, bn, warps, stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(sq, bm), b * hq)](
        q, k, v, dout, lse, delta, dq, SEG_Q, SEG_K, PREFIX_LEN, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout), *_bsh(dq),
        stride_sqb, stride_skb, hq, hq // hk, sq, sk, window or 0, *scales,
        **masks, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=DOT, PREC=PREC, ACC=ACC,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out and lse (never the attention matrix) and the segment ids; backward recomputes P block by
    block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, window=None, seg_q=None, seg_k=None, prefix=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = flash_attention_forward(q, k, v, causal, softmax_scale, window, seg_q, seg_k, prefix)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.window, ctx.segs = causal, softmax_scale, window, (seg_q, seg_k, prefix)
        ctx.set_materialize_grads(False)  # an unused lse (or out) gets None, not a tensor of zeros
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None, None, None
        dq, dk, dv = flash_attention_backward(
            dout, dlse, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.window, *ctx.segs
        )
        return dq, dk, dv, None, None, None, None, None, None


def _check(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_triton: bool = True) -> None:
    check_tensors(fn, need_triton, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{fn}: q, k, v must be 4-D (batch, seq, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head_dim (dim 3)"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{fn}: heads_q ({q.shape[2]}) must be a multiple of heads_kv ({k.shape[2]})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{fn}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim {q.shape[3]} is not supported (1 to {MAX_HEAD_DIM}); use torch's SDPA")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    *,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention softmax(scale * q k^T) v, FlashAttention-2 in Triton; differentiable in q, k, v (and lse).

    q (batch, seq_q, heads_q, head_dim); k, v (batch, seq_k, heads_kv, head_dim), heads_q a multiple of heads_kv.
    `causal`: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned); rows that see no key give 0.
    `window`: also only the keys within `window` positions of that diagonal (i + seq_k - seq_q - window < j when
    causal, |i + seq_k - seq_q - j| < window otherwise). `segment_ids`: an integer tensor (batch, seq) for
    self-attention, or a pair (seg_q (batch, seq_q), seg_k (batch, seq_k)); query i sees key j only when their ids
    are equal (packed documents; ids need not be sorted, though sorted ones let whole blocks be skipped).
    `prefix_lengths` (batch,) integers, with `causal` only (prefix LM, Raffel et al. 2020 sec. 3.2.1): keys
    j < prefix_lengths[b] are visible to every query of row b too, so the prefix attends bidirectionally.
    `softmax_scale` defaults to 1/sqrt(head_dim). Returns out (q's shape and dtype), or (out, lse) with lse
    (batch, heads_q, seq_q) fp32, the natural-log normaliser of each row (-inf for a row that sees no key).
    ``backend`` = "auto" runs the kernel on CUDA tensors (on CPU too under ``TRITON_INTERPRET=1``) and
    `flash_attention_reference` (fp32 math, the full score matrix) elsewhere, decided at each call from q's device;
    "triton" forces the kernel (a one-line error where it cannot run), "torch" the reference.
    """
    fn = "flash_attention"
    triton_path = use_triton(fn, backend, q)
    _check(fn, q, k, v, triton_path)
    seg_q, seg_k, names = _split_segment_ids(fn, segment_ids, q.shape[1], k.shape[1])
    window, seg_q, seg_k = _mask_args(fn, q, k, window, seg_q, seg_k, names)
    prefix = _check_prefix(fn, q, bool(causal), window, prefix_lengths)
    if not triton_path:
        segs = None if seg_q is None else (seg_q, seg_k)
        return flash_attention_reference(
            q, k, v, bool(causal), softmax_scale, return_lse, segment_ids=segs, window=window, prefix_lengths=prefix
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = FlashAttentionFunction.apply(q, k, v, bool(causal), scale, window, seg_q, seg_k, prefix)
    return (out, lse) if return_lse else out


def _check_prefix(fn: str, q: torch.Tensor, causal: bool, window: int | None, prefix_lengths) -> torch.Tensor | None:
    """Validated `prefix_lengths` (batch,) integer tensor on q's device (one-line ValueErrors), as contiguous int32
    clamped to [0, 2^31 - 1] (a length past seq_k acts as seq_k); None for None. A prefix only widens a causal mask and
    is not combined with a sliding window (the window's band would cut the prefix)."""
    if prefix_lengths is None:
        return None
    if not causal:
        raise ValueError(f"{fn}: prefix_lengths needs causal=True (without causal every key is already visible)")
    if window is not None:
        raise ValueError(f"{fn}: prefix_lengths with a sliding window is not supported")
    t = prefix_lengths
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{fn}: prefix_lengths must be an integer tensor (batch,), got {_short(t)}")
    if tuple(t.shape) != (q.shape[0],):
        raise ValueError(f"{fn}: prefix_lengths must have shape (batch,) = ({q.shape[0]},), got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{fn}: prefix_lengths is on {t.device} but q is on {q.device}")
    return t.clamp(0, 2**31 - 1).to(torch.int32).contiguous()


def _allowed(
    sq: int,
    sk: int,
    causal: bool,
    window: int | None,
    seg_q: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    device,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask of scores each query row sees, broadcastable to (batch, heads, seq_q, seq_k); None: all of them.
    `prefix` (batch,): keys j < prefix[b] are visible to every query of row b as well (prefix LM)."""
    pos = torch.arange(sq, device=device)[:, None] + (sk - sq)  # query i's position among the keys
    j = torch.arange(sk, device=device)[None, :]
    allowed = None
    if causal:
        allowed = j <= pos  # == torch.ones(sq, sk).tril(sk - sq)
        if prefix is not None:
            allowed = allowed | (j < prefix.to(device)[:, None, None])  # (batch, sq, sk)
    if window is not None:
        near = (j > pos - window) if causal else ((pos - j).abs() < window)
        allowed = near if allowed is None else allowed & near
    if seg_q is not None:
        same = seg_q[:, :, None] == seg_k[:, None, :]
        allowed = same if allowed is None else allowed & same
    return None if allowed is None else allowed.unsqueeze(-3)


def attention_mask(
    fn: str,
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The boolean mask (True: may attend), broadcastable to (batch, heads, seq_q, seq_k), of `flash_attention`'s
    causal / window / segment-id / prefix semantics for q (batch, seq_q, ...) and k (batch, seq_k, ...); None when
    nothing is masked. The arguments are checked as `flash_attention` checks them (one-line ValueErrors naming `fn`)."""
    sq, sk = q.shape[1], k.shape[1]
    seg_q, seg_k, names = _split_segment_ids(fn, segment_ids, sq, sk)
    window, seg_q, seg_k = _mask_args(fn, q, k, window, seg_q, seg_k, names)
    prefix = _check_prefix(fn, q, causal, window, prefix_lengths)
    return _allowed(sq, sk, causal, window, seg_q, seg_k, q.device, prefix)


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
    *,
    segment_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention with `flash_attention`'s semantics (GQA, bottom-right causal alignment, sliding
    window, segment ids, prefix lengths, rows without keys giving 0 and lse -inf with zero gradients). Computes in
    fp32 (fp64 for fp64 inputs; in the inputs' own dtype with `upcast=False`, the same-dtype reference of the 2x rule)
    with the full score matrix; returns out in q's dtype, lse in fp32 (fp64)."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    allowed = attention_mask("flash_attention_reference", q, k, causal, segment_ids, window, prefix_lengths)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32 if upcast else q.dtype
    qf = q.to(work).transpose(1, 2)  # (b, h, s, d)
    kf = k.to(work).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    vf = v.to(work).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if sk else s.new_zeros(b, hq, sq, 1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows without keys: exp(-inf - 0) = 0
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)  # noqa: E741
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = ((e / l_safe) @ vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe)).squeeze(-1)
    return out, lse.to(acc_dtype(q.dtype))


def flash_attention_forward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: int | None = None,
    seg_q: torch.Tensor | None = None,
    seg_k: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_attention_forward` in plain PyTorch: (out in q's dtype, lse in fp32; fp64 for fp64), no autograd."""
    window, seg_q, seg_k = _mask_args("flash_attention_forward_reference", q, k, window, seg_q, seg_k)
    segs = None if seg_q is None else (seg_q, seg_k)
    with torch.no_grad():
        return flash_attention_reference(
            q, k, v, causal, softmax_scale, True, segment_ids=segs, window=window, prefix_lengths=prefix_lengths
        )


def flash_attention_backward_reference(
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: int | None = None,
    seg_q: torch.Tensor | None = None,
    seg_k: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`flash_attention_backward` in plain PyTorch: FA2's backward from the given (possibly merged) lse, in fp32
    (fp64 for fp64) with the full score matrix; (dq, dk, dv) in the inputs' dtypes.

    P = exp(scale S - lse), 0 where masked or where lse is -inf (a row without keys, whose dlse is then ignored);
    D = rowsum(dO * O) - dlse; dV = P^T dO; dS = P (dO V^T - D); dQ = scale dS K; dK = scale dS^T Q, the query heads
    of each kv head summed (GQA)."""
    fn = "flash_attention_backward_reference"
    window, seg_q, seg_k = _mask_args(fn, q, k, window, seg_q, seg_k)
    prefix = _check_prefix(fn, q, causal, window, prefix_lengths)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    _check_lse(fn, lse, dlse, (b, hq, sq))
    work = acc_dtype(q.dtype)
    group = hq // hk
    qf = q.to(work).transpose(1, 2)  # (b, hq, sq, d)
    kf = k.to(work).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(work).transpose(1, 2).repeat_interleave(group, dim=1)
    lse = lse.to(work)
    live = lse != float("-inf")
    p = torch.exp((qf @ kf.transpose(-1, -2)) * softmax_scale - torch.where(live, lse, 0.0)[..., None])
    keep = live[..., None]
    allowed = _allowed(sq, sk, causal, window, seg_q, seg_k, q.device, prefix)
    if allowed is not None:
        keep = keep & allowed
    p = torch.where(keep, p, 0.0)
    do = torch.zeros_like(qf) if dout is None else dout.to(work).transpose(1, 2)
    delta = (do * out.to(work).transpose(1, 2)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(work)
    delta = torch.where(live, delta, 0.0)  # p = 0 on such rows: a NaN/inf dlse there must not reach any gradient
    ds = p * (do @ vf.transpose(-1, -2) - delta[..., None])
    dq = (ds @ kf) * softmax_scale
    dk = ((ds.transpose(-1, -2) @ qf) * softmax_scale).view(b, hk, group, sk, d).sum(2)
    dv = (p.transpose(-1, -2) @ do).view(b, hk, group, sk, d).sum(2)
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)
