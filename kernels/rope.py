"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer", eq. 34) in the half-rotation layout of Llama/GPT-NeoX.

With ``x1, x2`` the two halves of the head dim and ``c, s = cos[p], sin[p]`` at the token's position ``p``:
``out = cat(x1*c - x2*s, x2*c + x1*s)``. The map is a rotation by theta, so its backward is the rotation by
-theta (sin negated); cos and sin are treated as constants (no gradient).

Positions: token ``s`` of the sequence uses ``p = s + offset`` (a contiguous context-parallel shard starts at
``offset``), or ``p = position_ids[b, s] + offset`` when ``position_ids`` is given (zigzag CP shards, packed
sequences whose positions restart per document); ``cos``/``sin`` are then tables of shape (max_pos, head_dim // 2).

The kernel sees x as rows of head_dim elements, one per (batch, seq, head), with arbitrary strides in every dim,
so views (e.g. q, k, v split from one fused projection) need no copy, and the in-place variant rotates them where
they lie. All math in fp32 (fp64 for fp64 inputs).

Backends: the functions and `RotaryEmbedding` take ``backend`` = "auto" | "triton" | "torch" (kernels/utils.py):
"auto" runs the kernel on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), `apply_rope_reference` (fp32 math,
x's dtype; the in-place variants copy its result into x) elsewhere.
"""

from __future__ import annotations

import torch

from kernels.utils import (
    check_backend,
    check_tensors,
    elementwise_warps,
    import_triton,
    next_power_of_2,
    tl_acc_dtype,
    use_triton,
)

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@triton.jit
def _rope_kernel(
    X,
    Y,
    COS,
    SIN,
    POS,
    n_rows,
    seq_len,
    n_heads,
    half,
    offset,
    max_pos,
    sxb,
    sxs,
    sxh,
    sxd,
    syb,
    sys_,
    syh,
    syd,
    scp,
    scd,
    ssp,
    ssd,
    spb,
    sps,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A row is one (batch, seq, head) vector; BLOCK_M of them per program, the two halves side by side.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    head = rows % n_heads
    tok = rows // n_heads
    s = tok % seq_len
    b = tok // seq_len
    if HAS_POS:
        pos = tl.load(POS + b * spb + s * sps, mask=row_mask, other=0).to(tl.int64) + offset
    else:
        pos = s + offset
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < half
    mask = row_mask[:, None] & col_mask[None, :]
    # Out-of-range positions (checked on the host for CPU tensors) read nothing rather than fault on GPU.
    cs_mask = mask & ((pos >= 0) & (pos < max_pos))[:, None]
    c = tl.load(COS + pos[:, None] * scp + cols[None, :] * scd, mask=cs_mask, other=0.0).to(ACC)
    sn = tl.load(SIN + pos[:, None] * ssp + cols[None, :] * ssd, mask=cs_mask, other=0.0).to(ACC)
    if BACKWARD:
        sn = -sn
    xo = (b * sxb + s * sxs + head * sxh)[:, None]
    x1 = tl.load(X + xo + cols[None, :] * sxd, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(X + xo + (cols[None, :] + half) * sxd, mask=mask, other=0.0).to(ACC)
    yo = (b * syb + s * sys_ + head * syh)[:, None]
    tl.store(Y + yo + cols[None, :] * syd, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + yo + (cols[None, :] + half) * syd, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=mask)


def _launch(x, y, cos, sin, position_ids, offset, backward):
    """Rotate x (b, s, h, d) into y (same shape; y may be x for in place)."""
    bsz, seq, heads, dim = x.shape
    n_rows, half = bsz * seq * heads, dim // 2
    if n_rows == 0:
        return
    block_n = max(16, next_power_of_2(half))
    # ~1024 elements per half per program at 8 warps: 61 registers a thread on sm_90 (64 x 64 at 16 warps: 128).
    block_m = max(1, min(64, 1024 // block_n))
    if position_ids is None:
        pos, spb, sps = cos, 0, 0  # POS unused
    else:
        pos = position_ids
        if pos.dim() == 1:
            spb, sps = 0, pos.stride(0)
        else:
            spb, sps = (0 if pos.shape[0] == 1 else pos.stride(0)), pos.stride(1)
    _rope_kernel[(triton.cdiv(n_rows, block_m),)](
        x,
        y,
        cos,
        sin,
        pos,
        n_rows,
        seq,
        heads,
        half,
        offset,
        cos.shape[0],
        *x.stride(),
        *y.stride(),
        *cos.stride(),
        *sin.stride(),
        spb,
        sps,
        HAS_POS=position_ids is not None,
        BACKWARD=backward,
        ACC=tl_acc_dtype(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=elementwise_warps(block_m * block_n, per_thread=4),
    )


def _rotate(x, cos, sin, position_ids, offset, backward):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, y, cos, sin, position_ids, offset, backward)
    return y


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, position_ids, offset):
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.offset = offset
        return _rotate(x, cos, sin, position_ids, offset, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin, position_ids = ctx.saved_tensors
        return _rotate(dy, cos, sin, position_ids, ctx.offset, True), None, None, None, None


class _RopeInplaceFunction(torch.autograd.Function):
    # One tensor per Function: autograd cannot rebase several in-place-modified views (q, k of one qkv) at once.
    @staticmethod
    def forward(ctx, x, cos, sin, position_ids, offset):
        _launch(x, x, cos, sin, position_ids, offset, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.offset = offset
        return x

    @staticmethod
    def backward(ctx, dy):
        # Out of place: the incoming gradient may be shared with other consumers.
        cos, sin, position_ids = ctx.saved_tensors
        return _rotate(dy, cos, sin, position_ids, ctx.offset, True), None, None, None, None


def _check(fn, xs, cos, sin, position_ids, offset, need_triton=True):
    check_tensors(fn, need_triton, cos=cos, sin=sin, **xs)
    name, x = next(iter(xs.items()))
    for n, t in xs.items():
        if t.dim() != 4:
            raise ValueError(f"{fn}: {n} must be (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.shape[-1] % 2:
            raise ValueError(f"{fn}: head_dim of {n} must be even for the half rotation, got {t.shape[-1]}")
        if t.shape[:2] != x.shape[:2] or t.shape[-1] != x.shape[-1]:
            raise ValueError(f"{fn}: {n} has shape {tuple(t.shape)}, incompatible with {name}'s {tuple(x.shape)}")
    bsz, seq, _, dim = x.shape
    for n, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != dim // 2:
            raise ValueError(f"{fn}: {n} must be (positions, head_dim // 2) = (*, {dim // 2}), got {tuple(t.shape)}")
    if cos.shape[0] != sin.shape[0]:
        raise ValueError(f"{fn}: cos has {cos.shape[0]} positions but sin has {sin.shape[0]}")
    max_pos = cos.shape[0]
    if position_ids is None:
        if offset < 0 or offset + seq > max_pos:
            raise ValueError(f"{fn}: positions {offset}..{offset + seq - 1} fall outside the {max_pos} rows of cos/sin")
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{fn}: position_ids must be an integer tensor")
    if position_ids.device != x.device:
        raise ValueError(f"{fn}: position_ids is on {position_ids.device} but {name} is on {x.device}")
    shape = tuple(position_ids.shape)
    if shape not in ((seq,), (1, seq), (bsz, seq)):
        raise ValueError(f"{fn}: position_ids must be (seq,) or (batch, seq) = ({bsz}, {seq}), got {shape}")
    if position_ids.device.type == "cpu" and position_ids.numel():  # a device-side check would cost a sync on GPU
        lo, hi = int(position_ids.min()) + offset, int(position_ids.max()) + offset
        if lo < 0 or hi >= max_pos:
            raise ValueError(f"{fn}: position_ids + offset span {lo}..{hi}, outside the {max_pos} rows of cos/sin")


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by RoPE; returns a new tensor of x's shape and dtype.

    cos, sin: (positions, head_dim // 2). Token s uses row ``s + offset``, or ``position_ids[b, s] + offset``
    (position_ids of shape (seq,) or (batch, seq)). ``backend``: "auto" | "triton" | "torch", resolved from x's
    device at each call (see the module docstring).
    """
    fn = "kernels.apply_rope"
    triton_path = use_triton(fn, backend, x)
    _check(fn, {"x": x}, cos, sin, position_ids, int(offset), triton_path)
    if not triton_path:
        return apply_rope_reference(x, cos, sin, position_ids, int(offset))
    return _RopeFunction.apply(x, cos, sin, position_ids, int(offset))


def apply_rope_(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """In-place `apply_rope`: rotates x (batch, seq, heads, head_dim) where it lies and returns it.

    x may be a strided view (e.g. of a fused qkv output) but not a leaf that requires grad (as any in-place op).
    ``backend`` as in `apply_rope`.
    """
    fn = "kernels.apply_rope_"
    triton_path = use_triton(fn, backend, x)
    _check(fn, {"x": x}, cos, sin, position_ids, int(offset), triton_path)
    if not triton_path:
        return _reference_(x, cos, sin, position_ids, int(offset))
    return _RopeInplaceFunction.apply(x, cos, sin, position_ids, int(offset))


def apply_rope_qk_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place RoPE on q (batch, seq, heads_q, d) and k (batch, seq, heads_kv, d); returns (q, k).

    Saves two activation-sized buffers per layer; q and k may be strided views (e.g. of a fused qkv output) but
    must not be leaves that require grad (as for any in-place op). Positions as in `apply_rope`. Both are checked
    before either is modified. ``backend`` as in `apply_rope` (resolved from q's device).
    """
    fn = "kernels.apply_rope_qk_"
    triton_path = use_triton(fn, backend, q)
    _check(fn, {"q": q, "k": k}, cos, sin, position_ids, int(offset), triton_path)
    if not triton_path:
        return _reference_(q, cos, sin, position_ids, int(offset)), _reference_(k, cos, sin, position_ids, int(offset))
    q = _RopeInplaceFunction.apply(q, cos, sin, position_ids, int(offset))
    k = _RopeInplaceFunction.apply(k, cos, sin, position_ids, int(offset))
    return q, k


def apply_rope_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain-torch RoPE with `apply_rope`'s semantics; math in fp32 (fp64 stays fp64), or x's dtype if not upcast."""
    seq = x.shape[1]
    if position_ids is None:
        pos = torch.arange(seq, device=x.device) + offset
    else:
        pos = position_ids.long() + offset
    c, s = cos[pos], sin[pos]  # (seq, half) or (batch, seq, half)
    if c.dim() == 2:
        c, s = c[None], s[None]
    ct = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    c, s = c[:, :, None, :].to(ct), s[:, :, None, :].to(ct)
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _reference_(x, cos, sin, position_ids, offset):
    """The in-place variants' torch path: x.copy_(apply_rope_reference(...)), the reference reading a copy of x when
    autograd records it (so what backward needs is not what copy_ overwrites)."""
    rotated = apply_rope_reference(x.clone() if x.requires_grad else x, cos, sin, position_ids, offset)
    return x.copy_(rotated)


def rope_cos_sin(
    positions: int, head_dim: int, base: float = 10000.0, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard tables, theta_i = base^(-2i/head_dim) for i < head_dim/2: cos, sin of (positions, head_dim//2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryEmbedding(torch.nn.Module):
    """Drop-in RoPE module: holds the cos/sin tables and ``forward(x, offset=0, position_ids=None)`` is
    `apply_rope` (x of shape (batch, seq, heads, head_dim), positions as there; returns a new tensor).

    The tables (`rope_cos_sin` with base ``theta``, ``max_seq_len`` rows, in ``dtype``) are non-persistent buffers:
    they follow ``.to(device)`` and stay out of the state dict. They grow when a call needs rows past the end
    (``offset + seq``), to at least twice their size, and are rebuilt in ``dtype`` on x's device if a module-wide
    ``.to(dtype)``/``.half()`` cast them or x lives elsewhere, so they keep full precision whatever the model's dtype
    (the kernel does its math in fp32 anyway). Rebuilt rows equal the old ones bit for bit. With ``position_ids``
    the tables are grown only to ``offset + seq`` rows (reading the ids' maximum would cost a device sync): ids
    must stay below ``max_seq_len``; construct the module with enough rows for them.

    ``backend`` = "auto" (default) runs the Triton kernel on CUDA tensors (on CPU too under ``TRITON_INTERPRET=1``)
    and `apply_rope_reference` elsewhere, decided at each call from x's device (a module built on CPU and moved to
    CUDA picks the kernel); "triton" forces the kernel (a one-line error where it cannot run), "torch" the reference.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        max_seq_len: int = 2048,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = check_backend("kernels.RotaryEmbedding", backend)
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"kernels.RotaryEmbedding: head_dim must be a positive even number, got {head_dim}")
        if max_seq_len < 0:
            raise ValueError(f"kernels.RotaryEmbedding: max_seq_len must be >= 0, got {max_seq_len}")
        self.head_dim, self.theta, self.table_dtype = head_dim, float(theta), dtype
        cos, sin = rope_cos_sin(max_seq_len, head_dim, self.theta, device=device, dtype=dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def max_seq_len(self) -> int:
        """Rows in the tables now (positions 0 .. max_seq_len - 1)."""
        return self.cos.shape[0]

    def _tables(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        have = self.cos.shape[0]
        if rows > have or self.cos.dtype != self.table_dtype or self.cos.device != device:
            n = max(rows, 2 * have) if rows > have else have
            self.cos, self.sin = rope_cos_sin(n, self.head_dim, self.theta, device=device, dtype=self.table_dtype)
        return self.cos, self.sin

    def forward(self, x: torch.Tensor, offset: int = 0, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"kernels.RotaryEmbedding: x must be (batch, seq, heads, {self.head_dim}), got {tuple(x.shape)}"
            )
        offset = int(offset)
        cos, sin = self._tables(max(offset, 0) + x.shape[1], x.device)
        return apply_rope(x, cos, sin, position_ids=position_ids, offset=offset, backend=self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"head_dim={self.head_dim}, theta={self.theta}, max_seq_len={self.max_seq_len}{extra}"
