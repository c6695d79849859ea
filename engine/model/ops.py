"""The backend switch for the model's fused ops (docs/architecture.md, "Backends").

Every op takes `backend` = "auto" | "torch" | "triton" (the `model.kernels` config key) and resolves it per call
from the input's device, so a model built on CPU and moved to CUDA picks the right path:
- "torch": plain PyTorch (`F.scaled_dot_product_attention`, `F.rms_norm`, `F.layer_norm`, `F.cross_entropy`).
- "triton": our kernels (`kernels.*`, imported lazily). On CPU this needs the Triton interpreter
  (`TRITON_INTERPRET=1`); forcing it without one, or without triton installed, is a one-line error.
- "auto": triton on CUDA when triton imports, torch otherwise (always torch on CPU: the interpreter is for tests).
  For RMSNorm/LayerNorm on CUDA, "auto" uses NVIDIA apex's fused norms instead when apex is installed and measured
  faster than our kernel on the first call for that shape and dtype (forward + backward, CUDA events); only in a
  single process, since ranks timing on their own could disagree.

Attention: "auto" on CUDA with fp16/bf16 inputs and no mask uses the flash-attn package when it is installed (an
optional extra); the triton path uses `kernels.flash_attention` (kernels/attention.py: FlashAttention-2 in Triton) when
there is no mask, no dropout and head_dim <= 256; otherwise both backends use `F.scaled_dot_product_attention` (its
FlashAttention-2 / memory-efficient kernels on CUDA). Causal attention with seq_q != seq_k is bottom-right aligned
on every path (query i sees keys j <= i + seq_k - seq_q).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

from engine.config import ConfigError

BACKENDS = ("auto", "torch", "triton")


class BackendError(ConfigError):
    """A forced backend that cannot run here; the message is one line."""


@functools.cache
def _triton_importable() -> bool:
    # find_spec does not import triton, so calling this from "auto" on CPU stays cheap and side-effect free.
    return importlib.util.find_spec("triton") is not None


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    """Validates a backend name up front (model construction), before any device is known."""
    if backend not in BACKENDS:
        raise BackendError(f"model.kernels must be one of {'|'.join(BACKENDS)}, got '{backend}'")
    if backend == "triton" and not _triton_importable():
        raise BackendError("model.kernels=triton needs the triton package (pip install triton); use auto or torch")


def select(backend: str, x: torch.Tensor) -> str:
    """Resolves `backend` for a tensor on x's device to "torch" or "triton"."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_importable() else "torch"
    if backend == "triton":
        check_backend(backend)
        if not x.is_cuda and not _interpreter_on():
            raise BackendError(
                f"model.kernels=triton on {x.device.type} needs CUDA or TRITON_INTERPRET=1; use auto or torch"
            )
        return "triton"
    raise BackendError(f"model.kernels must be one of {'|'.join(BACKENDS)}, got '{backend}'")


# Kernel name -> module, so that `_has_kernel` can ask whether a kernel family exists without importing it.
_KERNEL_MODULES = {
    "rms_norm": "kernels.norms",
    "layer_norm": "kernels.norms",
    "apply_rope": "kernels.rope",
    "swiglu": "kernels.glu",
    "cross_entropy": "kernels.cross_entropy_loss",
    "fused_linear_cross_entropy": "kernels.linear_cross_entropy",
    "vocab_parallel_fused_linear_cross_entropy": "kernels.linear_cross_entropy",
    "flash_attention": "kernels.attention",  # not kernels/flash_attention.py: a module would shadow the function
}


def _kernel(name: str):
    """Loads the kernel function `name` on first use (importing `kernels` itself imports no triton)."""
    return getattr(importlib.import_module(_KERNEL_MODULES[name]), name)


@functools.cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_kernel(name: str) -> bool:
    return importlib.util.find_spec(_KERNEL_MODULES[name]) is not None


@functools.cache
def _apex_norm(op: str):
    """apex's fused `op` ("rms_norm" | "layer_norm") as fn(x, weight, bias, eps) with our dtype rule (out has x's
    dtype, weight may be fp32 under autocast), or None when NVIDIA apex with its CUDA norms is not installed (the PyPI
    package named apex is an unrelated project, hence the import of the exact function)."""
    try:
        from apex.normalization.fused_layer_norm import (
            FusedLayerNormAffineMixedDtypesFunction,
            FusedRMSNormAffineMixedDtypesFunction,
        )
    except Exception:  # ImportError, or apex built without its CUDA extensions
        return None
    if op == "rms_norm":
        return lambda x, w, b, eps: FusedRMSNormAffineMixedDtypesFunction.apply(x, w, (x.shape[-1],), eps).to(x.dtype)
    return lambda x, w, b, eps: FusedLayerNormAffineMixedDtypesFunction.apply(x, w, b, (x.shape[-1],), eps).to(x.dtype)


def _cuda_time_ms(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() on the current CUDA stream (after a warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=64)
def _apex_faster(
    op: str, rows: int, hidden: int, dtype: torch.dtype, wdtype: torch.dtype, bias: bool, dev: int
) -> bool:
    """Times apex against our kernel, forward + backward, on random inputs of this shape (rows bucketed to a power
    of two by the caller so a run measures once per norm shape); True if apex is faster."""
    device = torch.device("cuda", dev)
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    w = torch.ones(hidden, dtype=wdtype, device=device, requires_grad=True)
    b = torch.zeros(hidden, dtype=wdtype, device=device, requires_grad=True) if bias else None
    grad = torch.randn_like(x)
    ours, theirs = _kernel(op), _apex_norm(op)

    def run(fn):
        return lambda: torch.autograd.grad(fn(), [t for t in (x, w, b) if t is not None], grad)

    # The first call may come from an evaluation under no_grad/inference_mode; the timing needs autograd.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
        if op == "rms_norm":
            t_ours = _cuda_time_ms(run(lambda: ours(x, w, 1e-5)))
        else:
            t_ours = _cuda_time_ms(run(lambda: ours(x, w, b, 1e-5)))
        t_apex = _cuda_time_ms(run(lambda: theirs(x, w, b, 1e-5)))
    return t_apex < t_ours


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _norm_backend(op: str, backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The implementation of a norm of x: "torch", "triton", or "apex" (only from "auto", on CUDA, when faster)."""
    chosen = select(backend, x)
    if backend != "auto" or chosen != "triton" or weight is None or (op == "layer_norm" and bias is None):
        return chosen  # apex's affine norms need the weight (and the bias)
    if _apex_norm(op) is None or _distributed():
        # Ranks timing on their own could choose differently near parity, and replicas of a norm would then drift
        # apart by rounding: under torch.distributed "auto" keeps our kernel.
        return chosen
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return chosen  # no timing inside a trace or a CUDA graph capture
    rows = 1 << max(x.numel() // x.shape[-1] - 1, 0).bit_length()
    faster = _apex_faster(op, rows, x.shape[-1], x.dtype, weight.dtype, bias is not None, x.device.index or 0)
    return "apex" if faster else chosen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight."""
    impl = _norm_backend("rms_norm", backend, x, weight, None)
    if impl == "apex":
        return _apex_norm("rms_norm")(x, weight, None, eps)
    if impl == "triton":
        return _kernel("rms_norm")(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """LayerNorm over the last dim (Ba et al. 2016)."""
    impl = _norm_backend("layer_norm", backend, x, weight, bias)
    if impl == "apex":
        return _apex_norm("layer_norm")(x, weight, bias, eps)
    if impl == "triton":
        return _kernel("layer_norm")(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim // 2) in fp32 (RoFormer, Su et al. 2021: freq_i = theta^(-2i/d))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: str = "auto",
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding, half-rotation convention: x (b, s, h, d); cos, sin (s, d/2), row i for token i; or with
    `positions` (b, s) the rows of each token's position (tables of at least max(positions) + 1 rows): positions that
    restart per packed document, or a context-parallel rank's chunks of the sequence."""
    if select(backend, x) == "triton":
        return _kernel("apply_rope")(x, cos, sin, position_ids=positions)
    x1, x2 = x.float().chunk(2, dim=-1)
    if positions is None:
        c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    else:
        c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020): silu(gate) * up."""
    if select(backend, gate) == "triton":
        return _kernel("swiglu")(gate, up)
    return F.silu(gate) * up


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    segment_ids: torch.Tensor | None = None,
    window: int | None = None,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on (batch, seq, heads, head_dim) tensors; k/v may have fewer heads (GQA).

    `mask` (optional, broadcastable to (batch, heads, seq_q, seq_k)): bool (True = may attend) or additive float;
    with `causal` it is combined with the causal mask. `segment_ids` (batch, seq) ints (self-attention): a query sees
    only keys of its own segment (documents packed in one row). `window`: sliding window, key j visible to query i
    iff i - window < j <= i (causal) or |i - j| < window, bottom-right aligned as the causal mask.
    `prefix_lengths` (batch,) ints, with `causal` (prefix LM): keys j < prefix_lengths[b] are visible to every query
    of row b as well, the prefix attending bidirectionally. Returns (batch, seq_q, heads_q, head_dim).
    """
    plain = segment_ids is None and window is None and prefix_lengths is None
    if (
        backend == "auto"
        and plain
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and _flash_attn_installed()
    ):
        # an installed specialist library first (flash-attn takes (b, s, h, d) and GQA as is)
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
    if (
        mask is None
        and dropout_p == 0.0
        and select(backend, q) == "triton"
        and _has_kernel("flash_attention")
        and q.shape[-1] <= 256
    ):
        return _kernel("flash_attention")(
            q, k, v, causal=causal, segment_ids=segment_ids, window=window, prefix_lengths=prefix_lengths
        )
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qh.shape[1] != kh.shape[1]
    sq, sk = q.shape[1], k.shape[1]
    allowed = None
    if not plain:  # the kernel module's mask (its semantics and checks); importing it imports triton, if installed
        allowed = importlib.import_module("kernels.attention").attention_mask("attention", q, k, causal, segment_ids,
                                                                              window, prefix_lengths)
    if allowed is not None:  # folded into one boolean mask (True = may attend) for SDPA, causal triangle included
        allowed = allowed.reshape(-1, 1, sq, sk)  # 4-D (batch or 1, 1, sq, sk): a 3-D one changes the output layout
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
        causal = False  # already in `allowed` (widened by a prefix, so the triangle must not be ANDed again)
    if causal and (mask is not None or sq != sk):
        # SDPA's is_causal is top-left aligned; ours (and flash-attn's) is bottom-right: an explicit mask
        tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        if mask is None:
            mask = tri
        elif mask.dtype == torch.bool:
            mask = mask & tri
        else:
            mask = mask + torch.zeros(sq, sk, dtype=mask.dtype, device=q.device).masked_fill(~tri, float("-inf"))
        causal = False
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    """Cross-entropy over targets != ignore_index, the mean (or with reduction "sum" the sum); logits (n, vocab),
    target (n,). Computed in fp32."""
    if select(backend, logits) == "triton":
        return _kernel("cross_entropy")(logits, target, ignore_index=ignore_index, reduction=reduction)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T (mean or sum over targets != ignore_index); the triton path never
    materialises all the logits."""
    if select(backend, hidden) == "triton":
        fn = _kernel("fused_linear_cross_entropy")
        return fn(hidden, weight, target, ignore_index=ignore_index, reduction=reduction)
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=ignore_index, reduction=reduction)
