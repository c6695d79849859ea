"""FlashAttention-2 forward and backward (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning"), with its autograd Function and a plain-PyTorch reference.

`flash_attention(q, k, v, causal=False, softmax_scale=None, return_lse=False)`: q is (batch, seq_q, heads_q, d),
k and v (batch, seq_k, heads_kv, d) with heads_q a multiple of heads_kv (grouped-query / multi-query attention:
query head h reads kv head h // (heads_q // heads_kv)). Returns the output in q's dtype, and with `return_lse` also
the log-sum-exp of each row's scaled scores, (batch, heads_q, seq_q) in fp32 (natural log), which ring attention
needs to merge partial results; a gradient may flow into it.

Forward: one program per (block of BLOCK_M queries, batch x query head) streams the kv blocks with an online
softmax in fp32 (exp2, the scale folded with log2(e)); only the output and the lse are written. Causal attention with
seq_q != seq_k uses the bottom-right alignment of `torch.ones(seq_q, seq_k).tril(seq_k - seq_q)` (query i sees keys
j <= i + seq_k - seq_q, as engine/model/ops.py's torch path and flash-attn >= 2.1); a row that sees no key at all
(seq_q > seq_k) gives output 0 and lse -inf, and gradients 0. In each program the kv blocks that no mask touches run
without the mask arithmetic (the causal band and the ragged last block run with it).

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


@triton.jit
def _kv_range(start_m, seq_q, seq_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block at start_m: (n_full, hi); kv blocks in [0, n_full) need no mask, [n_full, hi) do."""
    if CAUSAL:
        off = seq_k - seq_q
        hi = tl.maximum(tl.minimum(seq_k, start_m + BLOCK_M + off), 0)  # keys the block's last row sees
        lim = tl.maximum(tl.minimum(seq_k, start_m + off + 1), 0)  # keys its first row sees
    else:
        hi = seq_k
        lim = seq_k
    n_full = (lim // BLOCK_N) * BLOCK_N
    return n_full, hi


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
def _keys_seen(offs_m, offs_n, seq_k, causal_off, CAUSAL: tl.constexpr):
    """(rows, keys) mask of the scores that exist: keys below seq_k, and under the bottom-right causal band."""
    valid = offs_n[None, :] < seq_k
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
    return valid


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi, seq_k, causal_off, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Online softmax over the kv blocks [lo, hi): the updated (acc, m_i, l_i), m_i in log2 units."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k, MASK, HEAD_DIM, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        if MASK:
            valid = _keys_seen(offs_m, offs_n, seq_k, causal_off, CAUSAL)
            s = tl.where(valid, s, float("-inf"))
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
    Q, K, V, Out, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    n_heads, group, seq_q, seq_k, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M query rows of one (batch, query head): its output rows and their lse (natural log)."""
    bh, b, h, start_m, offs_m, offs_d, mask, rows = _query_tile(n_heads, seq_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    hk = h // group
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :], mask=mask, other=0.0)
    q = q.to(DOT)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    off = seq_k - seq_q
    n_full, hi = _kv_range(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, 0, n_full, seq_k, off, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, n_full, hi, seq_k, off, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
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
    dk, dv, k, v, q_base, do_base, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_d, lo, hi, seq_q, causal_off,
    qk_scale,
    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one kv block accumulated over the query blocks [lo, hi) of one query head (MASK: the causal band)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * stride_qs + offs_d[None, :], mask=mask, other=0.0).to(DOT)
        do = tl.load(do_base + rows * stride_dos + offs_d[None, :], mask=mask, other=0.0).to(DOT)
        lse2, delta = _row_stats(LSE, DELTA, offs_m, seq_q)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_off, p, 0.0)
        dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision=PREC, out_dtype=ACC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    n_heads, group, seq_q, seq_k, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
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
    off = seq_k - seq_q
    if CAUSAL:
        # Query rows i see key j when i >= j - off: the band of query blocks that see only part of this kv block runs
        # masked, the blocks below it (every row sees every key of the block) unmasked.
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(start_n + BLOCK_N - 1 - off, 0)
        band_hi = tl.minimum(tl.maximum(tl.cdiv(first_full, BLOCK_M) * BLOCK_M, lo), seq_q)
    else:
        lo = 0
        band_hi = 0
    # Keys past seq_k (the ragged last block) need no mask: they only reach rows of dK and dV that are not stored.
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row0 = (b * n_heads + h) * seq_q
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0, stride_qs, stride_dos, offs_n, offs_d, lo,
            band_hi, seq_q, off, qk_scale, True, HEAD_DIM, BLOCK_M, DOT, PREC, ACC,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0, stride_qs, stride_dos, offs_n, offs_d, band_hi,
            seq_q, seq_q, off, qk_scale, False, HEAD_DIM, BLOCK_M, DOT, PREC, ACC,
        )  # fmt: skip
    dk *= sm_scale
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows * stride_dks + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvs + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi, seq_k, causal_off,
    qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dQ of one query block accumulated over the kv blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k, MASK, HEAD_DIM, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            valid = _keys_seen(offs_m, offs_n, seq_k, causal_off, CAUSAL)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PREC, out_dtype=ACC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    n_heads, group, seq_q, seq_k, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
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
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    off = seq_k - seq_q
    n_full, hi = _kv_range(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, 0, n_full, seq_k, off, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, n_full, hi, seq_k, off, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_N, DOT, PREC, ACC,
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


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for q, k, v whose last dim has stride 1 (no autograd). lse is fp32 (fp64 for fp64 inputs)."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _check_grid("flash_attention", b * hq)
    bm, bn, warps, stages = launch_config(d, q.dtype, q.device)["fwd"]
    DOT, PREC, ACC = _dot_args(q.dtype)
    _attn_fwd_kernel[(triton.cdiv(sq, bm), b * hq)](
        q, k, v, out, lse, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out),
        hq, hq // hk, sq, sk, softmax_scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d), DOT=DOT, PREC=PREC, ACC=ACC,
        num_warps=warps, num_stages=stages,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given the gradients of out and of lse (either may be None: zero) and the forward's out and lse.

    `lse` may be any lse consistent with `out` (ring attention passes the merged, final one): P = exp(S - lse).
    """
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (tuple(t.shape) != (b, hq, sq) or not t.is_floating_point()):
            raise ValueError(
                f"flash_attention_backward: {name} must be a float tensor of shape (batch, heads_q, seq_q) = "
                f"{(b, hq, sq)}, got {t.dtype} {tuple(t.shape)}"
            )
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
    bm, bn, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(sk, bn), b * hk)](
        q, k, v, dout, lse, delta, dk, dv, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout), *_bsh(dk), *_bsh(dv),
        hq, hq // hk, sq, sk, *scales,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=DOT, PREC=PREC, ACC=ACC,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    bm, bn, warps, stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(sq, bm), b * hq)](
        q, k, v, dout, lse, delta, dq, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout), *_bsh(dq),
        hq, hq // hk, sq, sk, *scales,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=DOT, PREC=PREC, ACC=ACC,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out and lse (never the attention matrix); backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = flash_attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.set_materialize_grads(False)  # an unused lse (or out) gets None, not a tensor of zeros
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None
        dq, dk, dv = flash_attention_backward(dout, dlse, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention softmax(scale * q k^T) v, FlashAttention-2 in Triton; differentiable in q, k, v (and lse).

    q (batch, seq_q, heads_q, head_dim); k, v (batch, seq_k, heads_kv, head_dim), heads_q a multiple of heads_kv.
    `causal`: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned); rows that see no key give 0.
    `softmax_scale` defaults to 1/sqrt(head_dim). Returns out (q's shape and dtype), or (out, lse) with lse
    (batch, heads_q, seq_q) fp32, the natural-log normaliser of each row (-inf for a row that sees no key).
    ``backend`` = "auto" runs the kernel on CUDA tensors (on CPU too under ``TRITON_INTERPRET=1``) and
    `flash_attention_reference` (fp32 math, the full score matrix) elsewhere, decided at each call from q's device;
    "triton" forces the kernel (a one-line error where it cannot run), "torch" the reference.
    """
    fn = "flash_attention"
    triton_path = use_triton(fn, backend, q)
    _check(fn, q, k, v, triton_path)
    if not triton_path:
        return flash_attention_reference(q, k, v, bool(causal), softmax_scale, return_lse)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = FlashAttentionFunction.apply(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention with `flash_attention`'s semantics (GQA, bottom-right causal alignment, rows without
    keys giving 0 and lse -inf with zero gradients). Computes in fp32 (fp64 for fp64 inputs; in the inputs' own dtype
    with `upcast=False`, the same-dtype reference of the 2x rule); returns out in q's dtype, lse in fp32 (fp64)."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32 if upcast else q.dtype
    qf = q.to(work).transpose(1, 2)  # (b, h, s, d)
    kf = k.to(work).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    vf = v.to(work).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
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
