"""kernels/rope.py against its plain-PyTorch reference (docs/contracts.md, "Kernel parity") under the Triton
interpreter: fp32 to 1e-5 relative, fp16 by the 2x-error rule, fp64 gradcheck; positions for context-parallel shards and
packed sequences; the in-place q/k variant; strided views."""

import pytest
import torch

from kernels.rope import apply_rope, apply_rope_, apply_rope_qk_, apply_rope_reference, rope_cos_sin
from kernels.utils import rel_err, two_x_rule

# (batch, seq, heads, head_dim): head_dim 2 (half 1), 126 (half 63: one less than a block), several programs.
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 16), (1, 3, 2, 126), (2, 9, 4, 64)]


def make(shape, dtype=torch.float32, max_pos=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    cos, sin = rope_cos_sin(max_pos or shape[1], shape[-1], base=100.0)  # small base: large angles everywhere
    return x, cos, sin, torch.randn(shape, generator=g).to(dtype)


def fwd_bwd(fn, x, cos, sin, gy, dtype=None, **kw):
    leaf = x.detach().to(dtype or x.dtype).requires_grad_()
    y = fn(leaf, cos.to(dtype or cos.dtype), sin.to(dtype or sin.dtype), **kw)
    (gx,) = torch.autograd.grad(y, leaf, gy.to(y.dtype))
    return y, gx


def positions(kind, bsz, seq, max_pos, g):
    if kind == "none":
        return {}
    if kind == "offset":
        return {"offset": max_pos - seq}
    if kind == "ids_1d":
        return {"position_ids": torch.randint(0, max_pos, (seq,), generator=g)}
    return {"position_ids": torch.randint(0, max_pos - 2, (bsz, seq), generator=g), "offset": 2}


@pytest.mark.parametrize("pos_kind", ["none", "offset", "ids_1d", "ids_2d"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(shape, pos_kind):
    max_pos = shape[1] + 7
    x, cos, sin, gy = make(shape, max_pos=max_pos, seed=shape[1])
    kw = positions(pos_kind, shape[0], shape[1], max_pos, torch.Generator().manual_seed(1))
    y, gx = fwd_bwd(apply_rope, x, cos, sin, gy, **kw)
    ref, ref_gx = fwd_bwd(apply_rope_reference, x, cos, sin, gy, dtype=torch.float64, **kw)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, ref) <= 1e-5 and rel_err(gx, ref_gx) <= 1e-5


def test_matches_the_design_convention_literally():
    """cat(x1*cos - x2*sin, x2*cos + x1*sin) with x1, x2 the halves: check one vector by hand."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos = torch.tensor([[0.5, -1.0]])
    sin = torch.tensor([[0.25, 2.0]])
    expected = torch.tensor([1 * 0.5 - 3 * 0.25, 2 * -1.0 - 4 * 2.0, 3 * 0.5 + 1 * 0.25, 4 * -1.0 + 2 * 2.0])
    assert torch.equal(apply_rope(x, cos, sin).flatten(), expected)


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 7, 2, 126)])
def test_fp16_two_x_rule(shape):
    x, cos, sin, gy = make(shape, torch.float16, max_pos=shape[1], seed=3)
    y, gx = fwd_bwd(apply_rope, x, cos, sin, gy)
    ref, ref_gx = fwd_bwd(apply_rope_reference, x, cos, sin, gy, dtype=torch.float32)
    low, low_gx = fwd_bwd(apply_rope_reference, x, cos.half(), sin.half(), gy, upcast=False)
    assert y.dtype == gx.dtype == torch.float16
    for out, r, lo in ((y, ref, low), (gx, ref_gx, low_gx)):
        err, allowed = two_x_rule(out, r, lo)
        assert err <= allowed, (err, allowed)


def test_gradcheck_fp64():
    """The backward (rotation by -theta) is the exact adjoint: gradcheck on the kernel, with position ids."""
    x = torch.randn(2, 2, 1, 4, dtype=torch.float64)
    cos, sin = rope_cos_sin(6, 4, dtype=torch.float64)
    pid = torch.tensor([[4, 0], [1, 3]])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin, pid), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope_(t.clone(), cos, sin, pid, offset=1), (x,), fast_mode=True)


def test_context_parallel_shards_match_the_full_sequence():
    """Contiguous shards with offsets, and zigzag shards (chunks r and 2W-1-r) with position ids, reassemble to the
    rotation of the whole sequence."""
    x, cos, sin, _ = make((2, 16, 3, 8), seed=5)
    full = apply_rope(x, cos, sin)
    shards = [apply_rope(x[:, i * 4 : (i + 1) * 4], cos, sin, offset=i * 4) for i in range(4)]
    assert torch.equal(torch.cat(shards, dim=1), full)
    world = 2
    chunks = torch.arange(16).chunk(2 * world)
    for rank in range(world):
        pos = torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])
        assert torch.equal(apply_rope(x[:, pos], cos, sin, position_ids=pos), full[:, pos])


def test_packed_sequences_restart_positions():
    """Documents packed in one row: position ids restarting at each document equal rotating each one alone."""
    x, cos, sin, _ = make((1, 10, 2, 8), seed=6)
    lengths = [4, 1, 5]
    pid = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = apply_rope(x, cos, sin, position_ids=pid)
    alone = torch.cat([apply_rope(d, cos, sin) for d in x.split(lengths, dim=1)], dim=1)
    assert torch.equal(packed, alone)


def test_inplace_qk_matches_out_of_place_and_gradients():
    """GQA (4 query heads, 2 kv heads) as strided views of one fused qkv projection output, rotated in place."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, (4 + 2 + 2) * 16, generator=g, requires_grad=True)
    inp = torch.randn(2, 5, 8, generator=g)
    cos, sin = rope_cos_sin(9, 16)
    pid = torch.randint(0, 9, (2, 5), generator=g)
    gq, gk = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)

    qkv = (inp @ w).view(2, 5, 8, 16)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    q0, k0 = q.detach().clone(), k.detach().clone()
    version = q._version
    q2, k2 = apply_rope_qk_(q, k, cos, sin, position_ids=pid)
    assert q2 is q and k2 is k and q._version > version
    assert torch.equal(q, apply_rope(q0, cos, sin, pid)) and torch.equal(k, apply_rope(k0, cos, sin, pid))
    (gw,) = torch.autograd.grad((q, k), w, (gq, gk))

    qkv = (inp @ w).view(2, 5, 8, 16)
    ref = apply_rope_reference(qkv[:, :, :4], cos, sin, pid), apply_rope_reference(qkv[:, :, 4:6], cos, sin, pid)
    (ref_gw,) = torch.autograd.grad(ref, w, (gq, gk))
    assert rel_err(gw, ref_gw) <= 1e-5


def test_inplace_on_a_leaf_that_requires_grad_is_refused_by_autograd():
    x, cos, sin, _ = make((1, 2, 1, 4))
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rope_qk_(x.clone().requires_grad_(), x.clone(), cos, sin)
    q, k = x.clone(), x.clone()  # no grad needed: plain in-place rotation
    apply_rope_qk_(q, k, cos, sin)
    assert torch.equal(q, apply_rope(x, cos, sin))


def test_non_contiguous_inputs():
    """x as a transposed (b, h, s, d) tensor, with a strided head dim; strided cos/sin; strided upstream gradient."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, 24, generator=g).transpose(1, 2)[..., ::2]  # (2, 5, 3, 12), last-dim stride 2
    table = torch.randn(7, 12, generator=g)
    cos, sin = table[:, ::2], table[:, 1::2]  # (7, 6), column stride 2
    gy = torch.randn(12, 3, 5, 2, generator=g).permute(3, 2, 1, 0)
    pid = torch.randint(0, 7, (5, 2), generator=g).t()  # (2, 5), transposed
    assert not (x.is_contiguous() or cos.is_contiguous() or gy.is_contiguous() or pid.is_contiguous())
    y, gx = fwd_bwd(apply_rope, x, cos, sin, gy, position_ids=pid)
    ref, ref_gx = fwd_bwd(apply_rope_reference, x, cos, sin, gy, dtype=torch.float64, position_ids=pid)
    assert rel_err(y, ref) <= 1e-5 and rel_err(gx, ref_gx) <= 1e-5


def test_backward_is_the_inverse_rotation():
    x = torch.randn(1, 6, 2, 10, dtype=torch.float64)
    cos, sin = rope_cos_sin(6, 10, dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(apply_rope(y, cos, -sin), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, c, s: apply_rope(x[0], c, s), "must be (batch, seq, heads, head_dim)"),
        (lambda x, c, s: apply_rope(x[..., :3], c, s), "head_dim of x must be even"),
        (lambda x, c, s: apply_rope(x, c[:, :2], s), "cos must be (positions, head_dim // 2) = (*, 4)"),
        (lambda x, c, s: apply_rope(x, c, s[:3]), "cos has 6 positions but sin has 3"),
        (lambda x, c, s: apply_rope(x, c, s, offset=3), "positions 3..6 fall outside the 6 rows"),
        (lambda x, c, s: apply_rope(x, c, s, position_ids=torch.tensor([0, 1, 2, 6])), "span 0..6, outside"),
        (lambda x, c, s: apply_rope(x, c, s, position_ids=torch.zeros(4)), "position_ids must be an integer"),
        (lambda x, c, s: apply_rope(x, c, s, position_ids=torch.ones(4).bool()), "position_ids must be an integer"),
        (lambda x, c, s: apply_rope(x, c, s, position_ids=torch.zeros(3, 4).long()), "must be (seq,) or (batch"),
        (lambda x, c, s: apply_rope_qk_(x, x[:, :2], c, s), "k has shape (2, 2, 3, 8), incompatible with q's"),
    ],
)
def test_bad_input_is_one_line_error(call, message):
    x, cos, sin, _ = make((2, 4, 3, 8), max_pos=6)
    with pytest.raises(ValueError) as e:
        call(x, cos, sin)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rotary_embedding_module():
    """kernels.RotaryEmbedding equals apply_rope / the reference on tables from rope_cos_sin, forward and backward,
    on x (batch, seq, heads, head_dim) with an offset and with position ids; its tables are non-persistent buffers
    that grow (bit-identical rows) when offset + seq passes their end, and stay fp32 under a module-wide .half()."""
    from kernels import RotaryEmbedding

    shape, theta = (2, 5, 3, 6), 100.0
    rope = RotaryEmbedding(6, theta=theta, max_seq_len=6)
    assert not rope.state_dict() and {n for n, _ in rope.named_buffers()} == {"cos", "sin"}
    cos, sin = rope_cos_sin(16, 6, base=theta)
    assert torch.equal(rope.cos, cos[:6]) and torch.equal(rope.sin, sin[:6])
    x, _, _, gy = make(shape, seed=9)
    pid = torch.tensor([[5, 0, 2, 2, 1], [3, 4, 0, 1, 5]])
    for kw in ({}, {"offset": 3}, {"position_ids": pid}, {"position_ids": pid[0], "offset": 1}):
        y, gx = fwd_bwd(lambda t, c, s, **k: rope(t, **k), x, cos, sin, gy, **kw)
        fy, fgx = fwd_bwd(apply_rope, x, cos, sin, gy, **kw)
        ref, ref_gx = fwd_bwd(apply_rope_reference, x, cos, sin, gy, dtype=torch.float64, **kw)
        assert torch.equal(y, fy) and torch.equal(gx, fgx), kw
        assert rel_err(y, ref) <= 1e-5 and rel_err(gx, ref_gx) <= 1e-5, kw
    assert rope.max_seq_len == 12  # offset 3 + seq 5 > 6 rows: doubled
    assert torch.equal(rope.cos, cos[:12]) and torch.equal(rope.sin, sin[:12]) and not rope.state_dict()

    rope.half()
    y = rope(x.half(), offset=9)  # 14 rows needed: rebuilt in fp32 and grown
    assert rope.cos.dtype == torch.float32 and rope.max_seq_len == 24
    assert torch.equal(y, apply_rope(x.half(), *rope_cos_sin(24, 6, base=theta), offset=9))
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, heads, 6\), got \(2, 5, 3, 8\)"):
        rope(torch.randn(2, 5, 3, 8))
