"""kernels/linear_cross_entropy.py against the unfused plain-PyTorch reference, under the Triton interpreter,
and its vocab-parallel variant on 2 gloo processes against the unsharded reference."""

import os

import pytest
import torch

from kernels.linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    vocab_parallel_fused_linear_cross_entropy,
)
from kernels.utils import two_x_rule
from tests.distributed import run_distributed
from tests.kernels.test_cross_entropy import rel_err, underflow_regime

IGN = -100


def make_inputs(lead, H, V, dtype, n_ignored=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    target = torch.randint(0, V, lead, generator=g)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: min(n_ignored, flat.numel() - 1)]] = IGN
    return hidden, weight, target


def run(fn, hidden, weight, target, dtype=None, grad_scale=1.0, **kw):
    """Loss, grad_hidden, grad_weight of `fn` on copies of the inputs (upcast to `dtype` if given)."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(h, w, target, **kw)
    (loss * grad_scale).backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize(
    "lead,H,V,chunk",
    [((5,), 16, 37, 2), ((1,), 8, 1000, None), ((13,), 32, 4099, 4), ((2, 3), 24, 1000, 5)],
)
def test_fp32_matches_reference(lead, H, V, chunk):
    hidden, weight, target = make_inputs(lead, H, V, torch.float32, seed=V)
    ours = run(fused_linear_cross_entropy, hidden, weight, target, grad_scale=1.7, chunk_size=chunk)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, grad_scale=1.7)
    assert ours[0].dtype == torch.float32 and ours[1].shape == hidden.shape
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_label_smoothing_and_z_loss(label_smoothing, z_loss):
    hidden, weight, target = make_inputs((7,), 16, 1000, torch.float32, n_ignored=2, seed=2)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    ours = run(fused_linear_cross_entropy, hidden, weight, target, chunk_size=3, **kw)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, **kw)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-5


def test_fp16_two_x_rule():
    hidden, weight, target = make_inputs((9,), 32, 1000, torch.float16, seed=4)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    ours = run(fused_linear_cross_entropy, hidden, weight, target, chunk_size=4, **kw)
    ref16 = run(fused_linear_cross_entropy_reference, hidden, weight, target, **kw)
    ref32 = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float32, **kw)
    assert ours[1].dtype == ours[2].dtype == torch.float16
    floor = 2.0**-11
    for a, b16, b32 in zip(ours, ref16, ref32):
        assert rel_err(a, b32) <= 2 * rel_err(b16, b32) + floor


@pytest.mark.parametrize("loss_scale", [65536.0, 1024.0])
def test_fp16_loss_scale_in_the_underflow_regime(loss_scale):
    """fp16 at vocabulary 50k, the mean's per-entry gradient below fp16's subnormals (see `underflow_regime`), loss
    times a GradScaler's scale: finite gradients equal to the exact ones times the scale, by the fp16 rule above and
    within twice the error of the exact gradients rounded once to fp16 (plus half an ulp)."""
    hidden, weight, target = underflow_regime()
    kw = dict(z_loss=1e-4)
    ours = run(fused_linear_cross_entropy, hidden, weight, target, grad_scale=loss_scale, chunk_size=8, **kw)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, **kw)
    # torch's fp16 reference cannot carry 65536 (inf in fp16); 1024 keeps its own gradient out of the underflow.
    ref16 = run(fused_linear_cross_entropy_reference, hidden, weight, target, grad_scale=1024.0, **kw)
    assert ours[1].dtype == ours[2].dtype == torch.float16
    assert rel_err(ours[0], ref[0]) <= 1e-5
    for a, b, b16 in zip(ours[1:], ref[1:], ref16[1:]):
        exact = b * loss_scale
        assert torch.isfinite(a).all()
        assert rel_err(a, exact) <= 2 * rel_err(b16, b * 1024.0) + 2.0**-11
        err, allowed = two_x_rule(a, exact, exact.half())
        assert err <= allowed, (err, allowed)


def test_fp16_large_weights_cap_the_prescale():
    """The fp16 chunk gradient is pre-scaled by a power of two; with weights of magnitude ~300 the hidden gradient's
    fp16 GEMM dlogits @ W would overflow at the z-loss bound's scale (2^12) unless it is capped by max|W|."""
    g = torch.Generator().manual_seed(21)
    hidden = (torch.randn(6, 16, generator=g) / 300).half()
    weight = (torch.randn(37, 16, generator=g) * 300).half()
    target = torch.randint(0, 37, (6,), generator=g)
    kw = dict(z_loss=1e-4, chunk_size=4)
    ours = run(fused_linear_cross_entropy, hidden, weight, target, grad_scale=4.0, **kw)
    kw.pop("chunk_size")
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, grad_scale=4.0, **kw)
    ref16 = run(fused_linear_cross_entropy_reference, hidden, weight, target, grad_scale=4.0, **kw)
    for a, b, b16 in zip(ours, ref, ref16):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 2 * rel_err(b16, b) + 2.0**-11


def test_chunk_size_does_not_change_the_result():
    hidden, weight, target = make_inputs((6,), 8, 37, torch.float32, n_ignored=2, seed=6)
    one = run(fused_linear_cross_entropy, hidden, weight, target, chunk_size=1, z_loss=1e-3)
    whole = run(fused_linear_cross_entropy, hidden, weight, target, chunk_size=6, z_loss=1e-3)
    for a, b in zip(one, whole):
        assert rel_err(a, b) <= 1e-6
    assert default_chunk_size(8192, 4096, 131072) == 2048  # Liger's 256 raised to the weight-GEMM floor
    assert default_chunk_size(1 << 20, 4096, 32000) == 131072  # logits chunk ~ N x H, as Liger picks
    assert default_chunk_size(3, 4096, 37) == 3


def test_non_contiguous_inputs():
    """hidden a permuted (batch, seq, H) view of an (seq, H, batch) tensor, weight a row and column slice of a larger
    matrix (e.g. a padded, tied embedding), target a transposed view: loss and the gradients reaching the underlying
    tensors match the reference on the same views, over several chunks."""
    g = torch.Generator().manual_seed(14)
    H, V = 12, 37
    h_base = torch.randn(3, H, 2, generator=g).requires_grad_()
    w_base = (torch.randn(V + 5, 2 * H, generator=g) / H**0.5 * 2).requires_grad_()
    target = torch.randint(0, V, (3, 2), generator=g).t()  # (2, 3), transposed
    target[0, 1] = IGN
    hidden, weight = h_base.permute(2, 0, 1), w_base[2 : V + 2, 1::2]  # (2, 3, H); (V, H) with column stride 2
    assert not (hidden.is_contiguous() or weight.is_contiguous() or target.is_contiguous())

    def grads(fn, dtype, **kw):
        hb, wb = h_base.detach().to(dtype).requires_grad_(), w_base.detach().to(dtype).requires_grad_()
        loss = fn(hb.permute(2, 0, 1), wb[2 : V + 2, 1::2], target, z_loss=1e-3, **kw)
        (loss * 1.3).backward()
        return loss, hb.grad, wb.grad

    ours = grads(fused_linear_cross_entropy, torch.float32, chunk_size=4)
    ref = grads(fused_linear_cross_entropy_reference, torch.float64)
    assert torch.count_nonzero(ours[2][:2]) == 0 and torch.count_nonzero(ours[2][:, ::2]) == 0  # outside the slice
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-5


def test_all_ignored_and_partial_grads():
    hidden, weight, _ = make_inputs((4,), 8, 37, torch.float32)
    target = torch.full((4,), IGN)
    loss, gh, gw = run(fused_linear_cross_entropy, hidden, weight, target, chunk_size=3)
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # Only one input requires grad (frozen embedding / frozen trunk), and none (evaluation).
    hidden, weight, target = make_inputs((4,), 8, 37, torch.float32, seed=8)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, target, reduction="sum").backward()
    h64, w64 = hidden.double(), weight.double().requires_grad_()
    fused_linear_cross_entropy_reference(h64, w64, target, reduction="sum").backward()
    assert rel_err(w.grad, w64.grad) <= 1e-5
    with torch.no_grad():
        loss = FusedLinearCrossEntropyLoss(z_loss=1e-3)(hidden, weight, target)
    assert rel_err(loss, fused_linear_cross_entropy_reference(h64, w64.detach(), target, z_loss=1e-3)) <= 1e-5


def test_autocast_runs_the_linear_in_the_autocast_dtype():
    """fp32 master weights under fp16 autocast: the loss is that of the fp16-cast inputs, the grads reach fp32."""
    hidden, weight, target = make_inputs((6,), 16, 37, torch.float32, seed=12)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fused_linear_cross_entropy(h, w, target, chunk_size=4)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    ref = run(fused_linear_cross_entropy_reference, hidden.half(), weight.half(), target, torch.float64)
    assert rel_err(loss, ref[0]) <= 2e-4  # the logits are fp16-rounded, as F.linear under autocast makes them
    assert rel_err(h.grad, ref[1]) <= 2e-3 and rel_err(w.grad, ref[2]) <= 2e-3  # fp16-rounded gradients


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([1, IGN, 4])
    fn = lambda h, w: fused_linear_cross_entropy(h, w, t, label_smoothing=0.2, z_loss=0.01, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (h, w), fast_mode=True)
    ref = lambda h, w: fused_linear_cross_entropy_reference(h, w, t, label_smoothing=0.2, z_loss=0.01)
    assert torch.autograd.gradcheck(ref, (h, w))


def test_bad_input_errors():
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 10, 1]))
    # the module refuses bad options when built, as CrossEntropyLoss does
    for kw, needle in (
        ({"reduction": "none"}, "reduction"),
        ({"label_smoothing": 2.0}, "label_smoothing"),
        ({"chunk_size": 0}, "chunk_size"),
    ):
        with pytest.raises(ValueError, match=f"FusedLinearCrossEntropyLoss: {needle}"):
            FusedLinearCrossEntropyLoss(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor-parallel variant: 2 gloo ranks holding uneven vocab shards (20 + 17 of 37 rows)

SHARDS = [(0, 20), (20, 37)]


def _tp_worker(rank, world_size):
    import torch.distributed as dist

    results = []
    cases = [dict(), dict(label_smoothing=0.1, z_loss=1e-3)]
    for i, kw in enumerate(cases):
        hidden, weight, target = make_inputs((5,), 16, 37, torch.float32, n_ignored=2, seed=10 + i)
        lo, hi = SHARDS[rank]
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        loss = vocab_parallel_fused_linear_cross_entropy(h, w, target, None, chunk_size=2, **kw)
        (loss * 1.5).backward()
        ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, grad_scale=1.5, **kw)
        results.append(
            (rel_err(loss, ref[0]), rel_err(h.grad, ref[1]), rel_err(w.grad, ref[2][lo:hi]), w.grad.shape[0])
        )
    # Vocabulary padded to 40 rows (20 + 20), true vocabulary 37: the padding is outside the softmax, gradient 0.
    hidden, weight, target = make_inputs((5,), 16, 37, torch.float32, n_ignored=1, seed=30)
    padded = torch.cat([weight, 5 * torch.randn(3, 16)])  # large padding logits would change the loss if counted
    lo, hi = (0, 20) if rank == 0 else (20, 40)
    h = hidden.clone().requires_grad_()
    w = padded[lo:hi].clone().requires_grad_()
    loss = vocab_parallel_fused_linear_cross_entropy(h, w, target, vocab_size=37, chunk_size=3, z_loss=1e-3)
    loss.backward()
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, z_loss=1e-3)
    ref_w = torch.cat([ref[2], torch.zeros(3, 16, dtype=ref[2].dtype)])[lo:hi]
    results.append((rel_err(loss, ref[0]), rel_err(h.grad, ref[1]), rel_err(w.grad, ref_w), hi - lo))
    # Without the built-in reduction, the per-rank hidden gradients sum to the full one.
    hidden, weight, target = make_inputs((3,), 8, 37, torch.float32, seed=20)
    lo, hi = SHARDS[rank]
    h = hidden.clone().requires_grad_()
    vocab_parallel_fused_linear_cross_entropy(h, weight[lo:hi], target, reduce_hidden_grad=False).backward()
    partial = h.grad.clone()
    dist.all_reduce(partial)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64)
    results.append((0.0, rel_err(partial, ref[1]), 0.0, hi - lo))
    return results


def _tp_fp16_worker(rank, world_size):
    """fp16 shards under a GradScaler's 65536: finite gradients, equal to the exact ones times the scale by the fp16
    rule (torch's fp16 reference at a scale it can carry, 1024)."""
    hidden, weight, target = make_inputs((6,), 16, 37, torch.float16, n_ignored=1, seed=40)
    lo, hi = SHARDS[rank]
    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    loss = vocab_parallel_fused_linear_cross_entropy(h, w, target, chunk_size=4, z_loss=1e-4)
    (loss * 65536.0).backward()
    _, ref_h, ref_w = run(fused_linear_cross_entropy_reference, hidden, weight, target, torch.float64, z_loss=1e-4)
    _, h16, w16 = run(fused_linear_cross_entropy_reference, hidden, weight, target, grad_scale=1024.0, z_loss=1e-4)
    results = []
    for ours, ref, same in ((h.grad, ref_h, h16), (w.grad, ref_w[lo:hi], w16[lo:hi])):
        ok = ours.dtype == torch.float16 and bool(torch.isfinite(ours).all())
        results.append((ok, rel_err(ours, ref * 65536.0), 2 * rel_err(same, ref * 1024.0) + 2.0**-11))
    return results


@pytest.mark.distributed
def test_vocab_parallel_fp16_loss_scale():
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    for results in run_distributed(_tp_fp16_worker, 2, timeout=120, env=env):
        for ok, err, bound in results:
            assert ok and err <= bound, results


@pytest.mark.distributed
def test_vocab_parallel_matches_unsharded_reference():
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    _check_tp_results(run_distributed(_tp_worker, 2, timeout=120, env=env))


def _tp_torch_worker(rank, world_size):
    """_tp_worker's cases on CPU without the interpreter, where "auto" is the torch path (the kernels' Function made
    to fail, to be sure); forcing triton there is a one-line error."""
    import kernels.linear_cross_entropy as lce

    assert os.environ["TRITON_INTERPRET"] == "0"

    def refuse(*args):
        raise AssertionError("the Triton path ran")

    lce.VocabParallelFusedLinearCrossEntropyFunction.apply = refuse
    lce._vp_flce_forward = refuse
    h, w, t = make_inputs((3,), 8, 37, torch.float32, seed=50)
    try:
        vocab_parallel_fused_linear_cross_entropy(h, w[SHARDS[rank][0] : SHARDS[rank][1]], t, backend="triton")
        forced = "no error"
    except ValueError as e:
        forced = str(e)
    return _tp_worker(rank, world_size), forced


@pytest.mark.distributed
def test_vocab_parallel_torch_backend_matches_unsharded_reference():
    if torch.cuda.is_available():
        pytest.skip("written for machines without CUDA, where the tests' CPU tensors otherwise use the interpreter")
    env = {"TRITON_INTERPRET": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    per_rank = run_distributed(_tp_torch_worker, 2, timeout=120, env=env)
    _check_tp_results([results for results, _ in per_rank])
    for _, forced in per_rank:
        assert "backend='triton' needs a CUDA tensor" in forced and "\n" not in forced


def _check_tp_results(per_rank):
    for rank, results in enumerate(per_rank):
        assert [r[3] for r in results] == [SHARDS[rank][1] - SHARDS[rank][0]] * 2 + [
            20,
            SHARDS[rank][1] - SHARDS[rank][0],
        ]
        for loss_err, h_err, w_err, _ in results:
            assert loss_err <= 1e-5 and h_err <= 1e-5 and w_err <= 1e-5, (rank, results)
