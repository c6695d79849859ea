"""GPU-only checks of cross-entropy and fused linear cross-entropy: bf16 by the 2x-error rule (the kernel-parity rule of
docs/contracts.md) at realistic vocabularies; fp16 under a GradScaler's loss scale (65536) at 16k tokens and vocabulary
50k, where the mean's per-entry gradient is below fp16's subnormals; and the fused op's memory staying O(chunk x vocab)
at vocab 128k."""

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy_loss import cross_entropy, cross_entropy_reference
from kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

pytestmark = pytest.mark.gpu
IGN = -100


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return (a - b).abs().max().item()


def assert_two_x(out, ref32, ref_same, dtype=torch.bfloat16):
    """|out - ref32| <= 2 |ref_same - ref32| + one ulp of `dtype` at the reference's scale."""
    floor = torch.finfo(dtype).eps * ref32.detach().double().abs().max().item()
    err, base = _max_err(out, ref32), _max_err(ref_same, ref32)
    assert err <= 2 * base + floor, (err, base, floor)


def _grads(fn, inputs, dtype, **kw):
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs[:-1]]
    loss = fn(*xs, inputs[-1], **kw)
    loss.backward()
    return [loss] + [x.grad for x in xs]


@pytest.mark.parametrize("V", [32000, 131072])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}])
def test_cross_entropy_bf16_two_x_rule(V, kw):
    torch.manual_seed(0)
    x = (torch.randn(512, V, device="cuda") * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (512,), device="cuda")
    t[::7] = IGN
    ours = _grads(cross_entropy, [x, t], torch.bfloat16, **kw)
    same = _grads(cross_entropy_reference, [x, t], torch.bfloat16, **kw)
    ref = _grads(cross_entropy_reference, [x, t], torch.float32, **kw)
    assert ours[1].dtype == torch.bfloat16
    for o, s, r in zip(ours, same, ref):
        assert_two_x(o, r, s)


def test_cross_entropy_non_contiguous_bf16_and_inplace():
    torch.manual_seed(1)
    base = torch.randn(300, 2 * 50257, device="cuda", dtype=torch.bfloat16)
    x = base[::3, 7 : 7 + 50257]  # row-strided view
    t = torch.randint(0, 50257, (100,), device="cuda")
    ours = _grads(cross_entropy, [x, t], torch.bfloat16)
    ref = _grads(cross_entropy_reference, [x, t], torch.float32)
    same = _grads(cross_entropy_reference, [x, t], torch.bfloat16)
    for o, s, r in zip(ours, same, ref):
        assert_two_x(o, r, s)
    xi = x.contiguous().requires_grad_()
    cross_entropy(xi, t, inplace_backward=True).backward()
    assert_two_x(xi.grad, ref[1], same[1])


@pytest.mark.parametrize("V", [32000, 50257])
def test_fused_linear_cross_entropy_bf16_two_x_rule(V):
    torch.manual_seed(2)
    h = torch.randn(2048, 1024, device="cuda").to(torch.bfloat16)
    w = (torch.randn(V, 1024, device="cuda") / 32).to(torch.bfloat16)
    t = torch.randint(0, V, (2048,), device="cuda")
    t[::5] = IGN
    kw = {"label_smoothing": 0.05, "z_loss": 1e-4}
    ours = _grads(fused_linear_cross_entropy, [h, w, t], torch.bfloat16, **kw)
    same = _grads(fused_linear_cross_entropy_reference, [h, w, t], torch.bfloat16, **kw)
    ref = _grads(fused_linear_cross_entropy_reference, [h, w, t], torch.float32, **kw)
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    for o, s, r in zip(ours, same, ref):
        assert_two_x(o, r, s)


def _vocab_sums(g: torch.Tensor) -> torch.Tensor:
    """g @ R for a fixed random (V, 8) R: the vocabulary sums the layer below takes, which entries flushed to zero
    would bias even where the max-norm error cannot see them."""
    gen = torch.Generator(g.device).manual_seed(0)
    return g.detach().float() @ torch.randn(g.shape[-1], 8, device=g.device, generator=gen)


def test_cross_entropy_fp16_loss_scale_16k_tokens():
    """16k tokens x vocabulary 50257 in fp16, mean reduction, loss * 65536 (GradScaler's initial scale): the
    gradient is finite and within the 2x rule of torch under autocast (cross-entropy in fp32, its gradient rounded
    once to fp16), also on the vocabulary sums."""
    torch.manual_seed(3)
    N, V, scale = 16384, 50257, 65536.0
    x = torch.randn(N, V, device="cuda").half()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = IGN
    xo = x.clone().requires_grad_()
    loss = cross_entropy(xo, t)
    (loss * scale).backward()
    assert xo.grad.dtype == torch.float16 and torch.isfinite(xo.grad).all()
    xr = x.float().requires_grad_()  # fp32 reference: torch's autocast path before its final cast
    ref = F.cross_entropy(xr, t, ignore_index=IGN)
    (ref * scale).backward()
    ref32, same = xr.grad, xr.grad.half()
    del xr
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_two_x(xo.grad, ref32, same, torch.float16)
    sums = _vocab_sums(ref32)
    err, base = _max_err(_vocab_sums(xo.grad), sums), _max_err(_vocab_sums(same), sums)
    assert err <= 2 * base + 2.0**-11 * sums.abs().max().item(), (err, base)


def test_fused_linear_cross_entropy_fp16_loss_scale_16k_tokens():
    """The fused op in fp16 at 16k tokens, vocabulary 50257, loss * 65536: finite gradients within the 2x rule of
    torch under autocast with a GradScaler (fp16 linear, fp32 cross-entropy, its gradient cast to fp16 for the
    linear's backward), against fp32 (not TF32) on the same fp16 inputs."""
    torch.manual_seed(4)
    N, H, V, scale = 16384, 1024, 50257, 65536.0
    h = torch.randn(N, H, device="cuda").half()
    w = (torch.randn(V, H, device="cuda") / 32).half()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::5] = IGN

    def torch_autocast(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGN)

    def unfused(h, w, t):
        return F.cross_entropy(h @ w.t(), t, ignore_index=IGN)

    results = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the fp32 reference without TF32
    try:
        for fn, dtype in ((fused_linear_cross_entropy, None), (torch_autocast, None), (unfused, torch.float32)):
            hh = (h.clone() if dtype is None else h.to(dtype)).requires_grad_()
            ww = (w.clone() if dtype is None else w.to(dtype)).requires_grad_()
            loss = fn(hh, ww, t)
            (loss * scale).backward()
            results.append((loss.detach(), hh.grad, ww.grad))
            del hh, ww, loss
            torch.cuda.empty_cache()
    finally:
        torch.set_float32_matmul_precision(precision)
    ours, same, ref = results
    assert ours[1].dtype == ours[2].dtype == torch.float16
    for o, s_, r in zip(ours, same, ref):
        assert torch.isfinite(o).all()
        assert_two_x(o, r, s_, torch.float16)


def _peak_mb(fn, h, w, t) -> float:
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(h, w, t).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_fused_linear_cross_entropy_memory_at_vocab_128k():
    """Fused peak memory grows with the rows only by the hidden-sized buffers, unfused by rows x vocab."""
    H, V = 2048, 131072
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16)
    peaks = {}
    for n in (4096, 8192):
        h = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, V, (n,), device="cuda")
        peaks["fused", n] = _peak_mb(fused_linear_cross_entropy, h, w, t)
        unfused = lambda h, w, t: torch.nn.functional.cross_entropy(h @ w.t(), t)  # noqa: E731
        peaks["unfused", n] = _peak_mb(unfused, h, w, t)
    logits_mb = 4096 * V * 2 / 2**20  # 1 GiB of bf16 logits per 4096 rows
    hidden_mb = 4096 * H * 2 / 2**20
    # Unfused grows by at least the extra logits; fused by at most a few hidden-sized buffers.
    assert peaks["unfused", 8192] - peaks["unfused", 4096] >= logits_mb, peaks
    assert peaks["fused", 8192] - peaks["fused", 4096] <= 4 * hidden_mb + 64, peaks
    assert peaks["fused", 8192] * 2 <= peaks["unfused", 8192], peaks
    # Weight-gradient buffers (fp32 sum + bf16 result) dominate the fused peak: V x H x 6 bytes, plus slack.
    assert peaks["fused", 8192] <= (V * H * 6 + 8 * 8192 * H * 2) / 2**20 + 512, peaks
