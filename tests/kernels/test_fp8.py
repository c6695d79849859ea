"""FP8 quantisation and GEMM (kernels/fp8.py).

CPU: the torch path against expectations computed here with plain torch ops, the GEMM reference against fp32 matmuls,
the kernels under the interpreter where its numerics hold (fp32 scales; the GEMM on given fp8 operands; its fp8
casts are wrong, so quantised data is a GPU check), and the GPU launch configs compiled for sm_90 (slow). GPU:
bit-exact parity of the quantisation kernel, the GEMM (Triton and torch._scaled_mm) close to the reference."""

import math

import pytest
import torch

import kernels
from kernels.fp8 import (
    FORMATS,
    GRANULARITIES,
    fp8_dequantize,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_quantize,
    fp8_quantize_reference,
    matmul_launch_config,
    quant_launch_config,
)
from kernels.utils import rel_err
from tests.kernels.aot import compile_for_sm90

FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
SHAPES = [(37, 300), (5, 129), (128, 256), (1, 1)]


def expected(x, fmt, granularity, amax=None):
    """(data, scale_inv) written out independently with plain torch ops, group by group."""
    fmax = FMAX[fmt]
    x = x.float()
    m, k = x.shape
    if granularity == "tensor":
        groups = [(slice(None), slice(None))]
        scale = torch.ones(())
    elif granularity == "row":
        groups = [(slice(i, i + 1), slice(None)) for i in range(m)]
        scale = torch.ones(m, 1)
    elif granularity == "tile":
        groups = [(slice(i, i + 1), slice(j, j + 128)) for i in range(m) for j in range(0, k, 128)]
        scale = torch.ones(m, math.ceil(k / 128))
    else:
        groups = [(slice(i, i + 128), slice(j, j + 128)) for i in range(0, m, 128) for j in range(0, k, 128)]
        scale = torch.ones(math.ceil(m / 128), math.ceil(k / 128))
    data = torch.empty(m, k, dtype=FORMATS[fmt])
    flat = scale.view(-1)
    for g, (rs, cs) in enumerate(groups):
        block = x[rs, cs]
        a = torch.tensor(float(amax)) if amax is not None else block.abs().max()
        s = a / fmax
        s = torch.tensor(1.0) if s == 0 else s
        flat[g] = s
        data[rs, cs] = (block / s).clamp(-fmax, fmax).to(FORMATS[fmt])
    return data, scale


def same(t, u):
    """Bitwise equality (fp8 compared through their bytes, so NaN patterns count too)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t, u = t.view(torch.uint8), u.view(torch.uint8)
    return t.shape == u.shape and t.dtype == u.dtype and torch.equal(t, u)


def sqnr_db(out, ref):
    out, ref = out.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (out - ref).pow(2).sum().item())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_plain_torch(shape, granularity, fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])  # columns over six decades
    x[0, 0] = -x.abs().max() * 1.5  # the largest magnitude negative: -amax maps to -max
    data, scale_inv = fp8_quantize(x, fmt, granularity, backend="torch")
    want_data, want_scale = expected(x, fmt, granularity)
    assert same(scale_inv, want_scale) and same(data, want_data)
    assert data.float().abs().max() == FMAX[fmt]  # some group reaches the format's max
    # dequantised: within half a step of x (2^-4 relative for e4m3, 2^-3 for e5m2; half the smallest subnormal, in
    # units of the group's scale, below the normal range)
    rel, sub = (2.0**-4, 2.0**-10) if fmt == "e4m3" else (2.0**-3, 2.0**-17)
    scale = expand(scale_inv, granularity, shape)
    deq = fp8_dequantize(data, scale_inv)
    assert same(deq, data.float() * scale)
    assert ((deq - x).abs() <= rel * x.abs() + sub * scale).all()


def expand(scale, granularity, shape):
    if granularity == "tile":
        return scale.repeat_interleave(128, -1)[..., : shape[-1]]
    if granularity == "block2d":
        return scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    return scale


def test_quantize_nd_input_rows_over_last_dim():
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(2))
    for granularity, scale_shape in (("tensor", ()), ("row", (2, 3, 1)), ("tile", (2, 3, 2))):
        data, scale_inv = fp8_quantize(x, "e4m3", granularity, backend="torch")
        want_data, want_scale = expected(x.reshape(6, 200), "e4m3", granularity)
        assert data.shape == x.shape and tuple(scale_inv.shape) == scale_shape
        assert same(data.reshape(6, 200), want_data) and same(scale_inv.reshape(want_scale.shape), want_scale)
        assert rel_err(fp8_dequantize(data, scale_inv), x) < 0.07


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_zeros_tiny_values_and_a_zero_row(fmt):
    z = torch.zeros(3, 130)
    for granularity in GRANULARITIES:
        data, scale_inv = fp8_quantize(z, fmt, granularity, backend="torch")
        assert (scale_inv == 1).all() and (data.float() == 0).all() and not torch.signbit(data.float()).any()
    # denormal range of fp32 (1e-40) and of the format: amax / max is a normal or subnormal fp32, data reaches max
    for tiny in (1e-30, 1e-40):
        x = torch.full((2, 5), tiny) * torch.linspace(-1, 1, 5)
        data, scale_inv = fp8_quantize(x, fmt, "row", backend="torch")
        want_data, want_scale = expected(x, fmt, "row")
        assert same(data, want_data) and same(scale_inv, want_scale) and (scale_inv > 0).all()
        assert (data.float().abs().amax(dim=1) == FMAX[fmt]).all()
    # amax / max underflowing to 0 (amax below ~6e-43): the scale is 1 and the data 0, not inf
    x = torch.full((1, 4), 1e-44)
    data, scale_inv = fp8_quantize(x, fmt, "tensor", backend="torch")
    assert scale_inv == 1 and (data.float() == 0).all()
    # a row of zeros among others: its scale is 1, the others' are untouched
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(3))
    x[2] = 0
    for granularity in ("row", "tile"):
        data, scale_inv = fp8_quantize(x, fmt, granularity, backend="torch")
        want_data, want_scale = expected(x, fmt, granularity)
        assert same(data, want_data) and same(scale_inv, want_scale)
        assert (scale_inv[2] == 1).all() and (scale_inv[[0, 1, 3]] != 1).all() and (data[2].float() == 0).all()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_delayed_scaling_amax_saturates(fmt):
    x = torch.linspace(-10, 10, 301).reshape(7, 43)
    for amax in (4.0, torch.tensor(4.0), torch.tensor([4.0])):
        data, scale_inv = fp8_quantize(x, fmt, "tensor", amax=amax, backend="torch")
        want_data, want_scale = expected(x, fmt, "tensor", amax=4.0)
        assert same(data, want_data) and same(scale_inv, want_scale)
        beyond = x.abs() >= 4.0
        assert (data.float()[beyond].abs() == FMAX[fmt]).all()  # saturated, never inf/NaN
        assert torch.equal(torch.sign(data.float()[beyond]), torch.sign(x[beyond]))
    data, scale_inv = fp8_quantize(x, fmt, "tensor", amax=0.0, backend="torch")  # scale 1: values above max saturate
    assert scale_inv == 1 and torch.equal(data.float(), x.clamp(-FMAX[fmt], FMAX[fmt]).to(FORMATS[fmt]).float())


def one_line_error(exc, message, fn, *args, **kwargs):
    with pytest.raises(exc) as e:
        fn(*args, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_non_finite_input_and_argument_errors():
    x = torch.randn(4, 130)
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[1, 129] = bad
        for granularity in GRANULARITIES:
            one_line_error(ValueError, "x holds inf or NaN", fp8_quantize, y, "e4m3", granularity, backend="torch")
        one_line_error(ValueError, "x holds inf or NaN", fp8_quantize, y, amax=1.0, backend="torch")
    q = fp8_quantize
    one_line_error(ValueError, "fmt must be one of e4m3, e5m2, got 'e3m4'", q, x, "e3m4", backend="torch")
    one_line_error(ValueError, "granularity must be one of tensor, row, tile, block2d", q, x, "e4m3", "col")
    one_line_error(ValueError, "'block2d' needs a 2-D x", q, x[None], "e4m3", "block2d", backend="torch")
    one_line_error(ValueError, "needs x with at least one dim", q, x[0, 0], "e4m3", "row", backend="torch")
    one_line_error(ValueError, "x must be a float16/bfloat16/float32/float64 tensor", q, x.long(), backend="torch")
    one_line_error(ValueError, "x must be a float16", q, x.to(torch.float8_e4m3fn), backend="torch")
    one_line_error(TypeError, "x must be a torch.Tensor", q, [1.0], backend="torch")
    one_line_error(ValueError, "amax= (delayed scaling) is for granularity 'tensor'", q, x, "e4m3", "row", amax=1.0)
    for amax in (-1.0, float("nan"), float("inf"), torch.tensor(float("inf"))):
        one_line_error(ValueError, "amax must be finite and >= 0", q, x, amax=amax, backend="torch")
    one_line_error(ValueError, "amax must be a float or a 1-element", q, x, amax=torch.ones(2), backend="torch")
    one_line_error(ValueError, "backend must be one of auto, triton, torch", q, x, backend="cuda")

    a, sa = fp8_quantize(torch.randn(8, 256), "e4m3", "row", backend="torch")
    b, sb = fp8_quantize(torch.randn(16, 256), "e4m3", "tile", backend="torch")
    mm = fp8_matmul
    one_line_error(ValueError, "a must be float8_e4m3fn or float8_e5m2, got torch.float32", mm, a.float(), sa, b, sb)
    one_line_error(ValueError, "b must be 2-D, got shape (1, 16, 256)", mm, a, sa, b[None], sb)
    one_line_error(ValueError, "must share k", mm, a, sa, b[:, :128], sb, backend="torch")
    one_line_error(ValueError, "b_scale_inv has shape (8, 1); for an operand of (16, 256) it must be", mm, a, sa, b, sa)
    one_line_error(ValueError, "a_scale_inv has shape (8, 3)", mm, a, torch.ones(8, 3), b, sb, backend="torch")
    one_line_error(ValueError, "a_scale_inv must be a float32 tensor", mm, a, sa.to(torch.float8_e4m3fn), b, sb)
    one_line_error(ValueError, "out_dtype must be bfloat16, float16 or float32", mm, a, sa, b, sb, out_dtype=torch.int8)
    assert kernels.fp8_quantize is fp8_quantize and kernels.fp8_matmul_reference is fp8_matmul_reference
    assert kernels.fp8_quantize_reference is fp8_quantize_reference and kernels.fp8_matmul is fp8_matmul


def operands(m, n, k, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(m, k, generator=g, device=device)
    b = torch.randn(n, k, generator=g, device=device) / math.sqrt(k)
    a[:, :5] *= 20  # a few outlier channels, as in activations
    return a.to(dtype), b.to(dtype)


PAIRS = [("tensor", "tensor"), ("row", "row"), ("tile", "block2d"), ("row", "block2d"), ("block2d", "tensor")]


@pytest.mark.parametrize("fmt_a, fmt_b", [("e4m3", "e4m3"), ("e5m2", "e4m3")])
@pytest.mark.parametrize("ga, gb", PAIRS)
def test_matmul_reference_and_sqnr(ga, gb, fmt_a, fmt_b):
    a, b = operands(70, 45, 300, seed=4)
    qa, sa = fp8_quantize(a, fmt_a, ga, backend="torch")
    qb, sb = fp8_quantize(b, fmt_b, gb, backend="torch")
    out = fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32, backend="torch")
    # the reference is the fp32 matmul of the dequantised operands, written out here
    deq_a = qa.float() * expand(sa, ga, a.shape)
    deq_b = qb.float() * expand(sb, gb, b.shape)
    assert same(out, deq_a @ deq_b.T)
    assert same(fp8_matmul(qa, sa, qb, sb, backend="torch"), (deq_a @ deq_b.T).to(torch.bfloat16))
    floor = 20.0 if "e5m2" in (fmt_a, fmt_b) else 25.0
    assert sqnr_db(out, a @ b.T) >= floor, sqnr_db(out, a @ b.T)


def test_finer_scales_confine_outliers():
    """One huge outlier row: row/tile scales keep the other rows' SQNR, a tensor scale flushes them."""
    a, b = operands(64, 32, 256, seed=5)
    a[7] *= 1e5
    ref = a @ b.T
    keep = torch.arange(64) != 7
    db = {}
    for g in ("tensor", "row", "tile"):
        qa, sa = fp8_quantize(a, "e4m3", g, backend="torch")
        qb, sb = fp8_quantize(b, "e4m3", "tensor", backend="torch")
        db[g] = sqnr_db(fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32, backend="torch")[keep], ref[keep])
    assert db["row"] >= 25 and db["tile"] >= 25 and db["tensor"] < 15, db


# ---------------------------------------------------------------------------------------------------------------------
# The kernels under the Triton interpreter: fp32 scales bit-exact, the GEMM on given fp8 operands


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_kernel_scales_match_reference_in_interpreter(granularity):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU tests cover this")
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(6)) * torch.logspace(-2, 2, 300)
    x[5] = 0
    for fmt in ("e4m3", "e5m2"):
        data, scale_inv = fp8_quantize(x, fmt, granularity, backend="triton")
        want_data, want_scale = fp8_quantize_reference(x, fmt, granularity)
        assert same(scale_inv, want_scale) and data.dtype == want_data.dtype and data.shape == x.shape
    data, scale_inv = fp8_quantize(x, "e4m3", "tensor", amax=torch.tensor(3.0), backend="triton")
    assert same(scale_inv, torch.tensor(3.0 / 448))


@pytest.mark.parametrize("ga, gb", PAIRS)
def test_kernel_matmul_matches_reference_in_interpreter(ga, gb):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU tests cover this")
    a, b = operands(37, 130, 300, seed=7)
    qa, sa = fp8_quantize_reference(a, "e4m3", ga)
    qb, sb = fp8_quantize_reference(b, "e4m3", gb)
    out = fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32, backend="triton")
    assert rel_err(out, fp8_matmul_reference(qa, sa, qb, sb, out_dtype=torch.float32)) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# GPU side: the launch configs compiled for sm_90 (no GPU needed), parity on a CUDA device


def aot_cases():
    """(name, kernel, arg types, constexprs, num_warps, num_stages): the quantisation kernel for bf16 input in each
    granularity and mode (e4m3 out, one e5m2), the GEMM for e4m3 x e4m3 with epilogue and per-k-block scales, and
    e5m2 x e4m3 (gradients)."""
    from kernels import fp8 as F

    cases = []
    q_types = dict(X="*bf16", Y="*fp8e4nv", S="*fp32")
    for name, granularity, mode, fmt in (
        ("row", "row", F._MODE_QUANT, "e4m3"),
        ("tile", "tile", F._MODE_QUANT, "e4m3"),
        ("tile e5m2", "tile", F._MODE_QUANT, "e5m2"),
        ("block2d", "block2d", F._MODE_QUANT, "e4m3"),
        ("tensor amax", "tensor", F._MODE_AMAX, "e4m3"),
        ("tensor cast", "tensor", F._MODE_CAST, "e4m3"),
    ):
        group_m, block_m, block_k, row_scale, warps = quant_launch_config(granularity, 8192, 4096)
        consts = dict(FMAX=FMAX[fmt], MODE=mode, ROW_SCALE=row_scale, GROUP_M=group_m, BLOCK_M=block_m, BLOCK_K=block_k)
        types = dict(q_types, Y="*fp8e4nv" if fmt == "e4m3" else "*fp8e5")
        cases.append((f"quant {name}", F._fp8_quant_kernel, types, consts, warps))
    for name, a_t, k_scaled, a_div, b_div in (
        ("tensor/row epilogue", "*fp8e4nv", False, 1, 1),
        ("tile x block2d", "*fp8e4nv", True, 1, 128),
        ("e5m2 x e4m3 row", "*fp8e5", False, 1, 1),
    ):
        bm, bn, bk, group_m, warps, stages = matmul_launch_config(k_scaled)
        consts = dict(A_ROW_DIV=a_div, B_ROW_DIV=b_div, K_SCALED=k_scaled, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        consts.update(GROUP_M=group_m)
        types = dict(A=a_t, B="*fp8e4nv", C="*bf16", SA="*fp32", SB="*fp32")
        cases.append((f"matmul {name}", F._fp8_matmul_kernel, types, consts, warps, stages))
    return cases


SMEM_LIMIT = 227 * 1024  # bytes of shared memory one program may use on sm_90


@pytest.mark.slow
def test_gpu_configs_compile_for_sm90(tmp_path):
    rows = compile_for_sm90("tests.kernels.test_fp8:aot_cases", len(aot_cases()), tmp_path)
    assert not [r for r in rows if r["shared"] > SMEM_LIMIT], rows
    # No spills in the quantisation kernels. The GEMM's figures here are not the real ones: this compile knows nothing
    # of the strides' divisibility by 16, which the launcher specialises on at run time (unaligned rows: no wgmma
    # pipelining, 255 registers and spills); aligned, it takes 170 / 230 registers and does not spill (kernels/fp8.py,
    # matmul_launch_config). Reported, not asserted.
    spills = [r for r in rows if r.get("stack", 0) or r.get("local", 0)]
    assert not [r for r in spills if r["name"].startswith("quant")], spills
    print("registers / stack bytes:", {r["name"]: (r.get("regs"), r.get("stack")) for r in rows})


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_kernel_bit_exact_on_gpu(granularity, dtype):
    for shape in [(4096, 4096), (1000, 1537), (5, 129), (3, 7, 520)]:
        if granularity == "block2d" and len(shape) != 2:
            continue
        x = torch.randn(shape, device="cuda", dtype=dtype) * torch.logspace(-3, 3, shape[-1], device="cuda").to(dtype)
        x.view(-1, shape[-1])[1] = 0
        for fmt in ("e4m3", "e5m2"):
            got = fp8_quantize(x, fmt, granularity, backend="triton")
            want = fp8_quantize_reference(x, fmt, granularity)
            assert same(got[1], want[1]) and same(got[0], want[0]), (shape, fmt)
    x = torch.randn(300, 700, device="cuda", dtype=dtype)
    got = fp8_quantize(x, "e4m3", "tensor", amax=torch.tensor(1.5, device="cuda"), backend="triton")
    want = fp8_quantize_reference(x, "e4m3", "tensor", amax=1.5)
    assert same(got[1], want[1]) and same(got[0], want[0])
    # non-finite input: no error on the kernel path, an inf scale for the group that holds it
    x[17, 300] = float("nan")
    _, scale_inv = fp8_quantize(x, "e4m3", "row", backend="triton")
    assert torch.isinf(scale_inv[17]).all() and torch.isfinite(scale_inv[torch.arange(300, device="cuda") != 17]).all()


@gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("ga, gb", PAIRS + [("tile", "tile")])
def test_matmul_close_to_reference_on_gpu(ga, gb, backend):
    for m, n, k, fmt_a in [(4096, 4096, 4096, "e4m3"), (1000, 1536, 1537, "e4m3"), (777, 512, 256, "e5m2")]:
        a, b = operands(m, n, k, seed=8, dtype=torch.bfloat16, device="cuda")
        qa, sa = fp8_quantize(a, fmt_a, ga)
        qb, sb = fp8_quantize(b, "e4m3", gb)
        ref = fp8_dequantize(qa, sa).double() @ fp8_dequantize(qb, sb).double().T  # exact products, no TF32
        out = fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32, backend=backend)
        # The tensor cores' fp8 partial sums carry ~14 bits before each fp32 promotion (every 128 products).
        err = rel_err(out, ref)
        print(f"{ga} x {gb} {backend} ({m}, {n}, {k}) {fmt_a}: fp32-out rel_err {err:.2e}")
        assert err <= 1e-3, (m, n, k, err)
        out = fp8_matmul(qa, sa, qb, sb, backend=backend)  # bf16 out: within bf16 rounding of that
        assert rel_err(out, ref) <= 2**-8 + 1e-3, (m, n, k, rel_err(out, ref))
