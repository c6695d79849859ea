"""RMSNorm and LayerNorm over the last dim: fused Triton forward and backward, autograd Function, torch reference.

- RMSNorm (Zhang & Sennrich 2019): ``y = h / sqrt(mean(h^2) + eps) * w``.
- LayerNorm (Ba et al. 2016): ``y = (h - mean(h)) / sqrt(var(h) + eps) * w + b``, biased variance.

``h`` is ``x``, or ``x + residual`` when a residual is given: pre-norm blocks then get the normalised tensor and the
new residual stream from one pass over memory (the sum is returned too). ``zero_centered=True`` stores the weight as
``gamma - 1`` and uses ``(1 + weight)`` (Megatron's ``apply_layernorm_1p``, Gemma), so weight decay pulls gamma
towards 1 instead of 0.

Numerics: statistics, the weight multiply and every gradient are computed in fp32 (fp64 for fp64 inputs); the
output is rounded once (Gemma's order, not Llama's cast-before-weight). When a residual is given the sum is rounded to
its storage dtype first and the normalised tensor is computed from that rounded sum, so ``out == norm(h)`` exactly
for the returned ``h``. Weight/bias gradients are reduced deterministically: each backward program sums its rows
into one fp32 row of a ``[programs, hidden]`` buffer, which torch then sums in a fixed order (no atomics).

Backends: every function and module here takes ``backend`` = "auto" | "triton" | "torch" (kernels/utils.py): "auto"
runs the kernel on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the plain-torch reference
(``rms_norm_reference`` / ``layer_norm_reference``, fp32 math, same outputs and dtypes) elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.utils import (
    acc_dtype,
    as_rows,
    check_backend,
    check_tensors,
    import_triton,
    num_reduction_programs,
    num_warps_for,
    row_tile,
    tl_acc_dtype,
    use_triton,
)

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run


def launch_config(n_cols: int, fn: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, forward warps, backward warps) for rows of `n_cols`.

    Rows up to 4096 wide go two or more to a program (8192 elements) with 4 warps forward, 8 backward: the best of
    `benchmarks/sweep_kernels.py` on an H200 at 8192 x 4096 bf16 (benchmarks/RESULTS.md), the backward 1.5-2x faster
    than one row per program with 8/16 warps. Wider rows keep one row per program and Liger's warps (twice as many
    backward, where more tensors are live per element), which already beat torch at 16384 wide.
    """
    block_m, block_n = row_tile(n_cols, fn, budget=8192)
    if block_n <= 4096:
        return block_m, block_n, 4, 8
    warps = num_warps_for(block_m * block_n)
    return block_m, block_n, warps, min(32, 2 * warps)


@triton.jit
def _norm_fwd_kernel(
    X,
    R,
    H,
    Y,
    W,
    B,
    MEAN,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program normalises BLOCK_M whole rows held in registers.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(ACC)  # normalise the rounded sum that is returned (and re-read by the backward)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n_cols
        tl.store(MEAN + rows, mean, mask=row_mask)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
        if ZERO_CENTERED:
            w = w + 1.0
        y = y * w[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY,
    H,
    W,
    MEAN,
    RSTD,
    DH,
    DX,
    DW,
    DB,
    n_rows,
    n_cols,
    n_tiles,
    stride_dy,
    stride_h,
    stride_dh,
    stride_dx,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    HAS_DH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent: program p handles row tiles p, p + P, p + 2P, ... and writes one fp32 partial row of dW / dB.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
        if ZERO_CENTERED:
            w = w + 1.0
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        x = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
            dw += tl.sum(dy * xhat, axis=0)
        else:
            g = dy
        if HAS_B:
            db += tl.sum(dy, axis=0)
        # d/dx of the normalisation: rstd * (g - xhat * mean(g * xhat) [- mean(g) for LayerNorm]).
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / n_cols
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DH:  # the gradient reaching the returned residual sum adds straight onto dh
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + pid * n_cols + cols, dw, mask=col_mask)
    if HAS_B:
        tl.store(DB + pid * n_cols + cols, db, mask=col_mask)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms, zero_centered, fn):
        shape, n = x.shape, x.shape[-1]
        x2 = as_rows(x)
        weight = None if weight is None else weight.contiguous()  # the kernels read weight and bias with stride 1
        bias = None if bias is None else bias.contiguous()
        m = x2.shape[0]
        block_m, block_n, fwd_warps, bwd_warps = launch_config(n, fn)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if residual is not None:
            r2 = as_rows(residual)
            h2 = torch.empty((m, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        else:
            r2, h2 = x2, x2
        acc = acc_dtype(x.dtype, None if residual is None else residual.dtype)
        rstd = torch.empty(m, dtype=acc, device=x.device)
        mean = rstd if is_rms else torch.empty(m, dtype=acc, device=x.device)
        if m > 0:
            _norm_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2,
                r2,
                h2,
                y,
                x2 if weight is None else weight,
                x2 if bias is None else bias,
                mean,
                rstd,
                m,
                n,
                x2.stride(0),
                r2.stride(0),
                h2.stride(0),
                y.stride(0),
                eps,
                IS_RMS=is_rms,
                HAS_RES=residual is not None,
                HAS_W=weight is not None,
                HAS_B=bias is not None,
                ZERO_CENTERED=zero_centered,
                ACC=tl_acc_dtype(acc),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=fwd_warps,
            )
        ctx.save_for_backward(h2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.zero_centered, ctx.shape, ctx.tile = is_rms, zero_centered, shape, (block_m, block_n, bwd_warps)
        ctx.x_dtype = x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h2.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = h2.shape
        block_m, block_n, bwd_warps = ctx.tile
        if dy is None:  # only the residual sum was used downstream
            dy = torch.zeros(ctx.shape, dtype=ctx.x_dtype, device=h2.device)
        dy2 = as_rows(dy)
        dh2 = as_rows(dh) if dh is not None else dy2
        dx = torch.empty((m, n), dtype=h2.dtype, device=h2.device)
        n_tiles = triton.cdiv(m, block_m)
        programs = num_reduction_programs(h2.device, n_tiles, per_sm=4)  # 4 a SM: best of the H200 sweep
        acc = rstd.dtype
        dw_part = torch.zeros((programs, n), dtype=acc, device=h2.device) if weight is not None else None
        db_part = torch.zeros((programs, n), dtype=acc, device=h2.device) if bias is not None else None
        if m > 0:
            _norm_bwd_kernel[(programs,)](
                dy2,
                h2,
                h2 if weight is None else weight,
                mean,
                rstd,
                dh2,
                dx,
                h2 if dw_part is None else dw_part,
                h2 if db_part is None else db_part,
                m,
                n,
                n_tiles,
                dy2.stride(0),
                h2.stride(0),
                dh2.stride(0),
                dx.stride(0),
                IS_RMS=ctx.is_rms,
                HAS_W=weight is not None,
                HAS_B=bias is not None,
                ZERO_CENTERED=ctx.zero_centered,
                HAS_DH=dh is not None,
                ACC=tl_acc_dtype(acc),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=bwd_warps,
            )
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        dx = dx.view(ctx.shape)
        dres = None if ctx.res_dtype is None else dx.to(ctx.res_dtype)
        return dx.to(ctx.x_dtype), dw, db, dres, None, None, None, None


def _check(fn, x, weight, bias, residual, need_triton=True):
    check_tensors(fn, need_triton, x=x, weight=weight, bias=bias, residual=residual)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dim (the normalised last dim), got a scalar")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{fn}: the last dim of x (the normalised dim) has size 0")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{fn}: {name} has shape {tuple(p.shape)}, expected ({n},) (the last dim of x)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{fn}: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``h`` over the last dim, ``h = x`` or ``x + residual``; returns ``out`` or ``(out, h)``.

    ``out`` has x's dtype; ``h`` has the promoted dtype of x and residual. ``zero_centered`` uses ``1 + weight``.
    ``backend``: "auto" | "triton" | "torch", resolved from x's device at each call (see the module docstring).
    """
    fn = "kernels.rms_norm"
    if not use_triton(fn, backend, x):
        _check(fn, x, weight, None, residual, need_triton=False)
        return rms_norm_reference(x, weight, eps, residual, zero_centered)
    _check(fn, x, weight, None, residual)
    return _NormFunction.apply(x, weight, None, residual, float(eps), True, bool(zero_centered), fn)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``h`` over the last dim, ``h = x`` or ``x + residual``; returns ``out`` or ``(out, h)``.

    ``out`` has x's dtype; ``h`` has the promoted dtype of x and residual. ``zero_centered`` uses ``1 + weight``.
    ``backend``: "auto" | "triton" | "torch", resolved from x's device at each call (see the module docstring).
    """
    fn = "kernels.layer_norm"
    if not use_triton(fn, backend, x):
        _check(fn, x, weight, bias, residual, need_triton=False)
        return layer_norm_reference(x, weight, bias, eps, residual, zero_centered)
    _check(fn, x, weight, bias, residual)
    return _NormFunction.apply(x, weight, bias, residual, float(eps), False, bool(zero_centered), fn)


def _reference(x, weight, bias, eps, residual, zero_centered, upcast, is_rms):
    h = x if residual is None else x + residual
    ct = torch.promote_types(h.dtype, torch.float32) if upcast else h.dtype
    hf = h.to(ct)
    if not is_rms:
        hf = hf - hf.mean(-1, keepdim=True)
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * ((weight.to(ct) + 1) if zero_centered else weight.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    out = y.to(x.dtype)
    return out if residual is None else (out, h)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    upcast: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RMSNorm with `rms_norm`'s semantics; math in fp32 (fp64 stays fp64), or x's dtype if not upcast."""
    return _reference(x, weight, None, eps, residual, zero_centered, upcast, True)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    zero_centered: bool = False,
    upcast: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch LayerNorm with `layer_norm`'s semantics; math in fp32 (fp64 stays fp64), or x's dtype if not
    upcast."""
    return _reference(x, weight, bias, eps, residual, zero_centered, upcast, False)


class RMSNorm(nn.Module):
    """Drop-in RMSNorm module; ``forward(x, residual=None)`` as `rms_norm`.

    ``backend`` = "auto" (default) runs the fused Triton kernel on CUDA tensors (on CPU too under
    ``TRITON_INTERPRET=1``) and `rms_norm_reference` elsewhere, decided at each call from x's device, so one model
    develops on a CPU-only machine and trains on a GPU unchanged; "triton" forces the kernel (a one-line error where it
    cannot run), "torch" the reference.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        zero_centered: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.hidden_size, self.eps, self.zero_centered = hidden_size, eps, zero_centered
        self.backend = check_backend("kernels.RMSNorm", backend)
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Identity at init: gamma = 1, stored as 0 when zero-centred.
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, self.zero_centered, self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"{self.hidden_size}, eps={self.eps}, zero_centered={self.zero_centered}{extra}"


class LayerNorm(nn.Module):
    """Drop-in LayerNorm module; ``forward(x, residual=None)`` as `layer_norm`.

    ``backend`` = "auto" (default) runs the fused Triton kernel on CUDA tensors (on CPU too under
    ``TRITON_INTERPRET=1``) and `layer_norm_reference` elsewhere, decided at each call from x's device; "triton"
    forces the kernel (a one-line error where it cannot run), "torch" the reference.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        bias: bool = True,
        zero_centered: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.hidden_size, self.eps, self.zero_centered = hidden_size, eps, zero_centered
        self.backend = check_backend("kernels.LayerNorm", backend)
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual, self.zero_centered, self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        bias = self.bias is not None
        return f"{self.hidden_size}, eps={self.eps}, bias={bias}, zero_centered={self.zero_centered}{extra}"
