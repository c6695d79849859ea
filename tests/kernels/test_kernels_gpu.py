"""K1's kernels (norms, RoPE, SwiGLU/GeGLU) compiled on a CUDA device: bf16 by the 2x-error rule of DESIGN.md
contract 2 on large shapes, fp32 parity, bitwise-deterministic weight gradients, the largest fused row.
Skipped without CUDA (the interpreter tests in test_norms/test_rope/test_swiglu cover the logic there)."""

import pytest
import torch

from kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_qk_, apply_rope_reference, rope_cos_sin
from kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from kernels.utils import rel_err, two_x_rule

pytestmark = pytest.mark.gpu

DEV = "cuda"


def grads_of(fn, inputs, upstream, dtype=None, **kw):
    """fn's outputs and the gradients of its tensor inputs, on fresh leaves (cast to dtype if given)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    outs = fn(*leaves, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return list(outs) + [t.grad for t in leaves if t is not None]


def check_2x(out, ref, low):
    assert len(out) == len(ref) == len(low)
    for i, (o, r, lo) in enumerate(zip(out, ref, low)):
        err, allowed = two_x_rule(o, r, lo)
        assert err <= allowed, (i, err, allowed)


def _rms(x, w, b, r, **kw):
    return rms_norm(x, w, residual=r, **kw)


def _rms_ref(x, w, b, r, **kw):
    return rms_norm_reference(x, w, residual=r, **kw)


def _ln(x, w, b, r, **kw):
    return layer_norm(x, w, b, residual=r, **kw)


def _ln_ref(x, w, b, r, **kw):
    return layer_norm_reference(x, w, b, residual=r, **kw)


NORMS = {"rms": (_rms, _rms_ref), "ln": (_ln, _ln_ref)}


def norm_inputs(kind, rows, n, dtype, residual, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(rows, n, generator=g, device=DEV) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g, device=DEV)).to(dtype)
    b = (0.5 * torch.randn(n, generator=g, device=DEV)).to(dtype) if kind == "ln" else None
    r = torch.randn(rows, n, generator=g, device=DEV).to(dtype) if residual else None
    ups = [torch.randn(rows, n, generator=g, device=DEV) for _ in range(2 if residual else 1)]
    return [x, w, b, r], ups


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows, n", [(4096, 4096), (2000, 5120), (1023, 12288), (8, 65536)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_bf16_two_x_rule(kind, rows, n, residual):
    fn, ref_fn = NORMS[kind]
    inputs, ups = norm_inputs(kind, rows, n, torch.bfloat16, residual)
    out = grads_of(fn, inputs, ups)
    ref = grads_of(ref_fn, inputs, ups, dtype=torch.float32)
    low = grads_of(ref_fn, inputs, ups, upcast=False)
    assert out[0].dtype == torch.bfloat16
    if residual:  # the returned sum is x + residual rounded once, exactly as torch's bf16 add
        assert torch.equal(out[1], inputs[0] + inputs[3])
    check_2x(out, ref, low)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_fp32_parity(kind, residual):
    fn, ref_fn = NORMS[kind]
    inputs, ups = norm_inputs(kind, 3000, 3000, torch.float32, residual, seed=1)
    out = grads_of(fn, inputs, ups)
    ref = grads_of(ref_fn, inputs, ups, dtype=torch.float64)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert rel_err(o, r) <= 1e-5, i


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_weight_gradients_are_bitwise_deterministic(kind):
    fn, _ = NORMS[kind]
    inputs, ups = norm_inputs(kind, 8192, 4096, torch.bfloat16, residual=True, seed=2)
    first = grads_of(fn, inputs, ups)
    for _ in range(3):
        again = grads_of(fn, inputs, ups)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_norm_zero_centered_bf16():
    inputs, ups = norm_inputs("rms", 2048, 4096, torch.bfloat16, residual=False, seed=3)
    inputs[1] = inputs[1] - 1
    check_2x(
        grads_of(_rms, inputs, ups, zero_centered=True),
        grads_of(_rms_ref, inputs, ups, dtype=torch.float32, zero_centered=True),
        grads_of(_rms_ref, inputs, ups, upcast=False, zero_centered=True),
    )


@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("shape", [(2, 2048, 32, 128), (3, 1000, 12, 80)])
def test_rope_bf16_two_x_rule(shape, use_ids):
    bsz, seq, _, dim = shape
    g = torch.Generator(device=DEV).manual_seed(4)
    x = torch.randn(shape, generator=g, device=DEV).bfloat16()
    gy = torch.randn(shape, generator=g, device=DEV)
    cos, sin = rope_cos_sin(2 * seq, dim, device=DEV)
    kw = {"position_ids": torch.randint(0, 2 * seq, (bsz, seq), generator=g, device=DEV)} if use_ids else {}
    out = grads_of(lambda t: apply_rope(t, cos, sin, **kw), [x], [gy])
    ref = grads_of(lambda t: apply_rope_reference(t, cos, sin, **kw), [x], [gy], dtype=torch.float32)
    low = grads_of(lambda t: apply_rope_reference(t, cos.bfloat16(), sin.bfloat16(), upcast=False, **kw), [x], [gy])
    check_2x(out, ref, low)


def test_rope_inplace_qkv_views_bf16():
    bsz, seq, hq, hk, dim = 2, 1024, 16, 4, 128
    g = torch.Generator(device=DEV).manual_seed(5)
    qkv = torch.randn(bsz, seq, hq + 2 * hk, dim, generator=g, device=DEV).bfloat16()
    cos, sin = rope_cos_sin(seq, dim, device=DEV)
    q0, k0 = qkv[:, :, :hq].clone(), qkv[:, :, hq : hq + hk].clone()
    v0 = qkv[:, :, hq + hk :].clone()
    apply_rope_qk_(qkv[:, :, :hq], qkv[:, :, hq : hq + hk], cos, sin, offset=0)
    assert torch.equal(qkv[:, :, :hq], apply_rope(q0, cos, sin))
    assert torch.equal(qkv[:, :, hq : hq + hk], apply_rope(k0, cos, sin))
    assert torch.equal(qkv[:, :, hq + hk :], v0)  # v untouched


@pytest.mark.parametrize("shape", [(8192, 11008), (4097, 1000)])
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_glu_bf16_two_x_rule(act, shape):
    fn, ref_fn = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}[act]
    g = torch.Generator(device=DEV).manual_seed(6)
    fused = (torch.randn(shape[0], 2 * shape[1], generator=g, device=DEV) * 3).bfloat16()
    gate, up = fused.chunk(2, dim=-1)  # row-strided views, as from one fused projection
    gy = torch.randn(shape, generator=g, device=DEV)
    out = grads_of(fn, [gate, up], [gy])
    ref = grads_of(ref_fn, [gate, up], [gy], dtype=torch.float32)
    low = grads_of(ref_fn, [gate, up], [gy], upcast=False)
    check_2x(out, ref, low)


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_glu_fp32_parity(act):
    fn, ref_fn = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}[act]
    g = torch.Generator(device=DEV).manual_seed(7)
    gate, up, gy = (torch.randn(3000, 3001, generator=g, device=DEV) * s for s in (3, 1, 1))
    out = grads_of(fn, [gate, up], [gy])
    ref = grads_of(ref_fn, [gate, up], [gy], dtype=torch.float64)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert rel_err(o, r) <= 1e-5, i
