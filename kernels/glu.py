"""Gated linear units (Shazeer 2020, "GLU Variants Improve Transformer"): ``act(gate) * up``, fused forward/backward.

- SwiGLU: ``silu(gate) * up``, silu(a) = a * sigmoid(a).
- GeGLU: ``gelu(gate) * up`` with the **tanh approximation** of GELU (Hendrycks & Gimpel 2016, eq. 2; torch's
  ``F.gelu(approximate="tanh")``), written as ``a * sigmoid(2u)``, u = sqrt(2/pi) * (a + 0.044715 a^3), which equals
  ``0.5 a (1 + tanh(u))`` without tanh (libdevice tanh does not run in the Triton interpreter).

The backward recomputes the activation from the saved inputs instead of storing it, so the op keeps no tensor
beyond gate and up (which the preceding matmuls' backward keeps anyway). Inputs may be row-strided views, e.g. the
two halves of one fused projection (``proj(x).chunk(2, -1)``); they are read in place. All math in fp32 (fp64 for
fp64 inputs).

`SwiGLU` and `GeGLU` are parameter-free module drop-ins taking ``(gate, up)``, or one ``gate_up`` tensor holding
both halves on its last dim (a fused gate/up projection's output).

Backends: the functions and modules take ``backend`` = "auto" | "triton" | "torch" (kernels/utils.py): "auto" runs
the kernel on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the plain-torch reference (``swiglu_reference``
/ ``geglu_reference``, fp32 math, same output dtype) elsewhere.
"""

from __future__ import annotations

import torch

from kernels.utils import (
    as_rows,
    check_backend,
    check_tensors,
    elementwise_tile,
    elementwise_warps,
    import_triton,
    tl_acc_dtype,
    use_triton,
)

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

_SILU, _GELU_TANH = 0, 1


@triton.jit
def _act_and_grad(a, ACT: tl.constexpr):
    """(act(a), act'(a)), computed in a's (fp32 or fp64) dtype."""
    if ACT == 0:
        sg = tl.sigmoid(a)
        return a * sg, sg * (1.0 + a * (1.0 - sg))
    else:
        # 1.5957691216057308 = 2 * sqrt(2 / pi); 0.134145 = 3 * 0.044715
        sg = tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))
        return a * sg, sg + a * sg * (1.0 - sg) * 1.5957691216057308 * (1.0 + 0.134145 * a * a)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == 0:
        return a * tl.sigmoid(a)
    else:
        return a * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))


@triton.jit
def _glu_fwd_kernel(
    G,
    U,
    OUT,
    n_rows,
    n_cols,
    stride_g,
    stride_u,
    stride_o,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    a = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(ACC)
    b = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(OUT + rows * stride_o + cols[None, :], (_act(a, ACT) * b).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DO,
    G,
    U,
    DG,
    DU,
    n_rows,
    n_cols,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    do = tl.load(DO + rows * stride_do + cols[None, :], mask=mask, other=0.0).to(ACC)
    a = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(ACC)
    b = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(ACC)
    act, dact = _act_and_grad(a, ACT)
    tl.store(DG + rows * stride_dg + cols[None, :], (do * b * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols[None, :], (do * act).to(DU.dtype.element_ty), mask=mask)


def _grid(m, n):
    block_m, block_n = elementwise_tile(n)
    return (triton.cdiv(m, block_m), triton.cdiv(n, block_n)), block_m, block_n


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        g2, u2 = as_rows(gate), as_rows(up)
        m, n = g2.shape
        out = torch.empty((m, n), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        grid, block_m, block_n = _grid(m, n)
        if out.numel():
            _glu_fwd_kernel[grid](
                g2,
                u2,
                out,
                m,
                n,
                g2.stride(0),
                u2.stride(0),
                out.stride(0),
                ACT=act,
                ACC=tl_acc_dtype(gate.dtype, up.dtype),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=elementwise_warps(block_m * block_n),
            )
        ctx.save_for_backward(g2, u2)
        ctx.act, ctx.shape, ctx.dtypes = act, gate.shape, (gate.dtype, up.dtype)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        m, n = g2.shape
        do2 = as_rows(dout)
        dg = torch.empty((m, n), dtype=ctx.dtypes[0], device=g2.device)
        du = torch.empty((m, n), dtype=ctx.dtypes[1], device=g2.device)
        grid, block_m, block_n = _grid(m, n)
        if dg.numel():
            _glu_bwd_kernel[grid](
                do2,
                g2,
                u2,
                dg,
                du,
                m,
                n,
                do2.stride(0),
                g2.stride(0),
                u2.stride(0),
                dg.stride(0),
                du.stride(0),
                ACT=ctx.act,
                ACC=tl_acc_dtype(*ctx.dtypes),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=elementwise_warps(block_m * block_n),
            )
        return dg.view(ctx.shape), du.view(ctx.shape), None


def _glu(fn, gate, up, act, backend):
    triton_path = use_triton(fn, backend, gate)
    check_tensors(fn, triton_path, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{fn}: gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    if not triton_path:
        return (swiglu_reference if act == _SILU else geglu_reference)(gate, up)
    return _GLUFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``, fused; output dtype is the promoted dtype of gate and up. ``backend``: "auto" | "triton" |
    "torch", resolved from gate's device at each call (see the module docstring)."""
    return _glu("kernels.swiglu", gate, up, _SILU, backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (tanh-approximate GELU), fused; output dtype is the promoted dtype of gate and up.
    ``backend`` as in `swiglu`."""
    return _glu("kernels.geglu", gate, up, _GELU_TANH, backend)


class _GLU(torch.nn.Module):
    # Subclasses set _fn (the functional op) and _name (for error messages).
    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(f"kernels.{self._name}", backend)

    def extra_repr(self) -> str:
        return "" if self.backend == "auto" else f"backend={self.backend!r}"

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        if up is None:
            gate_up = gate
            if not isinstance(gate_up, torch.Tensor) or gate_up.dim() == 0 or gate_up.shape[-1] % 2:
                shape = tuple(gate_up.shape) if isinstance(gate_up, torch.Tensor) else type(gate_up).__name__
                raise ValueError(
                    f"kernels.{self._name}: a single input must hold gate and up concatenated on its last dim "
                    f"(even size), got {shape}"
                )
            gate, up = gate_up.chunk(2, dim=-1)  # row-strided views, read in place by the kernel
        return self._fn(gate, up, self.backend)


class SwiGLU(_GLU):
    """Parameter-free module: ``forward(gate, up)`` is `swiglu(gate, up)` = ``silu(gate) * up``.

    ``forward(gate_up)`` with one tensor takes gate and up as its first and second halves on the last dim, the
    layout of a fused gate/up projection's output (``gate_up.chunk(2, -1)``, read in place), and returns a tensor
    of half its last dim.

    ``SwiGLU(backend="auto")`` runs the Triton kernel on CUDA tensors (on CPU too under ``TRITON_INTERPRET=1``) and
    `swiglu_reference` elsewhere, decided at each call from the input's device; "triton" forces the kernel (a one-line
    error where it cannot run), "torch" the reference.
    """

    _fn = staticmethod(swiglu)
    _name = "SwiGLU"


class GeGLU(_GLU):
    """Parameter-free module: ``forward(gate, up)`` is `geglu(gate, up)` = ``gelu_tanh(gate) * up``.

    ``forward(gate_up)`` with one tensor takes gate and up as its first and second halves on the last dim, as
    `SwiGLU`. ``backend`` as in `SwiGLU` (the reference here is `geglu_reference`).
    """

    _fn = staticmethod(geglu)
    _name = "GeGLU"


def _compute_dtype(gate, up, upcast):
    dt = torch.promote_types(gate.dtype, up.dtype)
    return (torch.promote_types(dt, torch.float32) if upcast else dt), dt


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Plain-torch ``silu(gate) * up``; math in fp32 (fp64 stays fp64), or in the inputs' dtype if not upcast."""
    ct, dt = _compute_dtype(gate, up, upcast)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(dt)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Plain-torch ``gelu(gate, approximate="tanh") * up``; math in fp32 (fp64 stays fp64) unless not upcast."""
    ct, dt = _compute_dtype(gate, up, upcast)
    return (torch.nn.functional.gelu(gate.to(ct), approximate="tanh") * up.to(ct)).to(dt)
