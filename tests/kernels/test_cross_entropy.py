"""kernels/cross_entropy_loss.py against its plain-PyTorch reference by the kernel-parity rule (docs/contracts.md,
"Kernel parity"), under the Triton interpreter on CPU: fp32 to 1e-5 relative, fp16 by the 2x-error rule, fp64
gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy_loss import (
    CrossEntropyFunction,
    CrossEntropyLoss,
    cross_entropy,
    cross_entropy_reference,
    fp16_prescale,
    launch_config,
)
from kernels.utils import two_x_rule

IGN = -100


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0); NaN anywhere counts as a failure."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def make_inputs(rows, V, dtype, n_ignored=1, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, V, generator=g) * scale).to(dtype)
    t = torch.randint(0, V, (rows,), generator=g)
    t[torch.randperm(rows, generator=g)[: min(n_ignored, rows - 1)]] = IGN
    return x, t


def ours_and_ref(x, t, grad_scale=1.0, **kw):
    """Loss and logits gradient from the kernel and from the fp64 reference on the same (rounded) inputs."""
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t, **kw)
    (loss * grad_scale).sum().backward()
    xr = x.detach().double().requires_grad_()
    ref = cross_entropy_reference(xr, t, **kw)
    (ref * grad_scale).sum().backward()
    return loss, xo.grad, ref, xr.grad


# 4095: one less than the block it gets, 4096 (next power of two, and the interpreter's cap MAX_BLOCK_INTERPRETER;
# on GPU too, below MAX_BLOCK_GPU): one full-size block with only its last lane masked. 4099: past the cap, two blocks.
@pytest.mark.parametrize("V", [37, 1000, 4095, 4099])
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_matches_reference(V, rows):
    x, t = make_inputs(rows, V, torch.float32, seed=V + rows)
    if V == 4095:
        assert launch_config(V)[0] == V + 1  # the case above stays block - 1 only while the block choice does
        # A read of the one lane past a row's end lands on the next row's first logit: make those large, so that such
        # a read moves the loss far past the tolerance (an ordinary logit moves it by ~1/V, within it).
        x[1:, 0] += 12
    loss, grad, ref, ref_grad = ours_and_ref(x, t, grad_scale=2.5)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_label_smoothing_and_z_loss(label_smoothing, z_loss):
    x, t = make_inputs(6, 1000, torch.float32, n_ignored=2, seed=3)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    loss, grad, ref, ref_grad = ours_and_ref(x, t, grad_scale=0.7, **kw)
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    # The reference itself: torch's label smoothing, plus the PaLM z-loss term averaged over non-ignored rows.
    xd = x.double()
    valid = t != IGN
    z_term = z_loss * (torch.logsumexp(xd[valid], -1) ** 2).mean()
    expected = F.cross_entropy(xd, t, ignore_index=IGN, label_smoothing=label_smoothing) + z_term
    assert rel_err(ref, expected) <= 1e-12


@pytest.mark.parametrize("V", [1000, 4099])
def test_fp16_two_x_rule(V):
    x, t = make_inputs(5, V, torch.float16, seed=11)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t, **kw)
    loss.backward()
    x16 = x.clone().requires_grad_()  # same-dtype torch reference
    ref16 = cross_entropy_reference(x16, t, **kw)
    ref16.backward()
    x32 = x.float().requires_grad_()  # fp32 reference on the same fp16 inputs
    ref32 = cross_entropy_reference(x32, t, **kw)
    ref32.backward()
    floor = 2.0**-11  # one fp16 ulp relative: the rounding of the stored gradient
    assert rel_err(loss, ref32) <= 2 * rel_err(ref16, ref32) + 1e-6
    assert xo.grad.dtype == torch.float16
    assert rel_err(xo.grad, x32.grad) <= 2 * rel_err(x16.grad, x32.grad) + floor


def test_all_ignored_rows_and_3d_input():
    x = torch.randn(2, 3, 37)
    t = torch.full((2, 3), IGN)
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(xo.grad, torch.zeros_like(x))
    # Some ignored rows in a batched (b, s, V) input: their gradient rows are exactly zero.
    t[0, 1], t[1, 2] = 5, 36
    loss, grad, ref, ref_grad = ours_and_ref(x, t)
    assert grad.shape == x.shape
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    assert torch.count_nonzero(grad[t == IGN]) == 0


def test_non_contiguous_logits():
    base = torch.randn(9, 2013)
    t = torch.randint(0, 1000, (5,))
    for x in (base[2:7, 5:1005], base.t()[:1000, :5].t(), base[:5, :2000:2]):  # row-strided, transposed, col-strided
        assert not x.is_contiguous()
        xo = x.detach().requires_grad_()
        loss = cross_entropy(xo, t)
        loss.backward()
        xr = x.detach().double().requires_grad_()
        ref = cross_entropy_reference(xr, t)
        ref.backward()
        assert rel_err(loss, ref) <= 1e-5 and rel_err(xo.grad, xr.grad) <= 1e-5


def test_multi_block_rows():
    """Rows longer than the block: the online softmax and the gradient loop over several masked blocks."""
    x, t = make_inputs(3, 1000, torch.float32, seed=5)
    xo = x.clone().requires_grad_()
    loss = CrossEntropyFunction.apply(xo, t, IGN, 0.1, 1e-3, "mean", False, 256)
    loss.backward()
    xr = x.double().requires_grad_()
    ref = cross_entropy_reference(xr, t, IGN, 0.1, 1e-3)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(xo.grad, xr.grad) <= 1e-5


def test_sum_and_none_reductions():
    x, t = make_inputs(5, 37, torch.float32, n_ignored=2, seed=7)
    loss, grad, ref, ref_grad = ours_and_ref(x, t, grad_scale=3.0, reduction="sum", z_loss=1e-3)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    w = torch.randn(5)
    loss, grad, ref, ref_grad = ours_and_ref(x, t, grad_scale=w, reduction="none", label_smoothing=0.1)
    assert loss.shape == (5,) and (loss[t == IGN] == 0).all()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_inplace_backward_overwrites_logits_with_gradient():
    x, t = make_inputs(4, 37, torch.float32, seed=9)
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t, inplace_backward=True)
    loss.backward()
    xr = x.double().requires_grad_()
    cross_entropy_reference(xr, t).backward()
    assert rel_err(xo.grad, xr.grad) <= 1e-5
    assert torch.equal(xo.detach(), xo.grad)  # the logits buffer now holds the gradient


def test_no_grad_forward_and_module():
    x, t = make_inputs(5, 37, torch.float32, seed=13)
    module = CrossEntropyLoss(label_smoothing=0.05, z_loss=1e-3)
    with torch.no_grad():
        loss = module(x, t)
    assert rel_err(loss, cross_entropy_reference(x.double(), t, IGN, 0.05, 1e-3)) <= 1e-5
    assert "label_smoothing=0.05" in repr(module)
    # Under no_grad no gradient is computed, so even inplace_backward leaves the logits intact.
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        loss = cross_entropy(xg, t, inplace_backward=True)
    assert not loss.requires_grad and torch.equal(xg.detach(), x)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([1, IGN, 4])
    for reduction in ("mean", "sum"):
        fn = lambda x: CrossEntropyFunction.apply(x, t, IGN, 0.2, 0.01, reduction, False, None)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: cross_entropy_reference(x, t, IGN, 0.2, 0.01), (x,))


def test_second_scaled_backward_raises():
    x = torch.randn(2, 37, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([1, 2])) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_input_errors(monkeypatch):
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(x, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="elements"):
        cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(x, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=1.5)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: forced triton is refused
        with pytest.raises(ValueError, match="CUDA tensor"):
            cross_entropy(x, torch.tensor([0, 1, 2]), backend="triton")


# ---------------------------------------------------------------------------------------------------------------------
# fp16 under a GradScaler's loss scale (loss * 65536, then backward)


def underflow_regime(rows=32, V=50257, H=64, boost=4.5, seed=0, min_flushed=0.9):
    """fp16 (hidden, weight, target) at vocabulary 50k whose logits hidden @ weight.T are exact in fp16 (multiples of
    1/64 below 32, so fp16 and fp64 references see the same logits), with over 90% of the non-target softmax entries
    divided by the mean's `rows` below 2^-25, half fp16's smallest subnormal: the regime every entry is in at 16k tokens
    (softmax ~ 1/50k, / 16384 ~ 1e-9). A forward that stores the mean's gradient in fp16 flushes them to zero."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randint(0, 2, (V, H), generator=g) * 2 - 1) / 4  # +-1/4: every row has squared norm 4
    target = torch.randint(0, V, (rows,), generator=g)
    hidden = torch.randint(-2, 3, (rows, H), generator=g) / 8 + boost * weight[target]
    logits = hidden.double() @ weight.double().t()
    assert torch.equal((hidden.half() @ weight.half().t()).double(), logits)
    p = logits.softmax(-1)
    off_target = torch.ones_like(p, dtype=torch.bool)
    off_target[torch.arange(rows), target] = False
    assert (p[off_target] / rows < 2.0**-25).double().mean() >= min_flushed
    return hidden.half(), weight.half(), target


def projection_err(out: torch.Tensor, ref: torch.Tensor, seed: int = 0) -> float:
    """rel_err of out @ R against ref @ R for a random (V, 8) R: the sums over the vocabulary that the layer below
    takes. Entries flushed to zero hardly move a max-norm error but bias these sums by their total."""
    r = torch.randn(out.shape[-1], 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return rel_err(
        out.detach().double().reshape(-1, out.shape[-1]) @ r, ref.detach().double().reshape(-1, r.shape[0]) @ r
    )


@pytest.mark.parametrize("kw", [{}, {"z_loss": 1e-4}])
@pytest.mark.parametrize("loss_scale", [65536.0, 1024.0])
def test_fp16_loss_scale_in_the_underflow_regime(loss_scale, kw):
    hidden, weight, t = underflow_regime()
    x = hidden @ weight.t()  # fp16, exact
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t, **kw)
    (loss * loss_scale).backward()  # as GradScaler: the fp32 loss times the scale, then backward
    xr = x.double().requires_grad_()
    ref = cross_entropy_reference(xr, t, **kw)
    ref.backward()
    exact = xr.grad * loss_scale
    assert xo.grad.dtype == torch.float16 and torch.isfinite(xo.grad).all()
    assert rel_err(loss, ref) <= 1e-5
    # The fp16 rule above, against torch's own fp16 reference (scale-free: relative errors).
    x16 = x.clone().requires_grad_()
    cross_entropy_reference(x16, t, **kw).backward()
    assert rel_err(xo.grad, exact) <= 2 * rel_err(x16.grad, xr.grad) + 2.0**-11
    # Stricter: twice the error of the best fp16 answer (the exact gradient rounded once), plus half an ulp.
    err, allowed = two_x_rule(xo.grad, exact, exact.half())
    assert err <= allowed, (err, allowed)
    assert projection_err(xo.grad, exact) <= 2 * projection_err(exact.half(), exact) + 2.0**-11


def test_fp16_reduction_none_per_row_loss_scale():
    hidden, weight, t = underflow_regime(rows=8, V=5000, boost=3.0, min_flushed=0.0)
    x = hidden @ weight.t()
    w = torch.tensor([65536.0, 1.0, 3.0, 0.0, 1 / 3, 2.0**-10, 100.0, 4096.0])
    xo = x.clone().requires_grad_()
    (cross_entropy(xo, t, reduction="none", z_loss=1e-3) * w).sum().backward()
    xr = x.double().requires_grad_()
    (cross_entropy_reference(xr, t, reduction="none", z_loss=1e-3) * w).sum().backward()
    assert torch.isfinite(xo.grad).all() and (xo.grad[3] == 0).all()
    err, allowed = two_x_rule(xo.grad, xr.grad, xr.grad.half())
    assert err <= allowed, (err, allowed)
    assert projection_err(xo.grad, xr.grad) <= 2 * projection_err(xr.grad.half(), xr.grad) + 2.0**-11


def test_fp16_prescale_cannot_overflow():
    assert fp16_prescale(0.0) == 2.0**14 and fp16_prescale(1e-4) == 2.0**12
    for z in (0.0, 1e-4, 1e-2, 1.0):
        assert fp16_prescale(z) * (2 + z * 2.0**17) <= 65504 < 2 * fp16_prescale(z) * (2 + z * 2.0**17)
    # The largest finite fp16 logits and a large z-loss: the stored gradient stays finite.
    x = torch.tensor([[65504.0, -65504.0, 0.0, 1.0], [-65504.0, -65504.0, -65504.0, -65504.0]]).half()
    xo = x.clone().requires_grad_()
    (cross_entropy(xo, torch.tensor([1, 0]), z_loss=1e-2) * 2.0**-20).backward()
    xr = x.double().requires_grad_()
    (cross_entropy_reference(xr, torch.tensor([1, 0]), z_loss=1e-2) * 2.0**-20).backward()
    assert torch.isfinite(xo.grad).all()
    assert rel_err(xo.grad, xr.grad) <= 2.0**-10
