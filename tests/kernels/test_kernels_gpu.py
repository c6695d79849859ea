"""The norm, RoPE and SwiGLU/GeGLU kernels on the GPU side: compiled ahead of time for sm_90 (H100) with their real
launch sizes, checking for compile errors and register spills (runs without a GPU: the interpreter cannot see either);
and, on a CUDA device, bf16 by the 2x-error rule (docs/contracts.md, "Kernel parity") on large shapes, fp32 parity,
bitwise-deterministic weight gradients, the largest fused row (those skip without CUDA)."""

import pytest
import torch

from kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference
from kernels.rope import apply_rope, apply_rope_qk_, apply_rope_reference, rope_cos_sin
from kernels.utils import rel_err, two_x_rule
from tests.kernels.aot import compile_for_sm90
from tests.kernels.test_norms import KERNEL, REFERENCE

gpu = pytest.mark.gpu
DEV = "cuda"


def _aot_cases():
    """(name, kernel, arg types, constexprs, num_warps) for typical launches: hidden 4096, head_dim 128, ffn rows."""
    import triton.language as tl

    from kernels import glu, norms, rope
    from kernels.utils import elementwise_warps, num_warps_for, row_tile

    bf = "*bf16"
    cases = []
    for is_rms in (True, False):
        for n in (4096, 200):
            bm, bn = row_tile(n)
            fwd = dict(X=bf, R=bf, H=bf, Y=bf, W=bf, B=bf, MEAN="*fp32", RSTD="*fp32", eps="fp32")
            ce = dict(IS_RMS=is_rms, HAS_B=not is_rms, HAS_W=True, ZERO_CENTERED=False, ACC=tl.float32)
            cases.append(
                (
                    f"norm_fwd rms={is_rms} n={n}",
                    norms._norm_fwd_kernel,
                    fwd,
                    dict(ce, HAS_RES=True, BLOCK_M=bm, BLOCK_N=bn),
                    num_warps_for(bm * bn),
                )
            )
            bwd = dict(DY=bf, H=bf, W=bf, MEAN="*fp32", RSTD="*fp32", DH=bf, DX=bf, DW="*fp32", DB="*fp32")
            cases.append(
                (
                    f"norm_bwd rms={is_rms} n={n}",
                    norms._norm_bwd_kernel,
                    bwd,
                    dict(ce, HAS_DH=True, BLOCK_M=bm, BLOCK_N=bn),
                    min(32, 2 * num_warps_for(bm * bn)),
                )
            )
    rt = dict(X=bf, Y=bf, COS="*fp32", SIN="*fp32", POS="*i64")
    for backward in (False, True):
        cases.append(
            (
                f"rope backward={backward}",
                rope._rope_kernel,
                rt,
                dict(HAS_POS=True, BACKWARD=backward, ACC=tl.float32, BLOCK_M=16, BLOCK_N=64),
                elementwise_warps(1024, 4),
            )
        )
    for act in (0, 1):
        ce = dict(ACT=act, ACC=tl.float32, BLOCK_M=4, BLOCK_N=1024)
        cases.append((f"glu_fwd act={act}", glu._glu_fwd_kernel, dict(G=bf, U=bf, OUT=bf), ce, elementwise_warps(4096)))
        bt = dict(DO=bf, G=bf, U=bf, DG=bf, DU=bf)
        cases.append((f"glu_bwd act={act}", glu._glu_bwd_kernel, bt, ce, elementwise_warps(4096)))
    return cases


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    rows = compile_for_sm90("tests.kernels.test_kernels_gpu:_aot_cases", len(_aot_cases()), tmp_path, timeout=300)
    spills = [r for r in rows if r.get("stack", 0) or r.get("local", 0)]
    assert not spills, spills


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


# (kernel, reference) with the uniform signature (x, weight, bias, residual, **kw) of the CPU norm tests.
NORMS = {kind: (KERNEL[kind], REFERENCE[kind]) for kind in KERNEL}


def norm_inputs(kind, rows, n, dtype, residual, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(rows, n, generator=g, device=DEV) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g, device=DEV)).to(dtype)
    b = (0.5 * torch.randn(n, generator=g, device=DEV)).to(dtype) if kind == "ln" else None
    r = torch.randn(rows, n, generator=g, device=DEV).to(dtype) if residual else None
    ups = [torch.randn(rows, n, generator=g, device=DEV) for _ in range(2 if residual else 1)]
    return [x, w, b, r], ups


@gpu
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


@gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_fp32_parity(kind, residual):
    fn, ref_fn = NORMS[kind]
    inputs, ups = norm_inputs(kind, 3000, 3000, torch.float32, residual, seed=1)
    out = grads_of(fn, inputs, ups)
    ref = grads_of(ref_fn, inputs, ups, dtype=torch.float64)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert rel_err(o, r) <= 1e-5, i


@gpu
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_norm_weight_gradients_are_bitwise_deterministic(kind):
    fn, _ = NORMS[kind]
    inputs, ups = norm_inputs(kind, 8192, 4096, torch.bfloat16, residual=True, seed=2)
    first = grads_of(fn, inputs, ups)
    for _ in range(3):
        again = grads_of(fn, inputs, ups)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@gpu
def test_norm_zero_centered_bf16():
    inputs, ups = norm_inputs("rms", 2048, 4096, torch.bfloat16, residual=False, seed=3)
    inputs[1] = inputs[1] - 1
    check_2x(
        grads_of(KERNEL["rms"], inputs, ups, zero_centered=True),
        grads_of(REFERENCE["rms"], inputs, ups, dtype=torch.float32, zero_centered=True),
        grads_of(REFERENCE["rms"], inputs, ups, upcast=False, zero_centered=True),
    )


@gpu
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


@gpu
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


@gpu
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


@gpu
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_glu_fp32_parity(act):
    fn, ref_fn = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}[act]
    g = torch.Generator(device=DEV).manual_seed(7)
    gate, up, gy = (torch.randn(3000, 3001, generator=g, device=DEV) * s for s in (3, 1, 1))
    out = grads_of(fn, [gate, up], [gy])
    ref = grads_of(ref_fn, [gate, up], [gy], dtype=torch.float64)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert rel_err(o, r) <= 1e-5, i
