"""Kernel benchmark harness: ours vs torch eager vs torch.compile vs Liger/apex (when importable).

    python -m benchmarks.kernels [--only rmsnorm,...,flash_attention,flash_attention_masked] [--csv out.csv]

On a CUDA device, per kernel and shape: a correctness check of ours against an fp32 reference (docs/contracts.md,
kernel parity: the 2x-error rule against the same-dtype torch computation), then forward and forward+backward times with
`triton.testing.do_bench` (median, 20th and 80th percentiles, L2 flushed before each call), throughput in GB/s for
the memory-bound kernels or TFLOP/s for fused linear cross-entropy and flash attention (ours vs torch SDPA vs the
flash-attn package when importable; FLOPs 4 b h s^2 d forward, halved when causal, backward 2.5x forward), that as a
percentage of the device ceiling measured in the same run (a large device copy; a large bf16 matmul), and the peak
memory of one forward+backward.
The fused-linear-CE shapes include vocab 128k, where the peak memory column is the fused vs unfused comparison.
RoPE rotates q and k (grouped-query heads) in each case, the work Liger's RoPE does in one call (its baseline gets
our layout as transposed views and the tables converted once, outside the timed call: `liger_rope_baseline`).
Without a GPU it runs only the correctness part (tiny shapes, fp32, ours vs the fp64 reference under the Triton
interpreter) and says so. Each kernel module is imported lazily: a missing one is reported as unavailable.
A table is printed last; `--csv` writes one row per (kernel, shape, implementation).

On a lent GPU, in one call: `python -m pytest -q -m gpu tests/kernels && python -m benchmarks.kernels --csv
$OUT/kernels.csv` (Liger-Kernel, if wanted as a baseline, travels as a wheel: the device machine has no network).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

QUANTILES = [0.5, 0.2, 0.8]
IGNORE_INDEX = -100


@dataclass
class Case:
    """One kernel at one shape: differentiable inputs and the implementations to compare, all `fn(*inputs)`."""

    inputs: list[torch.Tensor]
    ours: Callable
    torch_eager: Callable  # plain torch in the inputs' dtype: the baseline and the 2x rule's same-dtype reference
    reference: Callable  # the kernel module's torch reference (computes in fp32, or fp64 for fp64 inputs)
    work_fwd: float  # bytes (GB/s kernels) or FLOPs (TFLOP/s kernels) of one forward
    work_fwdbwd: float
    others: dict[str, Callable] = field(default_factory=dict)  # Liger / apex, when importable
    outputs: int = 1  # how many leading outputs of each fn are compared, timed and differentiated (q, k: 2)


@dataclass(frozen=True)
class Spec:
    name: str
    module: str
    metric: str  # "GB/s" or "TFLOP/s"
    build: Callable[..., Case]  # build(mod, shape, dtype, device) -> Case
    cpu_shapes: tuple
    gpu_shapes: tuple


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _try(fn: Callable[[], Callable]) -> Callable | None:
    """An optional implementation (Liger, apex), or None when it is not installed or its API differs."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - optional third-party baselines: any failure means "not available"
        return None


def _elt(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------------------------
# Kernel families. Bytes count each input read once and each output written once (the ideal the kernel is held to).


def _build_rmsnorm(mod, shape, dtype, device) -> Case:
    rows, d = shape
    x = _leaf(torch.randn(rows, d, device=device, dtype=dtype))
    w = _leaf(1 + 0.1 * torch.randn(d, device=device, dtype=dtype))
    e = _elt(dtype)
    case = Case(
        inputs=[x, w],
        ours=lambda x, w: mod.rms_norm(x, w, 1e-6),
        torch_eager=lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
        reference=lambda x, w: mod.rms_norm_reference(x, w, 1e-6),
        work_fwd=2 * rows * d * e,  # read x, write y
        work_fwdbwd=5 * rows * d * e,  # + read dy, x; write dx
    )

    def liger():
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6)

    def apex():
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return lambda x, w: fused_rms_norm_affine(x, w, (x.shape[-1],), 1e-6)

    case.others = {k: f for k, f in (("liger", _try(liger)), ("apex", _try(apex))) if f is not None}
    return case


def _build_layernorm(mod, shape, dtype, device) -> Case:
    rows, d = shape
    x = _leaf(torch.randn(rows, d, device=device, dtype=dtype))
    w = _leaf(1 + 0.1 * torch.randn(d, device=device, dtype=dtype))
    b = _leaf(0.1 * torch.randn(d, device=device, dtype=dtype))
    e = _elt(dtype)
    case = Case(
        inputs=[x, w, b],
        ours=lambda x, w, b: mod.layer_norm(x, w, b, 1e-5),
        torch_eager=lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        reference=lambda x, w, b: mod.layer_norm_reference(x, w, b, 1e-5),
        work_fwd=2 * rows * d * e,
        work_fwdbwd=5 * rows * d * e,
    )

    def liger():
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)

    def apex():
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), 1e-5)

    case.others = {k: f for k, f in (("liger", _try(liger)), ("apex", _try(apex))) if f is not None}
    return case


def liger_rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (seq, head_dim // 2) tables in Liger's layout: (1, seq, head_dim), each half-row duplicated over both
    halves (Hugging Face's ``cat(freqs, freqs)``; Liger's kernel reads the first half)."""
    return torch.cat((cos, cos), dim=-1)[None].contiguous(), torch.cat((sin, sin), dim=-1)[None].contiguous()


def liger_rope_baseline(rotary: Callable, cos: torch.Tensor, sin: torch.Tensor) -> Callable:
    """``fn(q, k) -> (q_rot, k_rot)`` on our (batch, seq, heads, head_dim) layout through ``rotary(q, k, cos, sin)``
    with the signature of Liger's ``liger_rotary_pos_emb``: q, k as (batch, heads, seq, head_dim) and cos, sin
    (1, seq, head_dim). The tables are converted here, once, outside the timed call; q, k are passed as transposed
    views, whose storage is the (batch, seq, heads, head_dim) layout Liger's kernel works on (its ``.contiguous()``
    after transposing back is then a no-op), so the timed call is Liger's op alone, with no copy."""
    lcos, lsin = liger_rope_tables(cos, sin)

    def fn(q, k):
        q_rot, k_rot = rotary(q.transpose(1, 2), k.transpose(1, 2), lcos, lsin)[:2]
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

    return fn


def _build_rope(mod, shape, dtype, device) -> Case:
    # q and k (grouped-query: heads_kv kv heads), both rotated: the work of one attention layer, and what Liger's op
    # does in one call. Ours and torch rotate out of place; Liger rotates in place (its peak memory is lower by the
    # outputs; it also rotates the benchmark inputs, harmless as it is timed last and rotation keeps magnitudes).
    b, s, hq, hkv, d = shape
    q = _leaf(torch.randn(b, s, hq, d, device=device, dtype=dtype))
    k = _leaf(torch.randn(b, s, hkv, d, device=device, dtype=dtype))
    cos, sin = mod.rope_cos_sin(s, d, device=device)
    n = (q.numel() + k.numel()) * _elt(dtype)
    case = Case(
        inputs=[q, k],
        ours=lambda q, k: (mod.apply_rope(q, cos, sin), mod.apply_rope(k, cos, sin)),
        torch_eager=lambda q, k: tuple(mod.apply_rope_reference(t, cos, sin, upcast=False) for t in (q, k)),
        reference=lambda q, k: tuple(mod.apply_rope_reference(t, cos, sin) for t in (q, k)),
        work_fwd=2 * n,  # read q, k, write their rotations (the tables are small and cached)
        work_fwdbwd=4 * n,
        outputs=2,
    )

    def liger():
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rope_baseline(liger_rotary_pos_emb, cos, sin)

    liger_fn = _try(liger)
    if liger_fn is not None:
        case.others["liger"] = liger_fn
    return case


def _build_swiglu(mod, shape, dtype, device) -> Case:
    rows, d = shape
    gate = _leaf(torch.randn(rows, d, device=device, dtype=dtype))
    up = _leaf(torch.randn(rows, d, device=device, dtype=dtype))
    n = rows * d * _elt(dtype)
    case = Case(
        inputs=[gate, up],
        ours=lambda g, u: mod.swiglu(g, u),
        torch_eager=lambda g, u: F.silu(g) * u,
        reference=lambda g, u: mod.swiglu_reference(g, u),
        work_fwd=3 * n,  # read gate, up; write out
        work_fwdbwd=8 * n,  # + read dout, gate, up; write dgate, dup
    )

    def liger():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return lambda g, u: LigerSiLUMulFunction.apply(g, u)

    liger_fn = _try(liger)
    if liger_fn is not None:
        case.others["liger"] = liger_fn
    return case


def _build_cross_entropy(mod, shape, dtype, device) -> Case:
    rows, V = shape
    g = torch.Generator(device=device).manual_seed(0)
    logits = _leaf(torch.randn(rows, V, device=device, dtype=dtype, generator=g) * 2)
    target = torch.randint(0, V, (rows,), device=device, generator=g)
    target[1::8] = IGNORE_INDEX  # one row in eight is padding
    n = rows * V * _elt(dtype)
    case = Case(
        inputs=[logits],
        ours=lambda x: mod.cross_entropy(x, target),
        torch_eager=lambda x: F.cross_entropy(x, target, ignore_index=IGNORE_INDEX),
        reference=lambda x: mod.cross_entropy_reference(x.float() if x.dtype != torch.float64 else x, target),
        work_fwd=n,  # read the logits
        work_fwdbwd=2 * n,  # + write their gradient
    )

    def liger():
        from liger_kernel.transformers import LigerCrossEntropyLoss

        loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        return lambda x: loss(x, target)

    liger_fn = _try(liger)
    if liger_fn is not None:
        case.others["liger"] = liger_fn
    return case


def _build_fused_linear_ce(mod, shape, dtype, device) -> Case:
    rows, H, V = shape
    g = torch.Generator(device=device).manual_seed(0)
    hidden = _leaf(torch.randn(rows, H, device=device, dtype=dtype, generator=g))
    weight = _leaf(torch.randn(V, H, device=device, dtype=dtype, generator=g) / math.sqrt(H))
    target = torch.randint(0, V, (rows,), device=device, generator=g)
    target[1::8] = IGNORE_INDEX  # one row in eight is padding

    def reference(h, w):
        up = torch.float64 if h.dtype == torch.float64 else torch.float32
        return mod.fused_linear_cross_entropy_reference(h.to(up), w.to(up), target)

    case = Case(
        inputs=[hidden, weight],
        ours=lambda h, w: mod.fused_linear_cross_entropy(h, w, target),
        torch_eager=lambda h, w: F.cross_entropy(h @ w.t(), target, ignore_index=IGNORE_INDEX),  # unfused
        reference=reference,
        work_fwd=2 * rows * H * V,  # logits GEMM
        work_fwdbwd=6 * rows * H * V,  # + grad_hidden and grad_weight GEMMs
    )

    def liger():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        return lambda h, w: loss(w, h, target)

    liger_fn = _try(liger)
    if liger_fn is not None:
        case.others["liger"] = liger_fn
    return case


def _build_flash_attention(mod, shape, dtype, device) -> Case:
    # (batch, seq, heads_q, heads_kv, head_dim, causal). FLOPs as FlashAttention's benchmark counts them: 4 b h s^2 d
    # forward (two matmuls), halved when causal; backward 2.5x forward.
    b, s, hq, hkv, d, causal = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = _leaf(torch.randn(b, s, hq, d, device=device, generator=g).to(dtype))
    k = _leaf(torch.randn(b, s, hkv, d, device=device, generator=g).to(dtype))
    v = _leaf(torch.randn(b, s, hkv, d, device=device, generator=g).to(dtype))

    def sdpa(q, k, v):  # torch's fused SDPA (its FlashAttention-2 backend on CUDA for 16-bit inputs)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=hq != hkv
        )
        return out.transpose(1, 2)

    fwd = 4 * b * hq * s * s * d / (2 if causal else 1)
    case = Case(
        inputs=[q, k, v],
        ours=lambda q, k, v: mod.flash_attention(q, k, v, causal=causal),
        torch_eager=sdpa,
        reference=lambda q, k, v: mod.flash_attention_reference(q, k, v, causal=causal),
        work_fwd=fwd,
        work_fwdbwd=3.5 * fwd,
    )

    def flash_attn():
        from flash_attn import flash_attn_func

        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError("flash-attn takes fp16/bf16 only")
        return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)

    fa = _try(flash_attn)
    if fa is not None:
        case.others["flash_attn"] = fa
    return case


def _build_flash_attention_masked(mod, shape, dtype, device) -> Case:
    # (batch, seq, heads_q, heads_kv, head_dim, document length or 0, window or 0), causal: packed documents of one
    # length (segment ids) and/or a sliding window. FLOPs count only the query-key pairs the mask leaves.
    b, s, hq, hkv, d, doc, window = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = _leaf(torch.randn(b, s, hq, d, device=device, generator=g).to(dtype))
    k = _leaf(torch.randn(b, s, hkv, d, device=device, generator=g).to(dtype))
    v = _leaf(torch.randn(b, s, hkv, d, device=device, generator=g).to(dtype))
    pos = torch.arange(s, device=device)
    seg = (pos // doc).expand(b, s).contiguous() if doc else None
    allowed = pos[None, :] <= pos[:, None]
    if seg is not None:
        allowed &= seg[0][:, None] == seg[0][None, :]
    if window:
        allowed &= pos[:, None] - pos[None, :] < window
    pairs = int(allowed.sum())
    kw = dict(causal=True, segment_ids=seg, window=window or None)

    def sdpa(q, k, v):  # torch's SDPA with the same mask as a boolean tensor
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, enable_gqa=hq != hkv
        )
        return out.transpose(1, 2)

    fwd = 4 * b * hq * pairs * d
    return Case(
        inputs=[q, k, v],
        ours=lambda q, k, v: mod.flash_attention(q, k, v, **kw),
        torch_eager=sdpa,
        reference=lambda q, k, v: mod.flash_attention_reference(q, k, v, **kw),
        work_fwd=fwd,
        work_fwdbwd=3.5 * fwd,
    )


SPECS = {
    s.name: s
    for s in (
        Spec("rmsnorm", "kernels.norms", "GB/s", _build_rmsnorm, ((5, 37), (1, 128)), ((8192, 4096), (4096, 16384))),
        Spec("layernorm", "kernels.norms", "GB/s", _build_layernorm, ((5, 37),), ((8192, 4096), (4096, 16384))),
        Spec(  # (batch, seq, heads_q, heads_kv, head_dim)
            "rope",
            "kernels.rope",
            "GB/s",
            _build_rope,
            ((2, 3, 2, 1, 8),),
            ((4, 4096, 32, 8, 128), (1, 8192, 32, 8, 128)),
        ),
        Spec("swiglu", "kernels.glu", "GB/s", _build_swiglu, ((5, 37),), ((8192, 14336), (16384, 8192))),
        Spec(
            "cross_entropy",
            "kernels.cross_entropy_loss",
            "GB/s",
            _build_cross_entropy,
            ((5, 37), (3, 1000)),
            ((8192, 32000), (8192, 131072)),
        ),
        Spec(
            "fused_linear_ce",
            "kernels.linear_cross_entropy",
            "TFLOP/s",
            _build_fused_linear_ce,
            ((5, 16, 37),),
            ((8192, 4096, 32000), (8192, 4096, 131072)),
        ),
        Spec(  # (batch, seq, heads_q, heads_kv, head_dim, causal)
            "flash_attention",
            "kernels.attention",
            "TFLOP/s",
            _build_flash_attention,
            ((1, 19, 2, 1, 16, True),),
            ((4, 2048, 32, 32, 128, True), (2, 4096, 32, 8, 128, True), (4, 2048, 32, 8, 128, False)),
        ),
        Spec(  # (batch, seq, heads_q, heads_kv, head_dim, document length or 0, window or 0), causal
            "flash_attention_masked",
            "kernels.attention",
            "TFLOP/s",
            _build_flash_attention_masked,
            ((1, 37, 2, 1, 16, 9, 0), (1, 37, 2, 1, 16, 0, 17)),
            ((2, 4096, 32, 8, 128, 512, 0), (2, 4096, 32, 8, 128, 0, 512), (2, 4096, 32, 8, 128, 1024, 256)),
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------------
# Running


def _take(fn: Callable, n: int) -> Callable:
    """fn returning the tuple of its first n outputs (a lone tensor is one output): what is compared, timed and
    differentiated. Extra outputs (a third-party op's auxiliary ones) are dropped."""

    def wrapped(*inputs):
        out = fn(*inputs)
        return tuple(out[:n]) if isinstance(out, (tuple, list)) else (out,)

    return wrapped


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_out: list[torch.Tensor] | None = None):
    """Outputs and input gradients of fn(*inputs) (fn returns a tuple, see `_take`) for upstream gradients
    `grad_out`, one per output (ones-like if None)."""
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    gos = grad_out if grad_out is not None else [torch.ones_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(gos, outs)], allow_unused=True)
    return [o.detach() for o in outs], [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def check_case(case: Case, high_precision: torch.dtype) -> tuple[float, float, bool]:
    """(forward error, worst gradient error, pass) of ours against the reference on upcast copies of the inputs.

    fp32/fp64 inputs: max relative error <= 1e-5. Lower precision: the 2x rule, error <= 2x the error of plain torch
    in the same dtype, plus one ulp of the dtype (docs/contracts.md, kernel parity).
    """
    torch.manual_seed(1)
    ours, reference = _take(case.ours, case.outputs), _take(case.reference, case.outputs)
    probe = [o.detach() for o in ours(*case.inputs)]
    grad_out = [torch.randn(o.shape, device=o.device, dtype=torch.float32) for o in probe]
    out, grads = _fwd_bwd(ours, case.inputs, grad_out)
    hp = [_leaf(t.detach().to(high_precision)) for t in case.inputs]
    ref_out, ref_grads = _fwd_bwd(reference, hp, [g.to(high_precision) for g in grad_out])
    errs = [max(_rel_err(o, r) for o, r in zip(out, ref_out))] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
    low = case.inputs[0].dtype in (torch.float16, torch.bfloat16)
    if not low:
        ok = all(e <= 1e-5 for e in errs)
    else:
        same_out, same_grads = _fwd_bwd(_take(case.torch_eager, case.outputs), case.inputs, grad_out)
        base = [max(_rel_err(o, r) for o, r in zip(same_out, ref_out))]
        base += [_rel_err(g, r) for g, r in zip(same_grads, ref_grads)]
        ulp = torch.finfo(case.inputs[0].dtype).eps
        ok = all(e <= 2 * b + ulp for e, b in zip(errs, base))
    return errs[0], max(errs[1:], default=0.0), ok


def _bench(fn: Callable, inputs: list[torch.Tensor], backward: bool, warmup: int, rep: int) -> list[float]:
    """do_bench quantiles (ms) of fn (returning a tuple of outputs, see `_take`), forward or forward+backward."""
    from triton.testing import do_bench

    if not backward:
        return do_bench(lambda: fn(*inputs), warmup=warmup, rep=rep, quantiles=QUANTILES)
    grad_out = [torch.randn_like(o) for o in fn(*inputs)]

    def step():
        torch.autograd.backward(fn(*inputs), grad_out)

    return do_bench(step, warmup=warmup, rep=rep, quantiles=QUANTILES, grad_to_none=inputs)


def _peak_memory_mb(fn: Callable, inputs: list[torch.Tensor]) -> float:
    """Peak device memory of one forward+backward above what was allocated before it (inputs included there)."""
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = fn(*inputs)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in inputs:
        t.grad = None
    return peak / 2**20


def _copy_gbs(warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    src = torch.randn(2**28, device="cuda")  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, quantiles=QUANTILES)[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6  # bytes read + written


def _matmul_tflops(warmup: int, rep: int, n: int = 8192) -> float:
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=warmup, rep=rep, quantiles=QUANTILES)[0]
    return 2 * n**3 / ms / 1e9


def measure_ceilings(warmup: int, rep: int) -> dict[str, float]:
    """Device ceilings measured now: copy bandwidth (bytes read + written) and dense bf16 matmul rate."""
    ceilings = {"GB/s": _copy_gbs(warmup, rep)}
    torch.cuda.empty_cache()
    ceilings["TFLOP/s"] = _matmul_tflops(warmup, rep)
    torch.cuda.empty_cache()
    return ceilings


def _throughput(work: float, ms: float, metric: str) -> float:
    return work / ms / (1e6 if metric == "GB/s" else 1e9)


def _load(spec: Spec):
    """The kernel module, or an 'unavailable: reason' string (missing module, or a name the harness needs)."""
    try:
        return importlib.import_module(spec.module)
    except Exception as exc:  # noqa: BLE001 - a missing or broken kernel module is reported, not fatal
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def run_cpu(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        spec = SPECS[name]
        mod = _load(spec)
        for shape in spec.cpu_shapes:
            row = {"kernel": name, "shape": "x".join(map(str, shape)), "impl": "ours", "dtype": "float32"}
            if isinstance(mod, str):
                rows.append({**row, "status": mod})
                continue
            try:
                case = spec.build(mod, shape, torch.float32, "cpu")
                fwd_err, bwd_err, ok = check_case(case, torch.float64)
                rows.append({**row, "fwd_err": fwd_err, "bwd_err": bwd_err, "status": "ok" if ok else "FAIL"})
            except Exception as exc:  # noqa: BLE001 - one broken kernel must not hide the others' results
                rows.append({**row, "status": f"error ({type(exc).__name__}: {str(exc).splitlines()[0]})"})
    return rows


def run_gpu(
    names: list[str],
    dtype: torch.dtype,
    warmup: int,
    rep: int,
    do_compile: bool,
    device: str = "cuda",
    small: bool = False,
) -> list[dict]:
    """The timed run. `device`/`small` (tiny shapes) exist so the orchestration can be tested without a GPU."""
    ceilings = measure_ceilings(warmup, rep)
    print(f"ceilings measured now: copy {ceilings['GB/s']:.0f} GB/s, bf16 matmul {ceilings['TFLOP/s']:.0f} TFLOP/s")
    rows = []
    for name in names:
        spec = SPECS[name]
        mod = _load(spec)
        for shape in spec.cpu_shapes if small else spec.gpu_shapes:
            base = {"kernel": name, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", "")}
            if isinstance(mod, str):
                rows.append({**base, "impl": "ours", "status": mod})
                continue
            try:
                case = spec.build(mod, shape, dtype, device)
                fwd_err, bwd_err, ok = check_case(case, torch.float32)
            except Exception as exc:  # noqa: BLE001
                rows.append({**base, "impl": "ours", "status": f"error ({type(exc).__name__}: {exc})"[:200]})
                continue
            impls = {"ours": case.ours, "torch": case.torch_eager}
            if do_compile:
                impls["torch.compile"] = torch.compile(case.torch_eager)
            impls.update(case.others)
            impls = {impl: _take(fn, case.outputs) for impl, fn in impls.items()}
            for impl, fn in impls.items():
                row = {**base, "impl": impl, "metric": spec.metric, "status": "ok"}
                if impl == "ours":
                    row.update(fwd_err=fwd_err, bwd_err=bwd_err, status="ok" if ok else "FAIL (2x rule)")
                try:
                    f = _bench(fn, case.inputs, False, warmup, rep)
                    fb = _bench(fn, case.inputs, True, warmup, rep)
                    row.update(fwd_ms=f[0], fwd_p20=f[1], fwd_p80=f[2], fwdbwd_ms=fb[0], fwdbwd_p20=fb[1])
                    row.update(fwdbwd_p80=fb[2], peak_mem_mb=_peak_memory_mb(fn, case.inputs))
                    row["fwd_tput"] = _throughput(case.work_fwd, f[0], spec.metric)
                    row["fwdbwd_tput"] = _throughput(case.work_fwdbwd, fb[0], spec.metric)
                    row["pct_ceiling"] = 100 * row["fwdbwd_tput"] / ceilings[spec.metric]
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing on one shape
                    row["status"] = f"error ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                rows.append(row)
                torch.cuda.empty_cache()
            _add_ratios([r for r in rows if r["kernel"] == name and r["shape"] == base["shape"]])
            del case
            torch.cuda.empty_cache()
    for r in rows:
        name = torch.cuda.get_device_name() if device == "cuda" else device
        r.update(device=name, ceiling_gbs=ceilings["GB/s"], ceiling_tflops=ceilings["TFLOP/s"])
    return rows


def _add_ratios(group: list[dict]) -> None:
    """speedup = best alternative's fwd+bwd time / ours (> 1: ours is faster); mem_ratio likewise for peak memory."""
    ours = next((r for r in group if r["impl"] == "ours" and "fwdbwd_ms" in r), None)
    others = [r for r in group if r["impl"] != "ours" and "fwdbwd_ms" in r]
    if ours is None or not others:
        return
    ours["speedup_vs_best"] = min(r["fwdbwd_ms"] for r in others) / ours["fwdbwd_ms"]
    ours["mem_ratio_vs_best"] = min(r["peak_mem_mb"] for r in others) / max(ours["peak_mem_mb"], 1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Output

CPU_COLUMNS = ["kernel", "shape", "dtype", "fwd_err", "bwd_err", "status"]
GPU_COLUMNS = [
    "kernel",
    "shape",
    "impl",
    "fwd_ms",
    "fwdbwd_ms",
    "fwdbwd_p20",
    "fwdbwd_p80",
    "fwdbwd_tput",
    "metric",
    "pct_ceiling",
    "peak_mem_mb",
    "speedup_vs_best",
    "status",
]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e6)) else f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def flce_memory_summary(rows: list[dict]) -> str | None:
    """The fused vs unfused linear-CE peak memory line at the largest vocabulary benchmarked."""
    flce = [r for r in rows if r["kernel"] == "fused_linear_ce" and "peak_mem_mb" in r]
    if not flce:
        return None
    shape = max({r["shape"] for r in flce}, key=lambda s: int(s.split("x")[-1]))
    mem = {r["impl"]: r["peak_mem_mb"] for r in flce if r["shape"] == shape}
    if "ours" not in mem or "torch" not in mem:
        return None
    return (
        f"fused linear CE memory at {shape} (rows x hidden x vocab): fused {mem['ours']:.0f} MB vs unfused torch "
        f"{mem['torch']:.0f} MB ({mem['torch'] / max(mem['ours'], 1e-9):.1f}x less)"
        + (f"; Liger {mem['liger']:.0f} MB" if "liger" in mem else "")
    )


def write_csv(path: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["timestamp"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"timestamp": stamp, **r})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    p.add_argument("--csv", default=None, help="write one row per (kernel, shape, implementation) here")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="GPU dtype")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        p.error(f"--only: unknown kernel(s) {unknown or names}; choose from {','.join(SPECS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        # Must precede the first `import triton` (the kernel modules import it lazily, below).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(
            "No CUDA device: running the correctness part only (tiny fp32 shapes, ours vs the fp64 torch reference "
            "under the Triton interpreter). Timings, throughput and memory need a GPU."
        )
        rows = run_cpu(args.names)
        table = format_table(rows, CPU_COLUMNS)
    else:
        rows = run_gpu(args.names, getattr(torch, args.dtype), args.warmup, args.rep, not args.no_compile)
        table = format_table(rows, GPU_COLUMNS)
        summary = flce_memory_summary(rows)
        if summary:
            table += "\n" + summary
        table = f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}\n" + table
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    print(table)
    bad = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("unavailable")]
    return 1 if any(r["status"].startswith(("FAIL", "error")) and r["impl"] == "ours" for r in bad) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
