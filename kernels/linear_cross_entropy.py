"""Fused linear + cross-entropy: `cross_entropy(hidden @ weight.T, target)` without materialising the logits.

The rows of `hidden` are processed in chunks (Liger-Kernel's FusedLinearCrossEntropy; Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", make the same memory argument). Per chunk: logits = h_c @ W^T (c x V),
the cross-entropy kernel of kernels/cross_entropy_loss.py turns them in place into dloss/dlogits, then
grad_h_c = dlogits @ W and grad_W += dlogits^T @ h_c. Peak extra memory is one chunk of logits (O(chunk x V)) plus
the gradient buffers, instead of N x V logits, their softmax and their gradient. Backward only scales the gradients
computed in forward by grad_output.

Low precision. The weight gradient is summed in an fp32 (V x H) buffer for fp16/bf16 and kept in fp32 until backward,
which multiplies it by grad_output in fp32 and only then rounds it to the weight's dtype (one rounding; the peak is
unchanged, fp32 buffer plus result, as when the cast happened at the end of forward). The hidden gradient is stored in
the inputs' dtype (an fp32 N x H buffer would double it) and scaled in backward by grad_output in fp32, rounded once
(kernels/cross_entropy_loss.py `scale_grad_`): the loss scale is never narrowed (a GradScaler's 65536 is inf in fp16).
For bf16 (fp32's exponent range) the chunk's logits gradient includes the mean's 1/n_valid, as for fp32. For fp16 it
cannot: at 16k tokens and vocabulary 50k, softmax_i / n_valid (~1e-9) is below fp16's smallest subnormal and every
non-target entry would flush to zero. The chunk holds each row's own gradient times a power of two P instead, as in
`kernels.cross_entropy`, so softmax entries down to ~1e-8 stay in fp16's normal range, and backward multiplies both
gradients by grad_output / (n_valid P) in fp32. Here P is also capped so that the fp16 GEMM dlogits @ W cannot overflow
(P * sum_i |g_i| * max|W| <= 2^15, with max|W| taken on the device: no host sync; 2^12 to 2^14 for ordinary weights).
The hidden gradient stays P-scaled until backward (unscaled it could drop below fp16's normal range in the same
regime); the weight gradient's P-scaled sum is in fp32. The per-chunk buffer stays the chunk of logits, in the inputs'
dtype.

Backends: `fused_linear_cross_entropy`, `FusedLinearCrossEntropyLoss` and the vocab-parallel variant take ``backend``
= "auto" | "triton" | "torch" (kernels/utils.py): "auto" runs the chunked Triton path on CUDA tensors (and on CPU
under ``TRITON_INTERPRET=1``), elsewhere plain torch: the full logits in the inputs' dtype, then the cross-entropy in
fp32 (`cross_entropy_reference`, or for the vocab-parallel variant the same all-reduces as its kernels'), which
materialises N x V logits: meant for developing on a CPU-only machine.

The tensor-parallel variant (`vocab_parallel_fused_linear_cross_entropy`) takes this rank's vocab shard of `weight`
(Megatron's vocab-parallel output layer, Shoeybi et al. 2019): per chunk each rank computes its local max, sum of
exponentials, row sum and target logit, and two small all-reduces over the group (a MAX of one value per row, then a
SUM of three) give the global log-sum-exp; the full logits are never gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.cross_entropy_loss import (
    _row_grad,
    _row_stats,
    _row_zero,
    ce_forward_rows,
    check_options,
    check_targets,
    cross_entropy_reference,
    launch_config,
    loss_scale,
    reduce_loss,
    scale_grad_,
    stored_grad_scale,
)
from kernels.utils import acc_dtype, check_backend, check_tensors, import_triton, tl_acc_dtype, use_triton

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

FLCE_REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels for the vocab-sharded path (the unsharded path reuses the fused one-row kernel)


@triton.jit
def _shard_stats_kernel(
    x_ptr, stride_x, t_ptr, stats_ptr, V_valid, vocab_start, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """Per row of this rank's first V_valid logits (the rest is vocab padding): (local max, sum exp(x - local max),
    row sum, target logit if local else 0)."""
    row = tl.program_id(0).to(tl.int64)
    t_local = tl.load(t_ptr + row) - vocab_start
    m, d, s, x_t = _row_stats(x_ptr + row * stride_x, V_valid, t_local, BLOCK, ACC)
    out = stats_ptr + row * 4
    tl.store(out, m)
    tl.store(out + 1, d)
    tl.store(out + 2, s)
    tl.store(out + 3, x_t)


@triton.jit
def _shard_grad_kernel(
    x_ptr,
    stride_x,
    t_ptr,
    lse_ptr,
    scale_ptr,
    V_local,
    V_valid,
    vocab_start,
    V_global,
    ignore_index,
    eps,
    z,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Overwrites this rank's logits with dloss/dlogits given the global log-sum-exp of each row; the padding
    columns [V_valid, V_local) get gradient 0."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = tl.load(t_ptr + row)
    if t == ignore_index:
        _row_zero(x_row, V_local, BLOCK)
    else:
        lse = tl.load(lse_ptr + row).to(ACC)
        scale = tl.load(scale_ptr).to(ACC)
        _row_grad(x_row, x_row, V_valid, t - vocab_start, lse, scale, eps / V_global, 1.0 - eps, z, BLOCK, ACC)
        _row_zero(x_row + V_valid, V_local - V_valid, BLOCK)


# ---------------------------------------------------------------------------------------------------------------------
# Host side


# Fewest rows per chunk. Each chunk adds its weight gradient (V x chunk) @ (chunk x H) into the fp32 V x H sum, reading
# and writing that sum once: with chunk rows the GEMM does chunk / 4 FLOPs per byte of it, memory-bound below about
# a thousand rows on a Hopper GPU. Measured on an H200 (benchmarks/RESULTS.md), 8192 rows x 4096 hidden x 131072 vocab,
# bf16: 81 ms per forward+backward at 256 rows (Liger's choice there), 45 at 2048, and less peak memory (the fp32
# weight-gradient sum, 2 GiB, outweighs a 2048-row chunk of logits, 0.5 GiB).
MIN_CHUNK_ROWS = 2048


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Liger's choice (a power of two making one chunk of logits about as large as `hidden`, N x H), raised to at
    least MIN_CHUNK_ROWS so the chunk's weight-gradient GEMM is not memory-bound; at most N."""
    n = max(n_rows, 1)
    inc = triton.cdiv(vocab, hidden)
    return max(1, min(max(triton.next_power_of_2(triton.cdiv(n, inc)), MIN_CHUNK_ROWS), n))


def _check_options(name: str, label_smoothing: float, z_loss: float, reduction: str, chunk_size: int | None) -> None:
    if reduction not in FLCE_REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {FLCE_REDUCTIONS} (weight grads are summed in forward)")
    check_options(name, label_smoothing, z_loss, reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")


def _check_inputs(name, hidden, weight, label_smoothing, z_loss, reduction, chunk_size, need_triton=True) -> None:
    _check_options(name, label_smoothing, z_loss, reduction, chunk_size)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: need hidden (..., H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    check_tensors(name, need_triton, hidden=hidden, weight=weight)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{name}: hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")


def _accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with `acc` possibly fp32 while a, b are fp16/bf16 (keeps the weight gradient's sum in fp32).

    The chunk's product is never rounded to 16 bits: on CUDA an fp32-output GEMM (torch >= 2.8), elsewhere (CPU, older
    torch) an fp32 GEMM on fp32 copies of this chunk's operands (V x chunk and chunk x H: bounded by the chunk). An
    fp16 product could overflow: fp16's chunk gradient is pre-scaled by a power of two and lacks the mean's 1/n_valid.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # fp32-output GEMM (torch >= 2.8 on CUDA): no low-precision rounding of each chunk's product
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, run the linear in the autocast dtype as `F.linear` would (differentiable casts, so fp32
    master weights still get their gradient); the chunks inside then run with autocast off, in that dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return hidden.to(dt), weight.to(dt)
    return hidden, weight


def _weight_max(weight: torch.Tensor, need_h: bool) -> torch.Tensor | None:
    """max|W| as a 1-element fp32 device tensor when fp16 hidden gradients come from the GEMM dlogits @ W, else None."""
    if weight.dtype != torch.float16 or not need_h:
        return None
    if weight.numel() == 0:  # an empty vocab shard still joins the group's all-reduce of this value
        return torch.zeros(1, dtype=torch.float32, device=weight.device)
    return weight.detach().abs().amax().float().reshape(1)


class _ChunkedBuffers:
    """Gradient buffers filled chunk by chunk in forward: grad_hidden (N x H, hidden's dtype) and grad_weight (V x H,
    fp32 for fp16/bf16 weights: backward rounds it to the weight's dtype after scaling)."""

    def __init__(self, h, weight, need_h, need_w):
        self.grad_h = torch.empty_like(h) if need_h else None
        wdtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.grad_w = torch.zeros(weight.shape, dtype=wdtype, device=weight.device) if need_w else None

    def add_chunk(self, start, end, dlogits, h_c, weight):
        if self.grad_h is not None:
            torch.mm(dlogits, weight, out=self.grad_h[start:end])
        if self.grad_w is not None:
            _accumulate_mm_(self.grad_w, dlogits.t(), h_c)


def _flce_forward(hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size, reduction, need_h, need_w):
    """(loss, grad_hidden (N x H) or None, grad_weight (fp32 for fp16/bf16) or None, factor owed or None): the
    gradients of the loss up to the factor backward still owes them (`stored_grad_scale`; fp16 only)."""
    name = "fused_linear_cross_entropy"
    _check_inputs(name, hidden, weight, label_smoothing, z_loss, reduction, chunk_size)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    N, V = h.shape[0], weight.shape[0]
    t = check_targets(name, target, N, V, ignore_index, h.device)
    chunk = chunk_size or default_chunk_size(N, h.shape[1], V)
    scale = loss_scale(t, ignore_index, reduction, acc_dtype(h.dtype))
    stored, owed = stored_grad_scale(scale, h.dtype, z_loss, _weight_max(weight, need_h))
    bufs = _ChunkedBuffers(h, weight, need_h, need_w)
    loss_rows = torch.empty(N, dtype=acc_dtype(h.dtype), device=h.device)
    with torch.autocast(h.device.type, enabled=False):  # chunks run in the inputs' dtype
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            h_c = h[start:end]
            logits = h_c @ weight.t()
            grad = logits if (need_h or need_w) else None
            loss_rows[start:end], _ = ce_forward_rows(
                logits, t[start:end], grad, stored, ignore_index, label_smoothing, z_loss
            )
            if grad is not None:
                bufs.add_chunk(start, end, logits, h_c, weight)
    return reduce_loss(loss_rows, scale, reduction, loss_rows.shape), bufs.grad_h, bufs.grad_w, owed


def _save_grads(ctx, hidden, weight, grad_h, grad_w, owed) -> None:
    ctx.save_for_backward(grad_h, grad_w)
    ctx.h_shape, ctx.w_dtype, ctx.owed = hidden.shape, weight.dtype, owed


def _scaled_grads(ctx, grad_output):
    """(grad_hidden, grad_weight) times grad_output (and what the forward owes them), in fp32, rounded once."""
    grad_h, grad_w = ctx.saved_tensors
    if grad_h is not None:
        grad_h = scale_grad_(grad_h, grad_output, owed=ctx.owed).view(ctx.h_shape)
    if grad_w is not None:
        grad_w = scale_grad_(grad_w, grad_output, owed=ctx.owed).to(ctx.w_dtype)
    return grad_h, grad_w


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size, reduction):
        loss, grad_h, grad_w, owed = _flce_forward(
            hidden,
            weight,
            target,
            ignore_index,
            label_smoothing,
            z_loss,
            chunk_size,
            reduction,
            *ctx.needs_input_grad[:2],
        )
        _save_grads(ctx, hidden, weight, grad_h, grad_w, owed)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _scaled_grads(ctx, grad_output) + (None,) * 6


def _needs_grads(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T, target)` computed `chunk_size` rows at a time (default: about N*H logits).

    hidden (..., H), weight (V, H) of one floating dtype, target (...) integer. Same options and semantics as
    `kernels.cross_entropy` (mean over non-ignored targets, 0 if none). The weight gradient is summed in fp32 for
    fp16/bf16 (a V x H fp32 buffer from forward to backward). fp16 inputs take a GradScaler's loss scale (see the module
    docstring). Backward runs once (or any times with grad_output 1, except for fp16). ``backend``: "auto" | "triton"
    | "torch", resolved from hidden's device at each call (see the module docstring).
    """
    if not use_triton("kernels.fused_linear_cross_entropy", backend, hidden):
        return _flce_torch(hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size, reduction)
    hidden, weight = _autocast_inputs(hidden, weight)
    args = (hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size, reduction)
    if _needs_grads(hidden, weight):
        return FusedLinearCrossEntropyFunction.apply(*args)
    return _flce_forward(*args, need_h=False, need_w=False)[0]


def _flce_torch(hidden, weight, target, ignore_index, label_smoothing, z_loss, chunk_size, reduction):
    """The torch backend: the same checks, the full logits in the inputs' (autocast) dtype, the cross-entropy
    reference on them in fp32 (this path materialises N x V logits: meant for development on CPU)."""
    name = "fused_linear_cross_entropy"
    hidden, weight = _autocast_inputs(hidden, weight)
    _check_inputs(name, hidden, weight, label_smoothing, z_loss, reduction, chunk_size, need_triton=False)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = check_targets(name, target, h.shape[0], weight.shape[0], ignore_index, h.device)
    with torch.autocast(h.device.type, enabled=False):
        logits = h @ weight.t()
    return cross_entropy_reference(logits.to(acc_dtype(h.dtype)), t, ignore_index, label_smoothing, z_loss, reduction)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form: `loss = FusedLinearCrossEntropyLoss()(hidden, lm_head.weight, target)`.

    ``backend`` = "auto" (default) runs the chunked Triton path on CUDA tensors (on CPU too under
    ``TRITON_INTERPRET=1``) and, elsewhere, plain torch (full logits, then `cross_entropy_reference` in fp32), decided
    at each call from hidden's device; "triton" forces the kernels (a one-line error where they cannot run), "torch"
    the plain path.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        _check_options("FusedLinearCrossEntropyLoss", label_smoothing, z_loss, reduction, chunk_size)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.chunk_size, self.reduction = chunk_size, reduction
        self.backend = check_backend("kernels.FusedLinearCrossEntropyLoss", backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            target,
            self.ignore_index,
            self.label_smoothing,
            self.z_loss,
            self.chunk_size,
            self.reduction,
            self.backend,
        )

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"ignore_index={self.ignore_index}, z_loss={self.z_loss}, reduction={self.reduction!r}{extra}"


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Unfused plain-PyTorch reference: full logits, then `cross_entropy_reference`."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return cross_entropy_reference(logits, target.reshape(-1), ignore_index, label_smoothing, z_loss, reduction)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor-parallel variant: weight is this rank's vocab shard


def _shard_layout(
    name: str, V_local: int, group, vocab_start: int | None, vocab_size: int | None, device: torch.device
) -> tuple[int, int, int]:
    """(vocab_start, global vocabulary, valid columns of this shard). Shards may differ in size (their sizes are
    all-gathered once per call); columns at or beyond `vocab_size` are padding (Megatron pads the vocabulary to a
    multiple of the tensor-parallel size)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([V_local], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    start = sum(sizes[:rank]) if vocab_start is None else vocab_start
    padded = sum(sizes)
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"{name}: vocab_size {vocab_size} must be in [1, {padded}] (the shards' total)")
    return start, vocab_size, min(max(vocab_size - start, 0), V_local)


def _vp_flce_forward(
    hidden,
    weight,
    target,
    group,
    ignore_index,
    label_smoothing,
    z_loss,
    chunk_size,
    reduction,
    vocab_start,
    vocab_size,
    reduce_hidden_grad,
    need_h,
    need_w,
):
    """(loss, grad_hidden, grad_weight_shard, owed) as `_flce_forward`: per chunk the local softmax statistics of this
    rank's logits are all-reduced (max, then sum-exp / row sum / target logit) into the global log-sum-exp; each rank
    then writes the gradient of its own logits."""
    name = "vocab_parallel_fused_linear_cross_entropy"
    _check_inputs(name, hidden, weight, label_smoothing, z_loss, reduction, chunk_size)
    V_local, H = weight.shape
    start_v, V, V_valid = _shard_layout(name, V_local, group, vocab_start, vocab_size, weight.device)
    h = hidden.reshape(-1, H).contiguous()
    N = h.shape[0]
    t = check_targets(name, target, N, V, ignore_index, h.device)
    acc = acc_dtype(h.dtype)
    scale = loss_scale(t, ignore_index, reduction, acc)
    w_max = _weight_max(weight, need_h)
    if w_max is not None:  # one P for the group: the hidden gradients of all ranks are summed
        dist.all_reduce(w_max, op=dist.ReduceOp.MAX, group=group)
    stored, owed = stored_grad_scale(scale, h.dtype, z_loss, w_max)
    bufs = _ChunkedBuffers(h, weight, need_h, need_w)
    loss_rows = torch.empty(N, dtype=acc, device=h.device)
    valid = t != ignore_index
    chunk = chunk_size or default_chunk_size(N, H, V)
    BLOCK, num_warps = launch_config(V_local)
    ACC = tl_acc_dtype(h.dtype)
    eps = float(label_smoothing)
    with torch.autocast(h.device.type, enabled=False):  # chunks run in the inputs' dtype
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            c = end - start
            h_c, t_c = h[start:end], t[start:end]
            logits = h_c @ weight.t()
            stats = torch.empty(c, 4, dtype=acc, device=h.device)
            _shard_stats_kernel[(c,)](
                logits, logits.stride(0), t_c, stats, V_valid, start_v, BLOCK=BLOCK, ACC=ACC, num_warps=num_warps
            )
            m = stats[:, 0].clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([stats[:, 1] * torch.exp(stats[:, 0] - m), stats[:, 2], stats[:, 3]])
            dist.all_reduce(sums, group=group)
            lse = m + torch.log(sums[0])
            loss = (1.0 - eps) * (lse - sums[2]) + eps * (lse - sums[1] / V) + z_loss * lse * lse
            loss_rows[start:end] = torch.where(valid[start:end], loss, torch.zeros_like(loss))
            if need_h or need_w:
                lse = lse.contiguous()
                _shard_grad_kernel[(c,)](
                    logits,
                    logits.stride(0),
                    t_c,
                    lse,
                    stored,
                    V_local,
                    V_valid,
                    start_v,
                    V,
                    ignore_index,
                    eps,
                    float(z_loss),
                    BLOCK=BLOCK,
                    ACC=ACC,
                    num_warps=num_warps,
                )
                bufs.add_chunk(start, end, logits, h_c, weight)
    if bufs.grad_h is not None and reduce_hidden_grad:
        dist.all_reduce(bufs.grad_h, group=group)
    return reduce_loss(loss_rows, scale, reduction, loss_rows.shape), bufs.grad_h, bufs.grad_w, owed


class VocabParallelFusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        loss, grad_h, grad_w, owed = _vp_flce_forward(*args, *ctx.needs_input_grad[:2])
        _save_grads(ctx, args[0], args[1], grad_h, grad_w, owed)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _scaled_grads(ctx, grad_output) + (None,) * 10


def vocab_parallel_fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused linear cross-entropy with `weight` = this rank's rows [vocab_start, vocab_start + V_local) of the
    output layer; `hidden` and global `target` are the same on every rank of `group`.

    Every rank returns the same global loss. Shards are laid out in rank order (sizes may differ) unless
    `vocab_start` is given. `vocab_size`: the true vocabulary when the shards are padded beyond it (as
    `engine.parallel.vocab_parallel_cross_entropy`); padding columns are left out of the softmax and get no gradient.
    The hidden gradient is summed over the group (as the backward of Megatron's copy-to-tensor-parallel-region
    would); pass `reduce_hidden_grad=False` when the caller reduces it itself. ``backend``: "auto" | "triton" |
    "torch" as in `fused_linear_cross_entropy` (every rank must resolve it alike: the paths' collectives differ); the
    torch path materialises this rank's N x V_local logits.
    """
    triton_path = use_triton("kernels.vocab_parallel_fused_linear_cross_entropy", backend, hidden)
    hidden, weight = _autocast_inputs(hidden, weight)
    args = (hidden, weight, target, group, ignore_index, label_smoothing, z_loss, chunk_size, reduction)
    args += (vocab_start, vocab_size, reduce_hidden_grad)
    if not triton_path:
        return _vp_torch(*args)
    if _needs_grads(hidden, weight):
        return VocabParallelFusedLinearCrossEntropyFunction.apply(*args)
    return _vp_flce_forward(*args, need_h=False, need_w=False)[0]


class _AllReduceForward(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward: every rank computes the same loss from the sums, and each
    rank's inputs reach that loss only through its own term (Megatron's reduce-from-tensor-parallel-region)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceBackward(torch.autograd.Function):
    """Identity in forward, all-reduce (sum) of the gradient in backward (Megatron's copy-to-tensor-parallel-region):
    the hidden gradient summed over the ranks' vocab shards."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _vp_torch(
    hidden,
    weight,
    target,
    group,
    ignore_index,
    label_smoothing,
    z_loss,
    chunk_size,
    reduction,
    vocab_start,
    vocab_size,
    reduce_hidden_grad,
):
    """The torch backend of the vocab-parallel op: this rank's logits in full, the global log-sum-exp from the same
    two all-reduces as the kernels' (a MAX without gradient, then a SUM of sum-exp / row sum / target logit)."""
    name = "vocab_parallel_fused_linear_cross_entropy"
    _check_inputs(name, hidden, weight, label_smoothing, z_loss, reduction, chunk_size, need_triton=False)
    V_local, H = weight.shape
    start_v, V, V_valid = _shard_layout(name, V_local, group, vocab_start, vocab_size, weight.device)
    h = hidden.reshape(-1, H)
    N = h.shape[0]
    t = check_targets(name, target, N, V, ignore_index, h.device)
    acc = acc_dtype(h.dtype)
    if reduce_hidden_grad and h.requires_grad and torch.is_grad_enabled():
        h = _AllReduceBackward.apply(h, group)
    with torch.autocast(h.device.type, enabled=False):
        logits = (h @ weight[:V_valid].t()).to(acc)  # the padding rows of the shard take no part
    m = torch.full((N,), float("-inf"), dtype=acc, device=h.device)
    if V_valid:
        m = logits.detach().amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    t_local = t - start_v
    here = (t != ignore_index) & (t_local >= 0) & (t_local < V_valid)
    if V_valid:
        x_t = logits.gather(1, torch.where(here, t_local, 0)[:, None]).squeeze(1) * here
    else:
        x_t = logits.new_zeros(N)
    local = torch.stack([torch.exp(logits - m[:, None]).sum(-1), logits.sum(-1), x_t])
    sum_exp, row_sum, target_logit = _AllReduceForward.apply(local, group)
    lse = m + torch.log(sum_exp)
    eps = label_smoothing
    loss = (1.0 - eps) * (lse - target_logit) + eps * (lse - row_sum / V) + z_loss * lse * lse
    valid = t != ignore_index
    loss = torch.where(valid, loss, torch.zeros_like(loss)).sum()
    return loss / valid.sum().clamp(min=1).to(acc) if reduction == "mean" else loss
