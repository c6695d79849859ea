"""Cross-entropy over a large vocabulary with the gradient computed in the forward pass.

One Triton program per row streams the row's logits twice: an online softmax (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax") gives the max `m`, the sum of exponentials `d` (so
`lse = m + log d`), the row sum and the target logit; a second sweep writes `dloss/dlogits` (already scaled by
`1/n_valid` for the mean) into a buffer or into the logits themselves. Backward then only multiplies that buffer by
`grad_output`: there is no second pass over the logits in backward and no saved softmax (Liger-Kernel's scheme).

Per row with target `t`, vocabulary `V`, label smoothing `eps` and z-loss coefficient `z` (PaLM, Chowdhery et al.
2022, sec. 5: `z * lse^2` keeps the normaliser near 0):

    loss = (1 - eps) * (lse - x_t) + eps * (lse - sum(x) / V) + z * lse^2
    dloss/dx_i = softmax_i * (1 + 2 z lse) - (1 - eps) [i == t] - eps / V

Rows whose target is `ignore_index` give loss 0 and gradient 0; the mean divides by the number of other rows, and is
0 (not NaN, as in `torch.nn.functional.cross_entropy`) when every row is ignored.

Low precision. The buffer has the logits' dtype (it is as large as the logits: an fp32 buffer for fp16 logits would
double the memory this kernel exists to save), and backward's `grad_output` (the loss scale of a GradScaler, e.g.
65536, or 1 / accumulation steps) is applied in fp32 by a small Triton kernel that rounds once to the buffer's dtype;
it is never narrowed itself (65536 is inf in fp16, and bf16 would round 1/3 to 8 bits). bf16 has fp32's exponent
range, so its buffer holds the final gradient up to that factor, `1/n_valid` included, as fp32's does. fp16 does not:
at 16k tokens and a 50k vocabulary, `softmax_i / n_valid` is ~1e-9, below fp16's smallest subnormal (6e-8), and every
non-target entry would flush to zero before any loss scale could rescue it. So for fp16 the forward stores each row's
own gradient times a power of two `P` (`fp16_prescale`: the largest with `P * max|dloss_row/dx| <= 65504` for every
finite fp16 input, 2^14 without z-loss), which puts softmax entries down to ~4e-9 in fp16's normal range; backward
multiplies by `grad_output / (n_valid * P)` in fp32. The result equals an fp16 rounding of the exact scaled gradient
up to one more rounding, and overflows only where the scaled gradient itself exceeds fp16 (which a GradScaler sees as
inf and answers by lowering its scale).

Backends: `cross_entropy` and `CrossEntropyLoss` take ``backend`` = "auto" | "triton" | "torch" (kernels/utils.py):
"auto" runs the kernel on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), elsewhere `cross_entropy_reference`
on the logits upcast to fp32 (the kernel's math and fp32 loss; the gradient reaches the logits in their dtype;
``inplace_backward`` is ignored there).
"""

from __future__ import annotations

import math

import torch

from kernels.utils import (
    acc_dtype,
    check_backend,
    check_tensors,
    elementwise_warps,
    import_triton,
    interpreting,
    num_warps_for,
    tl_acc_dtype,
    use_triton,
)

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

REDUCTIONS = ("mean", "sum", "none")
# Largest vocabulary block one loop iteration loads; longer rows loop. On GPU Liger-Kernel's choice (32k lanes over
# 32 warps: many bytes in flight per row); in the interpreter 4096, so CPU tests reach the multi-block path cheaply.
MAX_BLOCK_GPU = 32768
MAX_BLOCK_INTERPRETER = 4096
FP16_MAX = 65504.0
SCALE_BLOCK = 4096  # elements per program of the backward's scaling pass (8 a thread at 16 warps)


# ---------------------------------------------------------------------------------------------------------------------
# Triton building blocks (shared with kernels/linear_cross_entropy.py)


@triton.jit
def _row_stats(x_ptr, V, t_local, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Online softmax over one row of `V` logits: returns (max, sum exp(x - max), sum x, x[t_local] or 0)."""
    m = tl.full([], float("-inf"), ACC)
    d = tl.zeros([], ACC)
    s = tl.zeros([], ACC)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix (masked vocab) must not give NaN
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        s += tl.sum(tl.where(mask, x, 0.0), 0)
        m = m_new
    has_t = (t_local >= 0) & (t_local < V)
    x_t = tl.load(x_ptr + tl.where(has_t, t_local, 0), mask=has_t, other=0.0).to(ACC)
    x_t = tl.where(has_t, x_t, 0.0)
    return m, d, s, x_t


@triton.jit
def _row_grad(x_ptr, g_ptr, V, t_local, lse, scale, smooth_u, one_minus_eps, z, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Writes scale * (softmax(x) * (1 + 2 z lse) - (1 - eps) onehot(t_local) - eps / V_global) for one row."""
    coef = 1.0 + 2.0 * z * lse
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.exp(x - lse) * coef - smooth_u - tl.where(offs == t_local, one_minus_eps, 0.0)
        tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_zero(g_ptr, V, BLOCK: tl.constexpr):
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(g_ptr + offs, tl.zeros([BLOCK], g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _ce_fwd_kernel(
    x_ptr,
    stride_x,
    g_ptr,
    stride_g,
    t_ptr,
    loss_ptr,
    lse_ptr,
    scale_ptr,
    V,
    ignore_index,
    eps,
    z,
    HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """One row: loss, lse and (if HAS_GRAD) the scaled gradient. g_ptr may alias x_ptr (in-place gradient)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    t = tl.load(t_ptr + row)
    if t == ignore_index:
        tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
        tl.store(lse_ptr + row, tl.zeros([], lse_ptr.dtype.element_ty))
        if HAS_GRAD:
            _row_zero(g_row, V, BLOCK)
    else:
        m, d, s, x_t = _row_stats(x_row, V, t, BLOCK, ACC)
        lse = m + tl.log(d)
        loss = lse - (1.0 - eps) * x_t - (eps / V) * s + z * lse * lse
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
        tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
        if HAS_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            _row_grad(x_row, g_row, V, t, lse, scale, eps / V, 1.0 - eps, z, BLOCK, ACC)


@triton.jit
def _scale_rows_kernel(g_ptr, stride_g, f_ptr, n_cols, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """g[row, :] *= f[row] (PER_ROW) or f[0], in place: the product in fp32, rounded once to g's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    if PER_ROW:
        f = tl.load(f_ptr + row).to(tl.float32)
    else:
        f = tl.load(f_ptr).to(tl.float32)
    ptrs = g_ptr + row * stride_g + offs
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (g * f).to(g_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Host side


def launch_config(V: int, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of V logits."""
    max_block = MAX_BLOCK_INTERPRETER if interpreting() else MAX_BLOCK_GPU
    block = block or min(max_block, triton.next_power_of_2(V))
    return block, num_warps_for(block)


def check_targets(
    name: str, target: torch.Tensor, n_rows: int, V: int, ignore_index: int, device: torch.device
) -> torch.Tensor:
    """Flattens `target` and validates it; the range check runs on CPU tensors only (on GPU it would force a sync)."""
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name}: target must be an integer tensor, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"{name}: target is on {target.device} but the inputs are on {device}")
    t = target.reshape(-1)
    if t.numel() != n_rows:
        raise ValueError(f"{name}: target has {t.numel()} elements but there are {n_rows} rows of logits")
    if t.device.type == "cpu" and n_rows:
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            raise ValueError(f"{name}: target {int(t[bad][0])} is outside [0, {V}) and is not ignore_index")
    return t if t.dtype == torch.int64 else t.long()


def check_options(name: str, label_smoothing: float, z_loss: float, reduction: str) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"{name}: z_loss must be >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def loss_scale(t: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(n_valid, 1) for the mean, else 1, as a 1-element device tensor (no host sync)."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=t.device)
    return (t != ignore_index).sum().clamp(min=1).to(dtype).reciprocal().reshape(1)


def grad_bound(z_loss: float) -> float:
    """A bound on sum_i |dloss_row/dx_i| (so also on each entry) for finite fp16 logits: softmax sums to 1, the
    smoothing and target terms to at most 1, and |1 + 2 z lse| <= 1 + z * 2^17 since |lse| < 2^16."""
    return 2.0 + float(z_loss) * 2.0**17


def fp16_prescale(z_loss: float) -> float:
    """The power of two `P` by which the fp16 forward multiplies each row's gradient before storing it: the largest
    with `P * grad_bound(z_loss) <= 65504`, so no input can make it overflow (2^14 without z-loss, 2^12 at 1e-4)."""
    return 2.0 ** math.floor(math.log2(FP16_MAX / grad_bound(z_loss)))


def stored_grad_scale(
    scale: torch.Tensor, dtype: torch.dtype, z_loss: float, operand_max: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(factor the forward writes the gradient with, factor backward still owes it or None), 1-element tensors.

    `scale` is `loss_scale`'s 1/n_valid (or 1). Other dtypes than fp16 store the loss's gradient itself. fp16 stores
    `P` times each row's gradient, `P = fp16_prescale(z_loss)`, and owes `scale / P` (see the module docstring).
    When the stored gradient feeds an fp16 GEMM with a matrix whose largest magnitude is `operand_max` (a device
    tensor: no host sync), P is also at most 2^15 / (grad_bound * operand_max), so that GEMM's sums cannot overflow.
    """
    if dtype != torch.float16:
        return scale, None
    p = torch.full_like(scale, fp16_prescale(z_loss))
    if operand_max is not None:
        m = operand_max.detach().to(scale.dtype).reshape(1).clamp(min=2.0**-24)
        p = torch.minimum(p, torch.exp2(torch.floor(torch.log2(32768.0 / (grad_bound(z_loss) * m)))))
        p = p.clamp(min=2.0**-24)  # inf/NaN weights: NaN gradients, as unfused, not a zero scale
    return p, scale / p


def ce_forward_rows(
    x: torch.Tensor,
    t: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the fused kernel on 2-D `x` (last dim contiguous); fills `grad` (may be `x`). Returns (loss, lse)."""
    N, V = x.shape
    acc = acc_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    lse = torch.empty(N, dtype=acc, device=x.device)
    if N == 0:
        return loss, lse
    BLOCK, num_warps = launch_config(V, block)
    g = grad if grad is not None else x
    _ce_fwd_kernel[(N,)](
        x,
        x.stride(0),
        g,
        g.stride(0),
        t,
        loss,
        lse,
        scale,
        V,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        HAS_GRAD=grad is not None,
        BLOCK=BLOCK,
        ACC=tl_acc_dtype(x.dtype),
        num_warps=num_warps,
    )
    return loss, lse


def reduce_loss(loss_rows: torch.Tensor, scale: torch.Tensor, reduction: str, shape: torch.Size) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.reshape(shape)
    total = loss_rows.sum()
    return total * scale[0] if reduction == "mean" else total


def scale_grad_(
    grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool = False, owed: torch.Tensor | None = None
) -> torch.Tensor:
    """grad *= grad_output * owed in place (grad_output per row of `grad` if `per_row`; `owed` a 1-element tensor).

    The factor is formed and applied in fp32 (fp64 for fp64 buffers) and the product rounded once to grad's dtype:
    grad_output is never narrowed to grad's dtype (a GradScaler's 65536 is inf in fp16). Free when there is nothing
    owed and grad_output is the scalar 1 (an unscaled loss; one host sync, cheaper than a pass over the buffer).
    The in-place scaling bumps the saved buffer's version, so autograd refuses a second backward after it (only a free
    call leaves the buffer intact, e.g. for gradcheck).
    """
    if owed is None and not per_row and bool(grad_output == 1):
        return grad
    acc = acc_dtype(grad.dtype)
    f = grad_output.detach().to(acc).reshape(-1)
    if owed is not None:
        f = f * owed.to(acc).reshape(1)
    if grad.dtype == acc:
        return grad.mul_(f.reshape(-1, 1) if per_row else f.reshape(()))
    g2 = grad if grad.dim() == 2 else grad.view(-1, grad.shape[-1])
    if g2.numel() == 0:
        return grad
    if g2.stride(1) != 1:  # the buffers made here are always unit-stride along the last dim
        raise ValueError(f"scale_grad_: the gradient buffer needs a unit last-dim stride, got {tuple(g2.stride())}")
    block = max(16, min(SCALE_BLOCK, triton.next_power_of_2(g2.shape[1])))
    _scale_rows_kernel[(g2.shape[0], triton.cdiv(g2.shape[1], block))](
        g2,
        g2.stride(0),
        f.contiguous(),
        g2.shape[1],
        PER_ROW=per_row,
        BLOCK=block,
        num_warps=elementwise_warps(block),
    )
    torch.autograd.graph.increment_version(grad)  # written through a pointer: tell autograd, as an in-place op would
    return grad


def _cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss, reduction, inplace, block, need_grad):
    """(loss, gradient buffer or None, factor owed or None). The buffer has logits' shape and dtype and holds
    dloss/dlogits, for fp16 up to the factor backward still owes it (see `stored_grad_scale`)."""
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits must have a non-empty last (vocab) dim, got {tuple(logits.shape)}")
    check_tensors("cross_entropy", logits=logits)
    shape, V = logits.shape, logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = check_targets("cross_entropy", target, x.shape[0], V, ignore_index, x.device)
    scale = loss_scale(t, ignore_index, reduction, acc_dtype(x.dtype))
    stored, owed = stored_grad_scale(scale, x.dtype, z_loss)
    grad = None
    if need_grad:
        grad = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    loss_rows, _ = ce_forward_rows(x, t, grad, stored, ignore_index, label_smoothing, z_loss, block)
    return reduce_loss(loss_rows, scale, reduction, shape[:-1]), grad, owed


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: the gradient is computed in forward; backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, reduction, inplace_backward, block):
        loss, grad, owed = _cross_entropy_forward(
            logits, target, ignore_index, label_smoothing, z_loss, reduction, inplace_backward, block, True
        )
        ctx.reduction, ctx.shape, ctx.owed = reduction, logits.shape, owed
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale_grad_(grad, grad_output, per_row=ctx.reduction == "none", owed=ctx.owed)
        return grad.view(ctx.shape), None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `logits` (..., V) against integer `target` (...), with the gradient computed in forward.

    Returns an fp32 loss (fp64 for fp64 logits): the mean over non-ignored targets (0 if all are ignored), the sum,
    or per-row losses (`reduction="none"`). `z_loss` adds `z_loss * logsumexp^2` per row. `inplace_backward=True`
    writes the gradient over `logits` (saves a logits-sized buffer; only when nothing else reads the logits later).
    The gradient buffer is scaled in place in backward, so backward runs once (or any times with grad_output 1, except
    for fp16, whose buffer always owes a factor). fp16 logits take a GradScaler's loss scale (see the module docstring).
    ``backend``: "auto" | "triton" | "torch", resolved from the logits' device at each call (module docstring).
    """
    check_options("cross_entropy", label_smoothing, z_loss, reduction)
    if not use_triton("kernels.cross_entropy", backend, logits):
        return _cross_entropy_torch(logits, target, ignore_index, label_smoothing, z_loss, reduction)
    args = (logits, target, ignore_index, label_smoothing, z_loss, reduction, inplace_backward, None)
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropyFunction.apply(*args)
    return _cross_entropy_forward(*args, need_grad=False)[0]  # evaluation: one read of the logits, no buffer


def _cross_entropy_torch(logits, target, ignore_index, label_smoothing, z_loss, reduction):
    """The torch backend: the same checks, then the reference on fp32 (fp64) logits."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"cross_entropy: logits must have a non-empty last (vocab) dim, got {shape}")
    check_tensors("cross_entropy", False, logits=logits)
    V = logits.shape[-1]
    t = check_targets("cross_entropy", target, logits.numel() // V, V, ignore_index, logits.device)
    x = logits.to(acc_dtype(logits.dtype))
    return cross_entropy_reference(x, t.view(logits.shape[:-1]), ignore_index, label_smoothing, z_loss, reduction)


class CrossEntropyLoss(torch.nn.Module):
    """`torch.nn.CrossEntropyLoss` drop-in (class-index targets) backed by the Triton kernel.

    ``backend`` = "auto" (default) runs the kernel on CUDA tensors (on CPU too under ``TRITON_INTERPRET=1``) and
    `cross_entropy_reference` (fp32 math) elsewhere, decided at each call from the logits' device; "triton" forces the
    kernel (a one-line error where it cannot run), "torch" the reference.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        reduction: str = "mean",
        inplace_backward: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        check_options("CrossEntropyLoss", label_smoothing, z_loss, reduction)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.reduction, self.inplace_backward = reduction, inplace_backward
        self.backend = check_backend("kernels.CrossEntropyLoss", backend)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            logits,
            target,
            self.ignore_index,
            self.label_smoothing,
            self.z_loss,
            self.reduction,
            self.inplace_backward,
            self.backend,
        )

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"reduction={self.reduction!r}{extra}"
        )


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain-PyTorch reference with the same semantics, computed in the logits' own dtype (upcast to compare)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    x_t = x.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - x_t) + label_smoothing * (lse - x.mean(dim=-1)) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(logits.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1).to(loss.dtype)
