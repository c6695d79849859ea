"""kernels/attention.py (FlashAttention-2 forward and backward) against its plain-PyTorch reference by the kernel-parity
rule (docs/contracts.md): fp32 to 1e-5 relative against an fp64 reference, fp16 by the 2x-error rule, under the Triton
interpreter on CPU (16 x 16 tiles there, so these small shapes reach several kv blocks, ragged last blocks, the
causal band, sliding-window edges and documents that start inside a block). bf16 and large shapes on a GPU (marker
gpu); the sm_90 compile of the GPU launch configs runs without one (slow)."""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import (
    FlashAttentionFunction,
    block_d,
    flash_attention,
    flash_attention_reference,
    launch_config,
)
from kernels.utils import rel_err, two_x_rule
from tests.kernels.aot import compile_for_sm90


def make_qkv(b, sq, sk, hq, hk, d, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = (torch.randn(b, sq, hq, d, generator=g, device=device) * scale).to(dtype)
    k = (torch.randn(b, sk, hk, d, generator=g, device=device) * scale).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g, device=device).to(dtype)
    return q, k, v


def run(fn, q, k, v, go, gl=None, dtype=None, **kw):
    """(out, lse, dq, dk, dv) of fn on fresh leaves (cast to dtype if given) for upstream gradients go (and gl for
    the lse, when given: the loss is <out, go> + <lse, gl>)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    outs, grads = (out, lse) if gl is not None else (out,), (go, gl) if gl is not None else (go,)
    torch.autograd.backward(outs, [g_.to(o.dtype) for o, g_ in zip(outs, grads)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


# (batch, seq_q, seq_k, heads_q, heads_kv, head_dim, causal)
FP32_CASES = [
    (2, 37, 37, 2, 2, 16, False),
    (2, 37, 37, 2, 2, 32, True),
    (1, 37, 53, 4, 2, 16, True),  # GQA, seq_q < seq_k: bottom-right causal alignment
    (1, 53, 37, 4, 1, 16, True),  # MQA, seq_q > seq_k: the first 16 query rows see no key
    (1, 53, 37, 2, 2, 32, False),
    (1, 1, 29, 2, 1, 16, True),  # one query row (decoding): it sees every key
    (1, 20, 24, 2, 2, 64, True),
    (1, 19, 23, 2, 2, 24, True),  # head_dim 24 padded to a 32-wide tile
]


@pytest.mark.parametrize("b, sq, sk, hq, hk, d, causal", FP32_CASES)
def test_fp32_matches_fp64_reference(b, sq, sk, hq, hk, d, causal):
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, scale=1.5)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(b, sq, hq, d, generator=g)
    gl = torch.randn(b, hq, sq, generator=g)  # a gradient through the lse too (ring attention's merge)
    ours = run(flash_attention, q, k, v, go, gl, causal=causal)
    ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float64, causal=causal)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32 and ours[1].shape == (b, hq, sq)
    for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], ours, ref):
        assert o.shape == r.shape, name
        assert rel_err(o, r) <= 1e-5, (name, rel_err(o, r))


def test_fp64_kernel_matches_reference_to_rounding():
    """fp64 inputs run the kernels in fp64 (the same code path at a precision where any real error shows)."""
    q, k, v = make_qkv(2, 21, 35, 4, 2, 16, dtype=torch.float64, seed=3)
    go = torch.randn(2, 21, 4, 16, dtype=torch.float64)
    gl = torch.randn(2, 4, 21, dtype=torch.float64)
    for causal in (False, True):
        ours = run(flash_attention, q, k, v, go, gl, causal=causal)
        ref = run(flash_attention_reference, q, k, v, go, gl, causal=causal)
        for o, r in zip(ours, ref):
            assert o.dtype == torch.float64 and rel_err(o, r) <= 1e-12


def test_causal_alignment_and_rows_without_keys():
    """seq_q > seq_k, causal: query i sees keys j <= i - (seq_q - seq_k); the first rows see none and give out 0,
    lse -inf, zero gradients and no NaN; the next row sees exactly key 0 (its output is v[0])."""
    b, sq, sk, h, d = 1, 53, 37, 2, 16
    q, k, v = make_qkv(b, sq, sk, h, h, d, seed=4)
    go, gl = torch.randn(b, sq, h, d), torch.randn(b, h, sq)
    out, lse, dq, dk, dv = run(flash_attention, q, k, v, go, gl, causal=True)
    n_empty = sq - sk
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.equal(out[:, :n_empty], torch.zeros_like(out[:, :n_empty]))
    assert torch.equal(dq[:, :n_empty], torch.zeros_like(dq[:, :n_empty]))
    assert torch.isneginf(lse[:, :, :n_empty]).all() and torch.isfinite(lse[:, :, n_empty:]).all()
    torch.testing.assert_close(out[:, n_empty], v[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[:, :, n_empty], (q[:, n_empty] * k[:, 0]).sum(-1) / math.sqrt(d))
    # key j is seen by query rows i >= j + n_empty, so the last key's gradient comes from the last row only
    ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float64, causal=True)
    assert rel_err(dk[:, -1], ref[3][:, -1]) <= 1e-5 and dk[:, -1].abs().sum() > 0
    # no key at all: every row is empty
    out0, lse0 = flash_attention(q, k[:, :0], v[:, :0], causal=True, return_lse=True)
    assert torch.equal(out0, torch.zeros_like(out0)) and torch.isneginf(lse0).all()


def test_non_finite_lse_gradient_on_rows_without_keys_stays_there():
    """A ring-attention merge like logaddexp over two -inf lse gives NaN gradients for empty rows; those rows have
    p = 0, so the NaN must not reach dk or dq (45 x 24 puts empty and non-empty rows in one 16-row query block)."""
    b, sq, sk, h, d = 1, 45, 24, 2, 16
    q, k, v = make_qkv(b, sq, sk, h, h, d, seed=5)
    go, gl = torch.randn(b, sq, h, d), torch.randn(b, h, sq)
    gl[:, :, : sq - sk] = float("nan")
    ours = run(flash_attention, q, k, v, go, gl, causal=True)
    gl_ref = gl.clone()
    gl_ref[:, :, : sq - sk] = 0.0  # what the reference's where() makes of it
    ref = run(flash_attention_reference, q, k, v, go, gl_ref, dtype=torch.float64, causal=True)
    for name, o, r in zip(["dq", "dk", "dv"], ours[2:], ref[2:]):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, r) <= 1e-5, (name, rel_err(o, r))
    with pytest.raises(ValueError, match=r"lse must be a float tensor of shape \(batch, heads_q, seq_q\)"):
        from kernels.attention import flash_attention_backward

        flash_attention_backward(go, None, q, k, v, ours[0], ours[1].transpose(1, 2), True, 0.25)


def test_reference_agrees_with_torch_sdpa():
    """The reference itself: SDPA (its GQA and its causal mask when seq_q == seq_k; an explicit bottom-right mask
    otherwise, rows with keys only) and a gradcheck in fp64 through out and lse, rows without keys included."""
    q, k, v = make_qkv(2, 9, 9, 4, 2, 8, dtype=torch.float64, seed=5)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(flash_attention_reference(q, k, v, causal=True), sdpa)
    q, k, v = make_qkv(1, 7, 5, 2, 2, 8, dtype=torch.float64, seed=6)
    mask = torch.ones(7, 5, dtype=torch.bool).tril(diagonal=5 - 7)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    ref = flash_attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(ref[:, 2:], sdpa.transpose(1, 2)[:, 2:])
    assert torch.equal(ref[:, :2], torch.zeros_like(ref[:, :2]))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fn(*t):  # finite differences of the -inf lse entries would be NaN: compare them as 0 (their gradient is 0)
        out, lse = flash_attention_reference(*t, causal=True, return_lse=True, softmax_scale=0.7)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("causal", [False, True])
def test_fp16_two_x_rule(causal):
    """fp16 (16-bit dot operands, p and ds rounded to fp16 as in FA2): error against the fp32 reference <= 2x the
    error of the same math in fp16, plus half an ulp."""
    b, sq, sk, hq, hk, d = 2, 45, 51, 4, 2, 32
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, dtype=torch.float16, seed=7)
    g = torch.Generator().manual_seed(8)
    go, gl = torch.randn(b, sq, hq, d, generator=g), torch.randn(b, hq, sq, generator=g)
    ours = run(flash_attention, q, k, v, go, gl, causal=causal)
    ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float32, causal=causal)
    low = run(flash_attention_reference, q, k, v, go, gl, causal=causal, upcast=False)
    assert ours[0].dtype == torch.float16 and ours[1].dtype == torch.float32
    assert all(t.dtype == torch.float16 for t in ours[2:])
    for name, o, r, lo in zip(["out", "lse", "dq", "dk", "dv"], ours, ref, low):
        if name == "lse":  # fp32 in both; the fp16 reference's is fp16 math
            assert rel_err(o, r) <= 1e-3
            continue
        err, allowed = two_x_rule(o, r, lo)
        assert err <= allowed, (name, err, allowed)


def test_non_contiguous_views_of_fused_qkv():
    """q, k, v as views of one fused projection (b, s, (hq + 2 hk) * d): strided, no copy needed; gradients flow
    back into the fused tensor. Also a head_dim stride != 1 (copied) and a transposed (b, h, s, d) storage."""
    b, s, hq, hk, d = 2, 29, 4, 2, 16
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(b, s, (hq + 2 * hk) * d, generator=g)
    go = torch.randn(b, s, hq, d, generator=g)

    def split(t):
        q, k, v = t.split([hq * d, hk * d, hk * d], dim=-1)
        return q.view(b, s, hq, d), k.view(b, s, hk, d), v.view(b, s, hk, d)

    grads = []
    for fn, dtype in ((flash_attention, torch.float32), (flash_attention_reference, torch.float64)):
        x = qkv.detach().to(dtype).requires_grad_()
        q, k, v = split(x)
        assert not q.is_contiguous()
        out = fn(q, k, v, causal=True)
        out.backward(go.to(dtype))
        grads.append((out.detach(), x.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-5 and rel_err(grads[0][1], grads[1][1]) <= 1e-5
    # head_dim not unit-stride, and a (b, h, s, d)-major storage
    q, k, v = make_qkv(1, 17, 17, 2, 2, 16, seed=10)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, head_dim stride 17
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(-1) != 1
    out = flash_attention(qt, kt, v, causal=True)
    ref = flash_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out, ref) <= 1e-5


def test_softmax_scale():
    q, k, v = make_qkv(1, 23, 31, 2, 1, 32, seed=11)
    go = torch.randn(1, 23, 2, 32)
    ours = run(flash_attention, q, k, v, go, softmax_scale=0.05, causal=True)
    ref = run(flash_attention_reference, q, k, v, go, dtype=torch.float64, softmax_scale=0.05, causal=True)
    for o, r in zip(ours, ref):
        assert rel_err(o, r) <= 1e-5
    default = flash_attention(q, k, v)
    assert torch.equal(default, flash_attention(q, k, v, softmax_scale=1 / math.sqrt(32)))
    assert not torch.allclose(default, flash_attention(q, k, v, softmax_scale=0.05))


def test_only_lse_or_only_out_used():
    """Backward with a gradient for the lse alone (out unused: None from autograd) and for out alone."""
    q, k, v = make_qkv(1, 19, 26, 2, 1, 16, seed=12)
    grads = []
    for fn, dtype in ((flash_attention, torch.float32), (flash_attention_reference, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        _, lse = fn(*leaves, causal=True, return_lse=True)
        grads.append(torch.autograd.grad(lse.sum(), leaves, allow_unused=True))
    assert grads[1][2] is None and torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))  # lse does not read v
    for a, r in zip(grads[0][:2], grads[1][:2]):
        assert rel_err(a, r) <= 1e-5
    out = flash_attention(*(t.requires_grad_() for t in (q, k, v)), causal=True)
    assert out.grad_fn is not None and not isinstance(out, tuple)


def test_backward_is_deterministic_and_no_grad_forward():
    q, k, v = make_qkv(2, 33, 33, 4, 1, 16, seed=13)
    go = torch.randn(2, 33, 4, 16)
    first = run(flash_attention, q, k, v, go, causal=True)
    again = run(flash_attention, q, k, v, go, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with torch.no_grad():
        out = flash_attention(q, k, v, causal=True)
    assert torch.equal(out, first[0]) and out.grad_fn is None


def test_public_api_and_errors():
    assert kernels.flash_attention is flash_attention
    assert kernels.flash_attention_reference is flash_attention_reference
    assert FlashAttentionFunction is not None and block_d(24) == 32 and block_d(8) == 16 and block_d(128) == 128
    q, k, v = make_qkv(1, 4, 4, 4, 2, 16)
    bad = [
        ((q, k, v[:, :3]), "k and v must have the same shape"),
        ((q, k[..., :8], v[..., :8]), "must agree in batch"),
        ((q[:, :, :3], k, v), "heads_q (3) must be a multiple of heads_kv (2)"),
        ((q, k.double(), v.double()), "must have one dtype"),
        ((q[0], k[0], v[0]), "must be 4-D"),
        ((torch.zeros(1, 4, 2, 512), torch.zeros(1, 4, 2, 512), torch.zeros(1, 4, 2, 512)), "head_dim 512"),
        ((q.long(), k, v), "floating-point"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError) as e:
            flash_attention(*args)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))


# ---------------------------------------------------------------------------------------------------------------------
# Segment ids (packed documents) and sliding windows


def packed_ids(*rows):
    """(len(rows), sum of each row's lengths) int64 segment ids: row r holds documents of the given lengths, numbered
    from 0 (every row must have the same total)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def fp32_vs_fp64(q, k, v, seed=1, **kw):
    """(name, relative error) of out, lse, dq, dk, dv of the kernel (fp32) against the fp64 reference, the loss
    <out, go> + <lse, gl> for random go, gl."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(q.shape, generator=g)
    gl = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g)
    ours = run(flash_attention, q, k, v, go, gl, **kw)
    ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float64, **kw)
    return ours, [(name, rel_err(o, r)) for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], ours, ref)]


# Rows of 149 positions (several blocks of every kernel) split into 1 to 7 documents of odd lengths, one-position
# documents included (the one 149-position document only causal: non-causal it is plain attention, and the slowest
# case under the interpreter).
DOCS = [((1, 19, 3, 75, 1, 31, 19), (49, 1, 99)), ((149,), (5, 7, 9, 11, 117))]


@pytest.mark.parametrize("docs, causal", [(DOCS[0], False), (DOCS[1], True), (DOCS[0], True)])
def test_segments_match_fp64_reference(docs, causal):
    """Packed documents: query i sees key j only within its document (and causal): the kernel (GQA 2/1) against
    the fp64 reference; documents start and end inside 16-blocks, so blocks mix documents."""
    ids = packed_ids(*docs)
    q, k, v = make_qkv(2, 149, 149, 2, 1, 16, scale=1.5, seed=30)
    _, errs = fp32_vs_fp64(q, k, v, causal=causal, segment_ids=ids)
    assert all(e <= 1e-5 for _, e in errs), errs


# (window, causal, seq_q, seq_k): windows of one position, of 17 (crossing 16-blocks), and wider than both sequences
WINDOW_CASES = [
    (w, causal, sq, sk) for w in (1, 17, 500) for causal in (False, True) for sq, sk in ((45, 45), (29, 61), (61, 29))
]


@pytest.mark.parametrize("window, causal, sq, sk", WINDOW_CASES)
def test_windows_match_fp64_reference(window, causal, sq, sk):
    """Sliding windows on the bottom-right diagonal (query i at key position i + seq_k - seq_q), causal or both
    sides; with seq_q > seq_k some rows see no key. A window wider than the sequences is no window at all."""
    q, k, v = make_qkv(1, sq, sk, 4, 2, 16, scale=1.5, seed=31)
    ours, errs = fp32_vs_fp64(q, k, v, causal=causal, window=window)
    assert all(e <= 1e-5 for _, e in errs), errs
    if window >= max(sq, sk):
        plain, _ = fp32_vs_fp64(q, k, v, causal=causal)
        assert all(torch.equal(a, b) for a, b in zip(ours, plain))


@pytest.mark.parametrize("causal", [False, True])
def test_windows_with_segments_match_fp64_reference(causal):
    ids = packed_ids((1, 37, 3, 61, 47), (97, 1, 51))
    q, k, v = make_qkv(2, 149, 149, 2, 1, 16, scale=1.5, seed=32)
    _, errs = fp32_vs_fp64(q, k, v, causal=causal, segment_ids=ids, window=17)
    assert all(e <= 1e-5 for _, e in errs), errs


def test_segment_pairs_cross_attention_rows_without_keys():
    """(seg_q, seg_k) of different lengths, unsorted, int64 ids beyond int32: query rows whose id no key has see
    nothing (out 0, lse -inf, dq 0, and a NaN lse gradient there reaches no gradient), alone or with a window."""
    b, sq, sk, hq, hk, d = 2, 45, 70, 2, 1, 16
    g = torch.Generator().manual_seed(33)
    seg_q = torch.randint(0, 4, (b, sq), generator=g) * 2**40  # id 3 * 2**40 has no key
    seg_k = torch.randint(0, 3, (b, sk), generator=g) * 2**40
    seg_q[:, :3] = 7  # and a run of rows with no key at the start of a query block
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, scale=1.5, seed=34)
    go, gl = torch.randn(b, sq, hq, d, generator=g), torch.randn(b, hq, sq, generator=g)
    empty = (seg_q[:, :, None] != seg_k[:, None, :]).all(-1)  # (b, sq)
    assert 0 < int(empty.sum()) < b * sq
    gl.transpose(1, 2)[empty] = float("nan")
    gl_ref = torch.where(torch.isnan(gl), 0.0, gl)
    for causal, window in ((False, None), (True, None), (False, 9), (True, 30)):
        kw = dict(causal=causal, window=window, segment_ids=(seg_q, seg_k))
        ours = run(flash_attention, q, k, v, go, gl, **kw)
        ref = run(flash_attention_reference, q, k, v, go, gl_ref, dtype=torch.float64, **kw)
        for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], ours, ref):
            assert rel_err(o, r) <= 1e-5, (name, causal, window, rel_err(o, r))
        out, lse, dq = ours[:3]
        assert torch.isneginf(lse.transpose(1, 2)[empty]).all()
        assert not out[empty].any() and not dq[empty].any()
        assert all(torch.isfinite(t).all() for t in ours[2:])


def test_reference_forward_and_backward_match_kernel_host_functions():
    """flash_attention_forward/backward_reference (what ring attention runs on CPU) against the kernel host functions
    and against autograd of flash_attention_reference, with a random lse gradient (NaN on rows without keys) and with
    an lse that is not the forward's own (a ring-attention merge): the same formula from the given lse."""
    from kernels.attention import (
        flash_attention_backward,
        flash_attention_backward_reference,
        flash_attention_forward,
        flash_attention_forward_reference,
    )

    b, sq, sk, hq, hk, d = 2, 40, 29, 4, 2, 16
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, scale=1.5, seed=35)
    g = torch.Generator().manual_seed(36)
    seg_q, seg_k = torch.randint(0, 3, (b, sq), generator=g), torch.randint(0, 2, (b, sk), generator=g)
    go, gl = torch.randn(b, sq, hq, d, generator=g), torch.randn(b, hq, sq, generator=g)
    scale = 0.3
    for causal, window, segs in ((True, None, (None, None)), (False, 7, (seg_q, seg_k)), (True, 12, (seg_q, seg_k))):
        kw = dict(window=window, seg_q=segs[0], seg_k=segs[1])
        out, lse = flash_attention_forward(q, k, v, causal, scale, **kw)
        q64, k64, v64 = q.double(), k.double(), v.double()
        out_r, lse_r = flash_attention_forward_reference(q64, k64, v64, causal, scale, **kw)
        assert out_r.dtype == lse_r.dtype == torch.float64
        assert rel_err(out, out_r) <= 1e-5 and rel_err(lse, lse_r) <= 1e-5
        empty = torch.isneginf(lse_r)
        assert empty.any()  # seq_q > seq_k (causal) or ids 2 with no key
        gl_nan = torch.where(empty, float("nan"), gl)
        grads = flash_attention_backward(go, gl_nan, q, k, v, out, lse, causal, scale, **kw)
        grads_r = flash_attention_backward_reference(go, gl_nan, q64, k64, v64, out_r, lse_r, causal, scale, **kw)
        segment_ids = None if segs[0] is None else segs
        autograd = run(
            flash_attention_reference, q, k, v, go, torch.where(empty, 0.0, gl), dtype=torch.float64,
            causal=causal, softmax_scale=scale, window=window, segment_ids=segment_ids,
        )  # fmt: skip
        for name, o, r, a in zip(["dq", "dk", "dv"], grads, grads_r, autograd[2:]):
            assert r.dtype == torch.float64 and rel_err(r, a) <= 1e-12, (name, rel_err(r, a))
            assert torch.isfinite(o).all() and rel_err(o, r) <= 1e-5, (name, causal, window, rel_err(o, r))
        # a merged lse (the forward's combined with another block's) and its out: both sides take P = exp(S - lse)
        merged = torch.logaddexp(lse_r, torch.randn(lse_r.shape, generator=g, dtype=torch.float64))
        out_m = out_r * torch.exp(lse_r - merged).nan_to_num(0.0).transpose(1, 2)[..., None]
        grads = flash_attention_backward(go, gl, q, k, v, out_m.float(), merged.float(), causal, scale, **kw)
        grads_r = flash_attention_backward_reference(go, gl, q64, k64, v64, out_m, merged, causal, scale, **kw)
        for name, o, r in zip(["dq", "dk", "dv"], grads, grads_r):
            assert rel_err(o, r) <= 1e-5, (name, causal, window, rel_err(o, r))
        fp32 = flash_attention_backward_reference(None, gl, q, k, v, out, lse, causal, scale, **kw)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in fp32)


def _nan_rows(t, rows):
    t = t.clone()
    t[:, rows] = float("nan")
    return t


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_blocks_are_skipped(causal):
    """Blocks that no row sees are never loaded: NaN in v (and k) at keys outside every query's window, or in dO at
    rows that see none of a kv block, would reach the results through p = 0 times NaN if a masked block were
    computed. Windows (the forward and dQ kv ranges, the dK/dV query range) and segment ids (the run-time skip)."""
    # window 17 at key positions 64..95: keys 0..47 (three 16-blocks) are outside every query's window
    q, k, v = make_qkv(1, 32, 96, 2, 1, 16, seed=37)
    go, gl = torch.randn(1, 32, 2, 16), torch.randn(1, 2, 32)
    unseen = slice(0, 48)
    kw = dict(causal=causal, window=17)
    out, lse, dq, dk, dv = run(flash_attention, q, _nan_rows(k, unseen), _nan_rows(v, unseen), go, gl, **kw)
    ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float64, **kw)
    for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], (out, lse, dq, dk, dv), ref):
        assert rel_err(o, r) <= 1e-5, (name, rel_err(o, r))
    # self-attention, window 17: query rows 48..63 see keys 32..79 at most; NaN in their dO may only reach those keys
    q, k, v = make_qkv(1, 96, 96, 2, 1, 16, seed=38)
    go = torch.randn(1, 96, 2, 16)
    rows = slice(48, 64)
    ours = run(flash_attention, q, k, v, _nan_rows(go, rows), **kw)
    ref = run(flash_attention_reference, q, k, v, go.index_fill(1, torch.arange(48, 64), 0.0), **kw)
    for name, i in (("dk", 3), ("dv", 4)):
        for keys in (slice(0, 32), slice(64 if causal else 80, 96)):  # keys no row of 48..63 sees
            assert rel_err(ours[i][:, keys], ref[i][:, keys]) <= 1e-5, (name, keys)
    assert rel_err(ours[2][:, 64:], ref[2][:, 64:]) <= 1e-5 and rel_err(ours[2][:, :48], ref[2][:, :48]) <= 1e-5
    # segment ids: whole 16-blocks of documents; keys 16..31 (id 5) have no query, rows 32..47 (id 9) no key
    seg_q = torch.tensor([[0] * 16 + [1] * 16 + [9] * 16])
    seg_k = torch.tensor([[0] * 16 + [5] * 16 + [1] * 16])
    q, k, v = make_qkv(1, 48, 48, 2, 1, 16, seed=39)
    go, gl = torch.randn(1, 48, 2, 16), torch.randn(1, 2, 48)
    kw = dict(causal=causal, segment_ids=(seg_q, seg_k))
    nan_go, nan_gl = _nan_rows(go, slice(32, 48)), gl.clone()
    nan_gl[:, :, 32:] = float("nan")
    ours = run(flash_attention, q, _nan_rows(k, slice(16, 32)), _nan_rows(v, slice(16, 32)), nan_go, nan_gl, **kw)
    gl[:, :, 32:] = 0.0
    ref = run(flash_attention_reference, q, k, v, go.index_fill(1, torch.arange(32, 48), 0.0), gl, **kw)
    for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], ours, ref):
        assert rel_err(o, r) <= 1e-5, (name, rel_err(o, r))
    assert not ours[3][:, 16:32].any() and not ours[4][:, 16:32].any()


def test_torch_backend_takes_the_same_keywords(monkeypatch):
    """backend="torch", and "auto" on CPU without the interpreter, run the reference with the same masks."""
    q, k, v = make_qkv(2, 37, 37, 2, 1, 16, seed=40)
    ids = packed_ids((5, 20, 12), (37,))
    kw = dict(causal=True, segment_ids=ids, window=9, return_lse=True)
    kernel = flash_attention(q, k, v, **kw)
    torch_out = flash_attention(q, k, v, backend="torch", **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    auto_out = flash_attention(q, k, v, **kw)
    ref = flash_attention_reference(q, k, v, **kw)
    for a, b in zip(kernel, ref):
        assert rel_err(a, b) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(torch_out + auto_out, ref + ref))
    assert not torch.equal(ref[0], flash_attention_reference(q, k, v, causal=True))


def test_segment_and_window_errors():
    from kernels.attention import flash_attention_backward_reference, flash_attention_forward

    q, k, v = make_qkv(2, 8, 8, 2, 1, 16)
    ids = torch.zeros(2, 8, dtype=torch.int32)
    bad = [
        (dict(segment_ids=ids[:, :5]), "segment_ids must have shape (batch, seq_q) = (2, 8), got (2, 5)"),
        (dict(segment_ids=ids[:1]), "segment_ids must have shape (batch, seq_q)"),
        (dict(segment_ids=(ids, ids[:, :3])), "segment_ids[1] must have shape (batch, seq_k) = (2, 8), got (2, 3)"),
        (dict(segment_ids=ids.float()), "segment_ids must be an integer tensor of segment ids, got torch.float32"),
        (dict(segment_ids=ids.bool()), "must be an integer tensor"),
        (dict(segment_ids=[1, 2]), "segment_ids[0] must be an integer tensor, got int"),
        (dict(segment_ids=ids.to("meta")), "segment_ids is on meta but q is on cpu"),
        (dict(segment_ids=(ids,)), "segment_ids as a tuple must be (seg_q, seg_k), got 1 items"),
        (dict(segment_ids=(ids, ids, ids)), "got 3 items"),
        (dict(window=0), "window must be a positive int or None, got 0"),
        (dict(window=-3), "window must be a positive int or None, got -3"),
        (dict(window=2.5), "window must be a positive int or None, got 2.5"),
        (dict(window=True), "window must be a positive int or None, got True"),
    ]
    for backend in ("auto", "torch"):
        for kw, message in bad:
            for fn in (flash_attention, flash_attention_reference):
                with pytest.raises(ValueError) as e:
                    fn(q, k, v, **kw) if fn is flash_attention_reference else fn(q, k, v, backend=backend, **kw)
                assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    with pytest.raises(ValueError, match=r"one segment_ids tensor needs seq_q == seq_k, got 8 and 5"):
        flash_attention(q, k[:, :5], v[:, :5], segment_ids=ids)
    with pytest.raises(ValueError, match=r"flash_attention_forward: segment ids for both queries and keys"):
        flash_attention_forward(q, k, v, True, 0.25, seg_q=ids)
    out, lse = flash_attention_forward(q, k, v, True, 0.25)
    with pytest.raises(ValueError, match=r"flash_attention_backward_reference: window must be a positive int"):
        flash_attention_backward_reference(None, None, q, k, v, out, lse, True, 0.25, window=0)


# ---------------------------------------------------------------------------------------------------------------------
# GPU side: the launch configs compiled for sm_90 (no GPU needed), and bf16/fp32 on a CUDA device


def aot_cases():
    """(name, kernel, arg types, constexprs, num_warps, num_stages) of the GPU launch configs: bf16 at head_dim 64
    and 128, fp32 at 128, the backward's preprocessing kernel, and each kernel with every mask on (window, prefix,
    segment ids: the most registers) at bf16 head_dim 128 (each compile takes seconds)."""
    import triton.language as tl

    from kernels import attention as A

    cases = []
    for dtype, ptr, dot, prec, dims in (
        (torch.bfloat16, "*bf16", tl.bfloat16, "tf32", (64, 128)),
        (torch.float32, "*fp32", tl.float32, "ieee", (128,)),
    ):
        for d in dims:
            cfg = launch_config(d, dtype, torch.device("cuda"))
            common = dict(HEAD_DIM=d, BLOCK_D=block_d(d), DOT=dot, PREC=prec, ACC=tl.float32)
            types = dict(Q=ptr, K=ptr, V=ptr, Out=ptr, DO=ptr, DK=ptr, DV=ptr, DQ=ptr, LSE="*fp32", DELTA="*fp32")
            types.update(qk_scale="fp32", sm_scale="fp32", SEG_Q="*i32", SEG_K="*i32", PREFIX_LEN="*i32")
            for name, fn in (
                ("fwd", A._attn_fwd_kernel),
                ("dkdv", A._attn_bwd_dkdv_kernel),
                ("dq", A._attn_bwd_dq_kernel),
            ):
                bm, bn, warps, stages = cfg[name]
                consts = dict(common, CAUSAL=True, WINDOW=False, PREFIX=False, HAS_SEG=False, BLOCK_M=bm, BLOCK_N=bn)
                cases.append((f"{name} {ptr[1:]} d={d}", fn, types, consts, warps, stages))
                if dtype == torch.bfloat16 and d == 128:  # every mask at once: window, prefix and segment ids
                    consts = dict(consts, WINDOW=True, PREFIX=True, HAS_SEG=True)
                    cases.append((f"{name} {ptr[1:]} d={d} window+prefix+segments", fn, types, consts, warps, stages))
            # backward's row statistics (with a gradient through lse), at the GPU's 64-row block
            consts = dict(HAS_DLSE=True, HEAD_DIM=d, BLOCK_M=64, BLOCK_D=block_d(d), ACC=tl.float32)
            types_pre = dict(types, DLSE="*fp32")
            cases.append((f"preprocess {ptr[1:]} d={d}", A._attn_bwd_preprocess_kernel, types_pre, consts, 4, 1))
    return cases


SMEM_LIMIT = 227 * 1024  # bytes of shared memory one program may use on sm_90


@pytest.mark.slow
def test_gpu_configs_compile_for_sm90_without_spills(tmp_path):
    rows = compile_for_sm90("tests.kernels.test_flash_attention:aot_cases", len(aot_cases()), tmp_path)
    assert not [r for r in rows if r["shared"] > SMEM_LIMIT], rows
    # No spills at head_dim 64 (bf16); the larger tiles spill a little today (a performance issue, not a bug):
    # reported, not asserted, until they are tuned on a GPU.
    spills = [r for r in rows if r.get("stack", 0) or r.get("local", 0)]
    assert not [r for r in spills if "bf16 d=64" in r["name"]], spills
    print("register spills (bytes of stack):", {r["name"]: r.get("stack") for r in spills})


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "b, sq, sk, hq, hk, d", [(2, 1024, 1024, 16, 4, 128), (1, 1000, 1537, 8, 8, 64), (1, 777, 513, 4, 1, 256)]
)
def test_bf16_two_x_rule_on_gpu(b, sq, sk, hq, hk, d, causal):
    """bf16 error against the fp32 reference <= 2x torch SDPA's bf16 error against it, plus half an ulp."""
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, dtype=torch.bfloat16, seed=20, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(21)
    go = torch.randn(b, sq, hq, d, generator=g, device="cuda")
    ours = run(flash_attention, q, k, v, go, causal=causal)
    ref = run(flash_attention_reference, q, k, v, go, dtype=torch.float32, causal=causal)

    r0 = max(sq - sk, 0) if causal else 0  # the first r0 query rows see no key

    def sdpa(q, k, v, causal, return_lse):
        # SDPA gives NaN on rows that see no key, and its backward spreads that NaN to every key's dk/dv: it runs on
        # the rows that see keys only, the others being 0 (their exact output and gradient).
        mask = None
        if causal and sq != sk:  # SDPA's is_causal is top-left aligned; ours is bottom-right
            mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq)[r0:]
        o = F.scaled_dot_product_attention(
            q[:, r0:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=causal and mask is None, enable_gqa=hq != hk,
        ).transpose(1, 2)  # fmt: skip
        o = torch.cat([torch.zeros_like(q[:, :r0]), o], dim=1)
        return o, torch.zeros(b, hq, sq, device="cuda")

    low = run(sdpa, q, k, v, go, causal=causal)
    rows = slice(r0, None)
    for name, i in (("out", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        o, r, lo = ours[i], ref[i], low[i]
        if i in (0, 2):
            o, r, lo = o[:, rows], r[:, rows], lo[:, rows]
        err, allowed = two_x_rule(o, r, lo)
        assert err <= allowed, (name, err, allowed)
    assert rel_err(ours[1], ref[1]) <= 1e-3


@gpu
def test_fp32_parity_on_gpu():
    """fp32 dots run in IEEE fp32 (not TF32): 1e-5 against the fp64 reference on a GPU too."""
    q, k, v = make_qkv(2, 300, 411, 8, 2, 128, seed=22, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(23)
    go, gl = torch.randn(2, 300, 8, 128, generator=g, device="cuda"), torch.randn(2, 8, 300, generator=g, device="cuda")
    for causal in (False, True):
        ours = run(flash_attention, q, k, v, go, gl, causal=causal)
        ref = run(flash_attention_reference, q, k, v, go, gl, dtype=torch.float64, causal=causal)
        for name, o, r in zip(["out", "lse", "dq", "dk", "dv"], ours, ref):
            assert rel_err(o, r) <= 1e-5, (name, causal, rel_err(o, r))


@gpu
def test_backward_bitwise_deterministic_on_gpu():
    q, k, v = make_qkv(2, 1024, 1024, 16, 2, 128, dtype=torch.bfloat16, seed=24, device="cuda")
    go = torch.randn(2, 1024, 16, 128, device="cuda")
    first = run(flash_attention, q, k, v, go, causal=True)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, run(flash_attention, q, k, v, go, causal=True)))


# (seq_q, seq_k, prefix lengths of the two rows): 0 and the whole sequence, inside the first 16-block and across the
# second, and, with seq_q != seq_k, prefixes counted in keys (bottom-right causal alignment)
PREFIX_CASES = [(37, 37, (0, 37)), (37, 37, (9, 20)), (29, 45, (5, 33))]


@pytest.mark.parametrize("sq, sk, prefix", PREFIX_CASES)
def test_prefix_lm_matches_fp64_reference(sq, sk, prefix):
    """Prefix LM (causal, plus keys j < P for every query): the forward's kv range reaches P, the dK/dV kernel's
    query range starts at row 0 for key blocks below P; out, lse and all gradients against the fp64 reference."""
    q, k, v = make_qkv(2, sq, sk, 2, 1, 16, scale=1.5, seed=41)
    _, errs = fp32_vs_fp64(q, k, v, causal=True, prefix_lengths=torch.tensor(prefix))
    assert all(e <= 1e-5 for _, e in errs), errs


def test_prefix_lm_with_segments_and_host_functions():
    """The prefix ORed with the causal mask, then ANDed with packed documents; the no-autograd host functions (ring
    attention's) take the same keyword and agree with their references."""
    ids = packed_ids((10, 27), (30, 7))
    q, k, v = make_qkv(2, 37, 37, 2, 2, 16, scale=1.5, seed=42)
    prefix = torch.tensor([20, 33])
    _, errs = fp32_vs_fp64(q, k, v, causal=True, segment_ids=ids, prefix_lengths=prefix)
    assert all(e <= 1e-5 for _, e in errs), errs
    from kernels.attention import (
        flash_attention_backward,
        flash_attention_backward_reference,
        flash_attention_forward,
        flash_attention_forward_reference,
    )

    args = (q.double(), k.double(), v.double(), True, 0.25, None, ids, ids, prefix)
    out, lse = flash_attention_forward(*args)
    ref_out, ref_lse = flash_attention_forward_reference(*args)
    assert rel_err(out, ref_out) <= 1e-12 and rel_err(lse, ref_lse) <= 1e-12
    go = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = flash_attention_backward(go, None, *args[:3], out, lse, *args[3:])
    refs = flash_attention_backward_reference(go, None, *args[:3], out, lse, *args[3:])
    assert all(rel_err(g_, r) <= 1e-12 for g_, r in zip(grads, refs))


def test_prefix_lm_errors():
    q, k, v = make_qkv(2, 8, 8, 2, 2, 16)
    p = torch.tensor([3, 4])
    for kw, needle in (
        (dict(prefix_lengths=p), "flash_attention: prefix_lengths needs causal=True"),
        (dict(causal=True, window=3, prefix_lengths=p), "prefix_lengths with a sliding window is not supported"),
        (dict(causal=True, prefix_lengths=p[:1]), "prefix_lengths must have shape (batch,) = (2,), got (1,)"),
        (dict(causal=True, prefix_lengths=p.float()), "prefix_lengths must be an integer tensor (batch,)"),
    ):
        with pytest.raises(ValueError) as e:
            flash_attention(q, k, v, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
