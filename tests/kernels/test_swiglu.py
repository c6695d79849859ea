"""kernels/glu.py (SwiGLU, GeGLU with tanh-approximate GELU) against its plain-PyTorch reference (docs/contracts.md,
"Kernel parity") under the Triton interpreter: fp32 to 1e-5 relative, fp16 by the 2x-error rule, fp64 gradcheck, strided
views, and the backward recomputing the activation instead of saving it."""

import pytest
import torch
import torch.nn.functional as F

from kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference
from kernels.utils import rel_err, two_x_rule

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy sigmoid(-big)

KERNEL = {"swiglu": swiglu, "geglu": geglu}
REFERENCE = {"swiglu": swiglu_reference, "geglu": geglu_reference}
# A single element, hidden 1 less than a block, several row tiles, and columns over the 1024-wide column block.
SHAPES = [(1, 1), (3, 7), (17, 127), (2, 3, 200), (3, 1100)]


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)  # wide range: both tails of the activations
    up = torch.randn(shape, generator=g).to(dtype)
    return gate, up, torch.randn(shape, generator=g).to(dtype)


def fwd_bwd(fn, gate, up, gy, dtype=None, **kw):
    a = gate.detach().to(dtype or gate.dtype).requires_grad_()
    b = up.detach().to(dtype or up.dtype).requires_grad_()
    y = fn(a, b, **kw)
    ga, gb = torch.autograd.grad(y, (a, b), gy.to(y.dtype))
    return y, ga, gb


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_fp32_matches_reference(act, shape):
    gate, up, gy = make(shape, seed=shape[-1])
    out = fwd_bwd(KERNEL[act], gate, up, gy)
    ref = fwd_bwd(REFERENCE[act], gate, up, gy, dtype=torch.float64)
    assert out[0].dtype == torch.float32 and out[0].shape == gate.shape
    for name, o, r in zip(("out", "d_gate", "d_up"), out, ref):
        assert rel_err(o, r) <= 1e-5, name


@pytest.mark.parametrize("shape", [(5, 63), (17, 200)])
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_fp16_two_x_rule(act, shape):
    gate, up, gy = make(shape, torch.float16, seed=2)
    out = fwd_bwd(KERNEL[act], gate, up, gy)
    ref = fwd_bwd(REFERENCE[act], gate, up, gy, dtype=torch.float32)
    low = fwd_bwd(REFERENCE[act], gate, up, gy, upcast=False)
    for name, o, r, lo in zip(("out", "d_gate", "d_up"), out, ref, low):
        assert o.dtype == torch.float16, name
        err, allowed = two_x_rule(o, r, lo)
        assert err <= allowed, (name, err, allowed)


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_gradcheck_fp64(act):
    gate, up, _ = make((2, 5), torch.float64, seed=3)
    args = (gate.requires_grad_(), up.requires_grad_())
    assert torch.autograd.gradcheck(KERNEL[act], args, fast_mode=True)
    assert torch.autograd.gradcheck(REFERENCE[act], args)


def test_definitions():
    """SwiGLU is silu(gate) * up; GeGLU uses the tanh approximation of GELU (not the erf form)."""
    gate = torch.linspace(-6, 6, 97).view(1, 97)
    up = torch.full_like(gate, 1.5)
    assert rel_err(swiglu(gate, up), gate * torch.sigmoid(gate) * 1.5) <= 1e-6
    tanh_form = 0.5 * gate * (1 + torch.tanh(0.7978845608028654 * (gate + 0.044715 * gate**3)))
    out = geglu(gate, up)
    assert rel_err(out, tanh_form * 1.5) <= 1e-6
    assert (out - F.gelu(gate) * 1.5).abs().max() > 1e-4  # distinguishable from the exact (erf) GELU


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_chunks_of_a_fused_projection_and_strided_gradients(act):
    """gate and up as the two halves of one (rows, 2F) output (row-strided views, read in place); a transposed
    upstream gradient; inputs with a strided last dim (copied)."""
    g = torch.Generator().manual_seed(4)
    fused = (torch.randn(2, 7, 2 * 45, generator=g) * 3).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(-1) == 1
    gy = torch.randn(45, 7, 2, generator=g).permute(2, 1, 0)
    (grad,) = torch.autograd.grad(KERNEL[act](gate, up), fused, gy)
    leaf = fused.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(REFERENCE[act](*leaf.chunk(2, dim=-1)), leaf, gy.double())
    assert rel_err(grad, ref) <= 1e-5

    x = torch.randn(6, 80, generator=g)
    gate, up = x[:, ::2], x[:, 1::2]  # last-dim stride 2
    out = fwd_bwd(KERNEL[act], gate, up, gy=torch.ones(6, 40))
    ref = fwd_bwd(REFERENCE[act], gate, up, gy=torch.ones(6, 40), dtype=torch.float64)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-5


def test_mixed_dtypes():
    """fp16 gate with fp32 up: fp32 output (type promotion), each gradient in its input's dtype."""
    gate, up, gy = make((4, 33), seed=5)
    y, ga, gb = fwd_bwd(swiglu, gate.half(), up, gy)
    assert y.dtype == torch.float32 and ga.dtype == torch.float16 and gb.dtype == torch.float32
    ry, rga, rgb = fwd_bwd(swiglu_reference, gate.half(), up, gy, dtype=torch.float64)
    assert rel_err(y, ry) <= 1e-5 and rel_err(gb, rgb) <= 1e-5
    assert rel_err(ga, rga) <= torch.finfo(torch.float16).eps


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_backward_saves_only_the_inputs(act):
    """The activation is recomputed in backward: autograd keeps gate and up, and nothing else."""
    gate, up, _ = make((3, 10), seed=6)
    gate.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        KERNEL[act](gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_empty_input():
    gate = torch.randn(0, 8, requires_grad=True)
    y = swiglu(gate, torch.randn(0, 8))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert gate.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: swiglu(torch.randn(2, 8), torch.randn(2, 7)), "gate has shape (2, 8) but up has (2, 7)"),
        (lambda: geglu(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.int32)), "up must be a floating-point"),
    ],
)
def test_bad_input_is_one_line_error(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("kernels.")


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_module_matches_function_and_reference(act):
    """kernels.SwiGLU / kernels.GeGLU: no parameters; forward(gate, up) is the function, forward and backward; one
    fused (.., 2F) input is split into gate (first half) and up (second half)."""
    import kernels

    module = {"swiglu": kernels.SwiGLU, "geglu": kernels.GeGLU}[act]()
    assert list(module.parameters()) == [] and not module.state_dict()
    gate, up, gy = make((3, 5, 13), seed=7)
    out = fwd_bwd(module, gate, up, gy)
    fn = fwd_bwd(KERNEL[act], gate, up, gy)
    ref = fwd_bwd(REFERENCE[act], gate, up, gy, dtype=torch.float64)
    for name, o, f, r in zip(("out", "d_gate", "d_up"), out, fn, ref):
        assert torch.equal(o, f) and rel_err(o, r) <= 1e-5, name

    fused = torch.cat((gate, up), dim=-1).requires_grad_()
    y = module(fused)
    assert y.shape == (3, 5, 13) and torch.equal(y, out[0])
    (g,) = torch.autograd.grad(y, fused, gy)
    assert torch.equal(g, torch.cat(out[1:], dim=-1))


def test_module_single_input_must_have_an_even_last_dim():
    import kernels

    with pytest.raises(ValueError, match=r"kernels.SwiGLU: a single input .* \(even size\), got \(2, 7\)"):
        kernels.SwiGLU()(torch.randn(2, 7))
