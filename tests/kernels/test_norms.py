"""kernels/norms.py (RMSNorm, LayerNorm) against its plain-PyTorch reference (docs/contracts.md, "Kernel parity"), under
the Triton interpreter on CPU: fp32 to 1e-5 relative, fp16 by the 2x-error rule, fp64 gradcheck on the kernels."""

import pytest
import torch

from kernels.norms import LayerNorm, RMSNorm, layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from kernels.utils import rel_err, two_x_rule


def _rms(x, weight, bias, residual, **kw):
    return rms_norm(x, weight, residual=residual, **kw)


def _rms_ref(x, weight, bias, residual, **kw):
    return rms_norm_reference(x, weight, residual=residual, **kw)


def _ln(x, weight, bias, residual, **kw):
    return layer_norm(x, weight, bias, residual=residual, **kw)


def _ln_ref(x, weight, bias, residual, **kw):
    return layer_norm_reference(x, weight, bias, residual=residual, **kw)


KERNEL = {"rms": _rms, "ln": _ln}
REFERENCE = {"rms": _rms_ref, "ln": _ln_ref}
# Odd sizes: a single element, hidden 1 less than a block (63, 127), several row tiles (40 x 127, 17 x 200).
SHAPES = [(1, 1), (3, 7), (17, 63), (2, 20, 127), (17, 200)]


def make_inputs(kind, shape, dtype, residual=False, affine=True, seed=0):
    """Norm inputs (x, weight, bias, residual) and upstream gradients for out and for the residual sum."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype) if affine else None
    b = (0.5 * torch.randn(n, generator=g)).to(dtype) if affine and kind == "ln" else None
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    gy = torch.randn(shape, generator=g).to(dtype)
    gh = torch.randn(shape, generator=g).to(dtype) if residual else None
    return {"x": x, "weight": w, "bias": b, "residual": r}, gy, gh


def run(fn, tensors, gy, gh, dtype=None, **kw):
    """Forward and backward on fresh leaves (cast to `dtype` if given): (out, h or None, {name: grad})."""
    leaves = {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in tensors.items()}
    res = fn(**leaves, **kw)
    out, h = res if leaves["residual"] is not None else (res, None)
    outs, grads = [out], [gy.to(out.dtype)]
    if h is not None:
        outs.append(h)
        grads.append(gh.to(h.dtype))
    torch.autograd.backward(outs, grads)
    return out, h, {k: v.grad for k, v in leaves.items() if v is not None}


def fp32_ok(out, ref, term_scale=None):
    """Contract 2 in fp32: 1e-5 relative to the fp64 reference. Where the result is pure cancellation (RMSNorm's dx at
    hidden 1 is g * rstd * (1 - x^2 / (x^2 + eps)) ~ 1e-7 * g * rstd), relative to the size of the cancelling terms."""
    if term_scale is None:
        return rel_err(out, ref) <= 1e-5
    return (out.double() - ref).abs().max().item() <= 1e-5 * float(term_scale)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_fp32_matches_reference(kind, shape, residual):
    tensors, gy, gh = make_inputs(kind, shape, torch.float32, residual, seed=sum(shape))
    out, h, grads = run(KERNEL[kind], tensors, gy, gh)
    ref, ref_h, ref_grads = run(REFERENCE[kind], tensors, gy, gh, dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == tensors["x"].shape
    assert rel_err(out, ref) <= 1e-5
    if residual:
        assert torch.equal(h, tensors["x"] + tensors["residual"])
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].dtype == torch.float32
        scale = None
        if kind == "rms" and shape[-1] == 1 and name != "weight":
            h = tensors["x"] if not residual else tensors["x"] + tensors["residual"]
            scale = (gy * tensors["weight"] / h).abs().max()
        assert fp32_ok(grads[name], ref_grads[name], scale), name


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_zero_centered(kind, residual):
    """Weight stored as gamma - 1: equals the plain norm with gamma, gradients identical (d(1 + w)/dw = 1)."""
    tensors, gy, gh = make_inputs(kind, (9, 45), torch.float32, residual, seed=5)
    out, h, grads = run(KERNEL[kind], tensors, gy, gh)
    shifted = dict(tensors, weight=tensors["weight"] - 1)
    out_zc, h_zc, grads_zc = run(KERNEL[kind], shifted, gy, gh, zero_centered=True)
    ref, _, ref_grads = run(REFERENCE[kind], shifted, gy, gh, dtype=torch.float64, zero_centered=True)
    assert rel_err(out_zc, out) <= 1e-6 and rel_err(out_zc, ref) <= 1e-5
    for name in grads:
        assert rel_err(grads_zc[name], grads[name]) <= 1e-6, name
        assert rel_err(grads_zc[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 63), (17, 200)])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_fp16_two_x_rule(kind, shape, residual):
    tensors, gy, gh = make_inputs(kind, shape, torch.float16, residual, seed=7)
    out, h, grads = run(KERNEL[kind], tensors, gy, gh)
    ref, _, ref_grads = run(REFERENCE[kind], tensors, gy, gh, dtype=torch.float32)
    low, _, low_grads = run(REFERENCE[kind], tensors, gy, gh, upcast=False)
    assert out.dtype == torch.float16
    err, allowed = two_x_rule(out, ref, low)
    assert err <= allowed, ("out", err, allowed)
    if residual:
        assert h.dtype == torch.float16 and torch.equal(h, tensors["x"] + tensors["residual"])
    for name in grads:
        assert grads[name].dtype == torch.float16
        err, allowed = two_x_rule(grads[name], ref_grads[name], low_grads[name])
        assert err <= allowed, (name, err, allowed)


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_gradcheck_fp64(kind):
    """Exact backward: gradcheck on the kernels themselves (they compute in fp64 for fp64 inputs), residual included."""
    tensors, _, _ = make_inputs(kind, (2, 4), torch.float64, residual=True, seed=11)
    leaves = [t.requires_grad_() for t in tensors.values() if t is not None]
    fn = KERNEL[kind]
    if kind == "rms":
        assert torch.autograd.gradcheck(lambda x, w, r: fn(x, w, None, r, zero_centered=True), leaves, fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda x, w, b, r: fn(x, w, b, r), leaves, fast_mode=True)
    # ... and the references that the fp32/fp16 tests trust.
    ref = REFERENCE[kind]
    if kind == "rms":
        assert torch.autograd.gradcheck(lambda x, w, r: ref(x, w, None, r, zero_centered=True), leaves)
    else:
        assert torch.autograd.gradcheck(lambda x, w, b, r: ref(x, w, b, r), leaves)


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_without_affine_parameters(kind):
    tensors, gy, _ = make_inputs(kind, (4, 30), torch.float32, affine=False, seed=2)
    out, _, grads = run(KERNEL[kind], tensors, gy, None)
    ref, _, ref_grads = run(REFERENCE[kind], tensors, gy, None, dtype=torch.float64)
    assert set(grads) == {"x"}
    assert rel_err(out, ref) <= 1e-5 and rel_err(grads["x"], ref_grads["x"]) <= 1e-5
    if kind == "ln":  # weight without bias, bias without weight
        for t in (dict(tensors, weight=torch.rand(30) + 0.5), dict(tensors, bias=torch.randn(30))):
            out, _, grads = run(KERNEL[kind], t, gy, None)
            ref, _, ref_grads = run(REFERENCE[kind], t, gy, None, dtype=torch.float64)
            assert rel_err(out, ref) <= 1e-5 and set(grads) == set(ref_grads) and len(grads) == 2
            for name in grads:
                assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_residual_returns_sum_and_gradient_reaches_both(kind):
    tensors, gy, gh = make_inputs(kind, (6, 33), torch.float32, residual=True, seed=3)
    x, r = tensors["x"].requires_grad_(), tensors["residual"].requires_grad_()
    out, h = KERNEL[kind](x, tensors["weight"], tensors["bias"], r)
    assert torch.equal(h, x + r)
    # Only the sum used downstream: its gradient passes straight to both inputs.
    gx, gr = torch.autograd.grad(h, (x, r), gh, retain_graph=True)
    assert torch.equal(gx, gh) and torch.equal(gr, gh)
    # Only the normalised output used: both inputs get the norm's input gradient.
    gx, gr = torch.autograd.grad(out, (x, r), gy, retain_graph=True)
    ref_gx = torch.autograd.grad(REFERENCE[kind](x + r, tensors["weight"], tensors["bias"], None), x, gy)[0]
    assert torch.equal(gx, gr) and rel_err(gx, ref_gx) <= 1e-5
    # Both used: the contributions add.
    gx2, gr2 = torch.autograd.grad((out, h), (x, r), (gy, gh))
    assert rel_err(gx2, gx + gh) <= 1e-6 and torch.equal(gx2, gr2)


def test_residual_in_fp32_with_fp16_input():
    """A residual stream kept in fp32 (x in fp16): the sum is fp32, the output fp16, each grad in its input's dtype."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 40, generator=g).half().requires_grad_()
    r = torch.randn(5, 40, generator=g).requires_grad_()
    w = torch.randn(40, generator=g)
    out, h = rms_norm(x, w, residual=r)
    assert out.dtype == torch.float16 and h.dtype == torch.float32
    assert torch.equal(h, x.float() + r)
    ref = rms_norm_reference(x.double(), w.double(), residual=r.double())[0]
    assert (out.double() - ref).abs().max() <= 2 * torch.finfo(torch.float16).eps * ref.abs().max()
    (out.float().sum() + h.sum()).backward()
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    assert torch.equal(x.grad, r.grad.half())


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_non_contiguous_inputs(kind):
    """Strided last dim, transposed leading dims, and a strided upstream gradient all give the reference result."""
    g = torch.Generator().manual_seed(8)
    n = 37
    base = torch.randn(3, 2 * n, 5, generator=g)
    x = base[:, ::2, :].transpose(1, 2)  # (3, 5, 37), last-dim stride 10
    r = torch.randn(5, 3, n, generator=g).transpose(0, 1)  # (3, 5, 37), non-contiguous leading dims
    w_big = torch.randn(2 * n, generator=g)
    w = w_big[::2]  # strided weight
    b = torch.randn(n, generator=g) if kind == "ln" else None
    assert not x.is_contiguous() and not r.is_contiguous() and not w.is_contiguous()
    tensors = {"x": x, "weight": w, "bias": b, "residual": r}
    gy = torch.randn(n, 5, 3, generator=g).permute(2, 1, 0)  # strided upstream gradient
    gh = torch.randn(3, 5, n, generator=g)
    out, h, grads = run(KERNEL[kind], tensors, gy, gh)
    ref, ref_h, ref_grads = run(REFERENCE[kind], tensors, gy, gh, dtype=torch.float64)
    assert rel_err(out, ref) <= 1e-5 and torch.equal(h, x + r)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("programs", [1, 2, 3, 5])
def test_weight_gradient_reduction_over_programs(programs, monkeypatch):
    """The persistent backward strides row tiles over P programs, each writing one fp32 partial row that torch sums
    (no atomics): every row is counted once whatever P is, and a rerun is bitwise identical."""
    import kernels.norms

    monkeypatch.setattr(kernels.norms, "num_reduction_programs", lambda device, n_tiles, **kw: programs)
    tensors, gy, gh = make_inputs("ln", (150, 200), torch.float32, residual=True, seed=9)  # 5 row tiles of 32
    out, _, grads = run(_ln, tensors, gy, gh)
    _, _, ref_grads = run(_ln_ref, tensors, gy, gh, dtype=torch.float64)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    again = run(_ln, tensors, gy, gh)[2]
    assert all(torch.equal(grads[k], again[k]) for k in grads)


def test_empty_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    out = layer_norm(x, w, b)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16)) and torch.equal(b.grad, torch.zeros(16))


def test_modules_match_functional():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 24, generator=g)
    r = torch.randn(2, 3, 24, generator=g)
    rms, ln = RMSNorm(24, eps=1e-5), LayerNorm(24)
    assert torch.equal(rms.weight, torch.ones(24)) and torch.equal(ln.bias, torch.zeros(24))
    assert torch.equal(rms(x), rms_norm(x, rms.weight, 1e-5))
    out, h = ln(x, r)
    assert torch.equal(out, layer_norm(x + r, ln.weight, ln.bias)) and torch.equal(h, x + r)
    zc = RMSNorm(24, zero_centered=True)
    assert torch.equal(zc.weight, torch.zeros(24)) and rel_err(zc(x), rms_norm_reference(x, torch.ones(24))) <= 1e-6
    nb = LayerNorm(24, bias=False)
    assert nb.bias is None and rel_err(nb(x), layer_norm_reference(x, torch.ones(24), None)) <= 1e-6
    out.sum().backward()
    assert ln.weight.grad is not None and ln.bias.grad is not None
    assert "zero_centered=True" in repr(zc)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(7)), "weight has shape (7,), expected (8,)"),
        (lambda: layer_norm(torch.randn(2, 8), torch.ones(8), torch.ones(3)), "bias has shape (3,)"),
        (lambda: rms_norm(torch.randn(2, 8), None, residual=torch.randn(8)), "residual has shape (8,)"),
        (lambda: rms_norm(torch.ones(2, 8, dtype=torch.int64), None), "must be a floating-point tensor"),
        (lambda: rms_norm(torch.randn(1, 65537), None), "more than the 65536"),
        (lambda: rms_norm(torch.randn(3, 0), None), "has size 0"),
        (lambda: rms_norm(torch.tensor(1.0), None), "at least one dim"),
    ],
)
def test_bad_input_is_one_line_error(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("kernels.")


def test_cpu_tensor_without_interpreter_is_refused_when_triton_is_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        rms_norm(torch.randn(2, 8), torch.ones(8), backend="triton")
