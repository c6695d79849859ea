"""FP8 quantisation with per-tensor, per-row, 1x128-tile and 128x128-block scales, and an FP8 GEMM that applies
the scales with fp32 accumulation: Triton kernels and plain-torch references (the first step of FP8 training).

What. ``fp8_quantize(x, fmt, granularity)`` returns ``(data, scale_inv)`` with ``x ~= data.float() * scale_inv``
(``scale_inv`` broadcast as below), ``data`` in ``torch.float8_e4m3fn`` ("e4m3", max 448: forward tensors) or
``torch.float8_e5m2`` ("e5m2", max 57344: gradients). Per scale group ``scale_inv = amax / fmt_max`` (fp32), so the
group's largest magnitude maps to the format's largest finite value, and ``data = (x / scale_inv).clamp(-max, max)``
cast with round-to-nearest-even (saturating: nothing becomes inf/NaN). ``scale_inv = 1`` where it would be 0 (an
all-zero group, or an amax so small, below ~6e-43, that ``amax / max`` underflows): that group's data is then
``x`` itself cast, i.e. zeros. Granularities, for x of shape (..., k), m = x.numel() // k rows:

- "tensor": one scale, a 0-d tensor. Needs the global amax first: the kernel path makes two passes (per-program
  partial amax, then the cast with the reduced scale, no host sync). ``amax=`` (a float or a 1-element tensor, e.g.
  the max of an amax history: *delayed scaling*, Transformer Engine) skips the first pass; values beyond it saturate.
- "row": one scale per row over the last dim, shape ``x.shape[:-1] + (1,)`` ((m, 1) for 2-D x).
- "tile": one scale per 1x128 tile along the last dim (DeepSeek-V3's activations), shape
  ``x.shape[:-1] + (ceil(k / 128),)``; it broadcasts after ``scale_inv.repeat_interleave(128, -1)[..., :k]``.
- "block2d": one scale per 128x128 block of a 2-D x (DeepSeek-V3's weights), shape (ceil(m/128), ceil(k/128)); it
  broadcasts after ``repeat_interleave(128)`` along both dims, cut to (m, k).
``fp8_dequantize(data, scale_inv)`` inverts it (in fp32), inferring the granularity from the scale's shape.

``fp8_matmul(a, a_scale_inv, b, b_scale_inv)`` computes ``(a * sa) @ (b * sb).T`` for fp8 a (m, k) and b (n, k) (the
"TN" layout of ``torch._scaled_mm``'s weight: b is an ``nn.Linear`` weight), accumulating in fp32 and returning
``out_dtype`` (bf16 by default). Each operand may carry any of the four granularities (read from its scale's shape).
Tensor and row scales are applied in the epilogue (row x row is an outer product ``sa (m, 1) * sb (1, n)``); with a
tile or block2d scale on either side the K loop scales each 128-deep step's partial product by that step's scales in
fp32 before adding it (DeepSeek-V3's promotion of partial sums to fp32 with fine-grained scales).

Why. FP8 halves the bytes of bf16 and H100/H200 tensor cores run it at twice the bf16 rate; the scales keep each
group's values inside the narrow range (e4m3: 2^-9 .. 448). Finer groups (rows, tiles) confine an outlier's damage
to its own group. References: Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (the e4m3/e5m2 formats and
per-tensor scaling); DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section 3.3 (1x128 activation tiles, 128x128
weight blocks, fp32 promotion in the K loop).

Non-finite input. The torch path raises a one-line ValueError when x (or ``amax=``) holds inf or NaN. The kernel
path does not check (a check costs a host sync per call, stalling the GPU stream): a group holding inf or NaN gets
``scale_inv = inf`` (NaN counts as inf in the kernel's amax), and its data is meaningless (zeros or NaN). One
``torch.isfinite(scale_inv).all()`` after the call detects it, when the caller wants to (the amax history of delayed
scaling sees it anyway). With ``amax=`` the kernel saturates inf to +-max and keeps NaN as NaN.

Backends (kernels/utils.py): "auto" | "triton" | "torch". "torch" runs ``fp8_quantize_reference`` /
``fp8_matmul_reference`` (which dequantises both operands to fp32 and multiplies: exact up to the fp32 matmul).
"auto" runs the Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``, whose fp32 -> fp8 casts are wrong:
there only the scales and the GEMM on given fp8 operands can be checked), except that ``fp8_matmul`` on CUDA takes
``torch._scaled_mm`` where that supports the case (both operands tensorwise and not both e5m2, or both rowwise e4m3
with a bf16 output; k and n multiples of 16; sm_89+); "triton" always runs the Triton GEMM. Numerics on the kernel
path: amax, scales and the division are IEEE fp32 (``div_rn``) and the cast rounds to nearest even, so quantisation
is meant to match the reference bit for bit; the GEMM differs from it by summation order and by the tensor cores'
partial sums of at most 128 products (~14 bits on sm_90), promoted to the fp32 accumulator every 128.
"""

from __future__ import annotations

import math

import torch

from kernels.utils import as_rows, check_tensors, import_triton, next_power_of_2, use_triton

triton, tl = import_triton()  # stand-ins where triton is not installed: the torch references still run

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row", "tile", "block2d")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
TILE = 128  # the side of a tile (1 x TILE) and of a block (TILE x TILE)

# Quantisation kernel modes.
_MODE_QUANT, _MODE_AMAX, _MODE_CAST = 0, 1, 2


def fp8_max(fmt: str) -> float:
    """The largest finite value of the format ("e4m3": 448, "e5m2": 57344)."""
    return float(torch.finfo(FORMATS[fmt]).max)


# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by both paths


def _check_quantize(fn, x, fmt, granularity, amax):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in FP8_DTYPES:
        raise ValueError(f"{fn}: x must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if fmt not in FORMATS:
        raise ValueError(f"{fn}: fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{fn}: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "block2d" and x.dim() != 2:
        raise ValueError(f"{fn}: granularity 'block2d' needs a 2-D x (a weight), got shape {tuple(x.shape)}")
    if granularity in ("row", "tile") and x.dim() == 0:
        raise ValueError(f"{fn}: granularity {granularity!r} needs x with at least one dim, got a 0-d tensor")
    if amax is None:
        return
    if granularity != "tensor":
        raise ValueError(f"{fn}: amax= (delayed scaling) is for granularity 'tensor' only, got {granularity!r}")
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1 or not amax.is_floating_point():
            raise ValueError(
                f"{fn}: amax must be a float or a 1-element float tensor, got {amax.dtype} {tuple(amax.shape)}"
            )
        if amax.device != x.device:
            raise ValueError(f"{fn}: amax is on {amax.device} but x is on {x.device}")
        if amax.device.type == "cpu":  # a device-side check would cost a sync on GPU
            amax = float(amax)
    if isinstance(amax, (int, float)) and not (math.isfinite(amax) and amax >= 0):
        raise ValueError(f"{fn}: amax must be finite and >= 0, got {amax}")
    if not isinstance(amax, (int, float, torch.Tensor)):
        raise TypeError(f"{fn}: amax must be a float or a tensor, got {type(amax).__name__}")


def _scale_granularity(fn, name, scale, rows, k):
    """The granularity a scale of this shape stands for, for an operand of (rows, k); one-line error otherwise."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{fn}: {name} must be a float32 tensor, got {got}")
    kt, rt = -(-k // TILE), -(-rows // TILE)
    shape = tuple(scale.shape)
    if scale.numel() == 1 and scale.dim() <= 2:
        return "tensor"
    if shape == (rows, 1):
        return "row"
    if shape == (rows, kt):
        return "tile"
    if shape == (rt, kt):
        return "block2d"
    raise ValueError(
        f"{fn}: {name} has shape {shape}; for an operand of ({rows}, {k}) it must be () (tensor), ({rows}, 1) (row), "
        f"({rows}, {kt}) (1x{TILE} tiles) or ({rt}, {kt}) ({TILE}x{TILE} blocks)"
    )


def _check_matmul(fn, a, a_scale_inv, b, b_scale_inv, out_dtype):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FP8_DTYPES:
            raise ValueError(f"{fn}: {name} must be float8_e4m3fn or float8_e5m2, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{fn}: a (m, k) and b (n, k) must share k (b is (n, k), the transpose is taken), got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{fn}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    ga = _scale_granularity(fn, "a_scale_inv", a_scale_inv, a.shape[0], a.shape[1])
    gb = _scale_granularity(fn, "b_scale_inv", b_scale_inv, b.shape[0], b.shape[1])
    for name, t in (("b", b), ("a_scale_inv", a_scale_inv), ("b_scale_inv", b_scale_inv)):
        if t.device != a.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but a is on {a.device}")
    return ga, gb


# ---------------------------------------------------------------------------------------------------------------------
# References


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = -x.shape[dim] % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _group_amax(x32: torch.Tensor, granularity: str) -> torch.Tensor:
    """amax of |x| per scale group, in the scale's shape (NaN propagates)."""
    a = x32.abs()
    if granularity == "tensor":
        return a.amax() if a.numel() else a.new_zeros(())
    k = x32.shape[-1]
    if granularity == "row":
        return a.amax(dim=-1, keepdim=True) if k else a.new_zeros(*x32.shape[:-1], 1)
    if granularity == "tile":
        kt = -(-k // TILE)
        return _pad_to(a, -1, TILE).reshape(*x32.shape[:-1], kt, TILE).amax(dim=-1) if k else a[..., :0]
    m = x32.shape[0]
    mt, kt = -(-m // TILE), -(-k // TILE)
    if not m or not k:
        return a.new_zeros(mt, kt)
    return _pad_to(_pad_to(a, 0, TILE), 1, TILE).reshape(mt, TILE, kt, TILE).amax(dim=(1, 3))


def _expand_scale(scale_inv: torch.Tensor, granularity: str, shape) -> torch.Tensor:
    """The scale broadcast to a tensor of `shape` (tiles and blocks repeated 128 times, cut to size)."""
    if granularity == "tile":
        return scale_inv.repeat_interleave(TILE, dim=-1)[..., : shape[-1]]
    if granularity == "block2d":
        s = scale_inv.repeat_interleave(TILE, dim=0)[: shape[0]]
        return s.repeat_interleave(TILE, dim=1)[:, : shape[1]]
    return scale_inv  # tensor (0-d) and row (..., 1) broadcast as they are


def _scale_from_amax(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    scale_inv = amax.float() / fmax
    return torch.where(scale_inv == 0, torch.ones_like(scale_inv), scale_inv)


def fp8_quantize_reference(
    x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tensor", amax: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `fp8_quantize`: (data, scale_inv) with the semantics of the module docstring, math in fp32.

    Raises a one-line ValueError when x (or amax) holds inf or NaN.
    """
    fn = "kernels.fp8_quantize_reference"
    _check_quantize(fn, x, fmt, granularity, amax)
    fmax = fp8_max(fmt)
    x32 = x.float()
    if amax is None:
        group_amax = _group_amax(x32, granularity)
        if not bool(torch.isfinite(group_amax).all()):
            raise ValueError(f"{fn}: x holds inf or NaN; fp8 scales need finite input")
    else:
        if not bool(torch.isfinite(x32).all()):
            raise ValueError(f"{fn}: x holds inf or NaN; fp8 scales need finite input")
        group_amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(())
        if not (bool(torch.isfinite(group_amax)) and float(group_amax) >= 0):
            raise ValueError(f"{fn}: amax must be finite and >= 0, got {float(group_amax)}")
    scale_inv = _scale_from_amax(group_amax, fmax)
    data = (x32 / _expand_scale(scale_inv, granularity, x.shape)).clamp(-fmax, fmax).to(FORMATS[fmt])
    return data, scale_inv


def fp8_dequantize(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``data.float() * scale_inv`` broadcast by its granularity (read from the scale's shape): fp32, data's shape."""
    fn = "kernels.fp8_dequantize"
    if not isinstance(data, torch.Tensor) or data.dtype not in FP8_DTYPES:
        raise ValueError(f"{fn}: data must be a float8_e4m3fn or float8_e5m2 tensor")
    if data.dim() == 2:
        g = _scale_granularity(fn, "scale_inv", scale_inv, data.shape[0], data.shape[1])
    else:  # tensor, or row/tile over the last dim of an N-D tensor
        kt = -(-data.shape[-1] // TILE) if data.dim() else 1
        if scale_inv.numel() == 1 and scale_inv.dim() <= 2:
            g = "tensor"
        elif tuple(scale_inv.shape) == (*data.shape[:-1], 1):
            g = "row"
        elif tuple(scale_inv.shape) == (*data.shape[:-1], kt):
            g = "tile"
        else:
            raise ValueError(
                f"{fn}: scale_inv of shape {tuple(scale_inv.shape)} fits no granularity of {tuple(data.shape)}"
            )
    s = scale_inv.float().reshape(()) if g == "tensor" else scale_inv.float()
    return data.float() * _expand_scale(s, g, data.shape)


def fp8_matmul_reference(
    a: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b: torch.Tensor,
    b_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain-torch `fp8_matmul`: ``fp8_dequantize(a, sa) @ fp8_dequantize(b, sb).T`` in fp32, cast to out_dtype."""
    _check_matmul("kernels.fp8_matmul_reference", a, a_scale_inv, b, b_scale_inv, out_dtype)
    return (fp8_dequantize(a, a_scale_inv) @ fp8_dequantize(b, b_scale_inv).T).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Quantisation kernel


@triton.jit
def _fp8_quant_kernel(
    X,
    Y,
    S,
    m,
    k,
    group_k,
    sxm,
    sym,
    ssm,
    ssk,
    FMAX: tl.constexpr,
    MODE: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_k) owns rows [pid_m * GROUP_M, +GROUP_M) and columns [pid_k * group_k, +group_k), walked in
    # BLOCK_M x BLOCK_K chunks. MODE 0: amax of the group (one per row if ROW_SCALE, GROUP_M == BLOCK_M), its scale
    # stored, then the cast (a second read of the group, from L2). MODE 1: the group's amax only (the first pass of
    # tensorwise scaling). MODE 2: the cast with the scale at S[0].
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_m * GROUP_M
    col0 = pid_k * group_k
    col_end = tl.minimum(col0 + group_k, k)
    rows_b = tl.arange(0, BLOCK_M)
    cols_b = tl.arange(0, BLOCK_K)
    if MODE == 2:
        s = tl.load(S).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for r in range(0, GROUP_M, BLOCK_M):
            rows = row0 + r + rows_b
            xo = rows.to(tl.int64)[:, None] * sxm
            for c in range(col0, col_end, BLOCK_K):
                cols = c + cols_b
                mask = (rows < m)[:, None] & (cols < col_end)[None, :]
                x = tl.load(X + xo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                a = tl.where(x == x, tl.abs(x), float("inf"))  # NaN counts as inf: the scale shows it
                amax = tl.maximum(amax, tl.max(a, axis=1))
        if not ROW_SCALE:
            amax = tl.max(amax, axis=0)
        if MODE == 1:
            s = amax
        else:
            s = tl.math.div_rn(amax, FMAX)
            s = tl.where(s == 0.0, 1.0, s)
        if ROW_SCALE:
            rows = row0 + rows_b
            tl.store(S + rows.to(tl.int64) * ssm + pid_k * ssk, s, mask=rows < m)
        else:
            tl.store(S + pid_m * ssm + pid_k * ssk, s)
    if MODE != 1:
        if ROW_SCALE:
            sb = s[:, None]
        else:
            sb = s
        for r in range(0, GROUP_M, BLOCK_M):
            rows = row0 + r + rows_b
            xo = rows.to(tl.int64)[:, None] * sxm
            yo = rows.to(tl.int64)[:, None] * sym
            for c in range(col0, col_end, BLOCK_K):
                cols = c + cols_b
                mask = (rows < m)[:, None] & (cols < col_end)[None, :]
                x = tl.load(X + xo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                y = tl.clamp(tl.math.div_rn(x, sb), -FMAX, FMAX)
                tl.store(Y + yo + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def quant_launch_config(granularity: str, m: int, k: int) -> tuple[int, int, int, bool, int]:
    """(GROUP_M, BLOCK_M, BLOCK_K, ROW_SCALE, num_warps) of the quantisation kernel; the group's columns are k for
    "row" and "tensor", 128 for "tile" and "block2d". Chunks of 4096 elements (16 per thread at 8 warps)."""
    if granularity == "tile":
        return 32, 32, TILE, True, 8
    if granularity == "block2d":
        return TILE, 32, TILE, False, 8
    block_k = max(16, min(1024, next_power_of_2(k)))
    block_m = max(1, min(64, 4096 // block_k))
    return block_m, block_m, block_k, granularity == "row", 8


def _quantize_triton(x, fmt, granularity, amax):
    fmax = fp8_max(fmt)
    rows = as_rows(x)
    m, k = rows.shape
    data = torch.empty(x.shape, dtype=FORMATS[fmt], device=x.device)
    y = data.reshape(m, k)
    kt = -(-k // TILE)
    group_m, block_m, block_k, _, warps = quant_launch_config(granularity, m, k)
    whole_rows = granularity in ("tensor", "row")
    grid = (triton.cdiv(m, group_m), 1 if whole_rows else kt)
    group_k = k if whole_rows else TILE
    common = dict(FMAX=fmax, GROUP_M=group_m, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    if granularity == "tensor":
        if amax is None:
            # First pass: one partial amax per program (a chunk of whole rows), reduced by torch on the device.
            partial = torch.zeros(max(grid[0], 1), dtype=torch.float32, device=x.device)
            if m and k:
                _fp8_quant_kernel[grid](
                    rows, y, partial, m, k, k, rows.stride(0), k, 1, 0, MODE=_MODE_AMAX, ROW_SCALE=False, **common
                )
            amax = partial.max()
        scale_inv = _scale_from_amax(torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(()), fmax)
        if m and k:
            _fp8_quant_kernel[grid](
                rows, y, scale_inv, m, k, group_k, rows.stride(0), k, 0, 0, MODE=_MODE_CAST, ROW_SCALE=False, **common
            )
        return data, scale_inv
    if granularity == "block2d":
        scale_inv = torch.ones(triton.cdiv(m, TILE), kt, dtype=torch.float32, device=x.device)
    else:
        scale_inv = torch.ones(m, 1 if granularity == "row" else kt, dtype=torch.float32, device=x.device)
    if m and k:
        _fp8_quant_kernel[grid](
            rows, y, scale_inv, m, k, group_k, rows.stride(0), k, scale_inv.stride(0), scale_inv.stride(1),
            MODE=_MODE_QUANT, ROW_SCALE=granularity != "block2d", **common,
        )  # fmt: skip
    if granularity != "block2d":
        scale_inv = scale_inv.reshape(*x.shape[:-1], scale_inv.shape[-1])
    return data, scale_inv


def fp8_quantize(
    x: torch.Tensor,
    fmt: str = "e4m3",
    granularity: str = "tensor",
    amax: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x to FP8: returns (data, scale_inv) with ``x ~= data.float() * scale_inv`` (module docstring).

    fmt: "e4m3" | "e5m2". granularity: "tensor" (0-d scale) | "row" (``x.shape[:-1] + (1,)``) | "tile" (one per 1x128
    tile of the last dim, ``x.shape[:-1] + (ceil(k/128),)``) | "block2d" (2-D x, one per 128x128 block). amax: a
    precomputed amax for "tensor" (delayed scaling; larger values saturate), checked finite and >= 0 unless it is a
    CUDA tensor (that check would sync). backend: "auto" | "triton" | "torch".
    """
    fn = "kernels.fp8_quantize"
    triton_path = use_triton(fn, backend, x)
    _check_quantize(fn, x, fmt, granularity, amax)
    if not triton_path:
        return fp8_quantize_reference(x, fmt, granularity, amax)
    check_tensors(fn, True, x=x)
    return _quantize_triton(x, fmt, granularity, amax)


# ---------------------------------------------------------------------------------------------------------------------
# GEMM kernel


@triton.jit
def _fp8_matmul_kernel(
    A,
    B,
    C,
    SA,
    SB,
    m,
    n,
    k,
    sam,
    sbn,
    scm,
    ssa_r,
    ssa_k,
    ssb_r,
    ssb_k,
    A_ROW_DIV: tl.constexpr,
    B_ROW_DIV: tl.constexpr,
    K_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[i, j] = sum_k A[i, k] sa[i, k] * B[j, k] sb[j, k], a scale sx[r, kb] read at SX + (r // X_ROW_DIV) * ssx_r +
    # kb * ssx_k (stride 0 where the scale does not vary: tensor, or along k for row). K_SCALED: the scales vary along
    # k (tile/block2d on either side): each step's product (a fresh dot, at most BLOCK_K deep) is scaled in fp32 before
    # it is added, which also promotes the tensor cores' partial sums to fp32 every step.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(m, BLOCK_M)
    grid_n = tl.cdiv(n, BLOCK_N)
    width = GROUP_M * grid_n  # grouped order: GROUP_M row blocks share the B tiles they read from L2
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < m
    n_mask = rn < n
    a_ptr = A + rm.to(tl.int64)[:, None] * sam + rk[None, :]
    b_ptr = B + rn.to(tl.int64)[:, None] * sbn + rk[None, :]
    sa_ptr = SA + (rm // A_ROW_DIV) * ssa_r
    sb_ptr = SB + (rn // B_ROW_DIV) * ssb_r
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(k, BLOCK_K)):
        k_mask = (kb * BLOCK_K + rk) < k
        a = tl.load(a_ptr, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if K_SCALED:
            ks = (kb * BLOCK_K) // 128  # the scales' k block (BLOCK_K divides 128)
            sa = tl.load(sa_ptr + ks * ssa_k, mask=m_mask, other=0.0)
            sb = tl.load(sb_ptr + ks * ssb_k, mask=n_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        else:
            # sm_90's fp8 wgmma accumulates in less than fp32 (~14 bits, DeepSeek-V3 3.3.2) and Triton lets it run over
            # the whole K loop by default: promote to the fp32 accumulator every BLOCK_K products instead.
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    if not K_SCALED:
        sa = tl.load(sa_ptr, mask=m_mask, other=0.0)
        sb = tl.load(sb_ptr, mask=n_mask, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    c_ptr = C + rm.to(tl.int64)[:, None] * scm + rn[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def matmul_launch_config(k_scaled: bool) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): 128x128 output tiles with 128-deep K steps (the
    width of a scale tile, so K_SCALED reads one scale per operand row per step), 8 warps, 3 stages (96 KiB of fp8
    operands in shared memory). Compiled for sm_90 with the 16-divisible strides the launcher specialises on: wgmma,
    pipelined, 170 registers a thread (230 with per-k-block scales; a step's product and the sum are both live), no
    spills; 128x256 tiles spill with per-k-block scales. Untuned: a starting point for a sweep on a GPU."""
    return 128, 128, TILE, 8, 8, 3


def _scale_operand(scale, granularity, rows, kt):
    """(scale tensor, row divisor, row stride, k stride) for the kernel's indexing."""
    s = scale.float()
    if granularity == "tensor":
        return s.reshape(1), 1, 0, 0
    s = s.contiguous()
    if granularity == "row":
        return s, 1, s.stride(0), 0
    return s, (1 if granularity == "tile" else TILE), s.stride(0), s.stride(1)


def _matmul_triton(a, a_scale_inv, ga, b, b_scale_inv, gb, out_dtype):
    m, k = a.shape
    n = b.shape[0]
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    kt = -(-k // TILE)
    sa, a_div, ssa_r, ssa_k = _scale_operand(a_scale_inv, ga, m, kt)
    sb, b_div, ssb_r, ssb_k = _scale_operand(b_scale_inv, gb, n, kt)
    k_scaled = ga in ("tile", "block2d") or gb in ("tile", "block2d")
    bm, bn, bk, group_m, warps, stages = matmul_launch_config(k_scaled)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_matmul_kernel[grid](
        a, b, out, sa, sb, m, n, k, a.stride(0), b.stride(0), out.stride(0), ssa_r, ssa_k, ssb_r, ssb_k,
        A_ROW_DIV=a_div, B_ROW_DIV=b_div, K_SCALED=k_scaled, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _scaled_mm_supports(a, ga, b, gb, out_dtype) -> bool:
    """Whether torch._scaled_mm takes this case (see the module docstring)."""
    if not (a.is_cuda and hasattr(torch, "_scaled_mm")) or torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    m, k = a.shape
    n = b.shape[0]
    if k % 16 or n % 16 or m == 0 or not (a.is_contiguous() and b.is_contiguous()):
        return False
    if ga == gb == "tensor":
        return not (a.dtype == b.dtype == torch.float8_e5m2)  # e5m2 x e5m2 is refused by cuBLAS
    return ga == gb == "row" and a.dtype == b.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16


def fp8_matmul(
    a: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b: torch.Tensor,
    b_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """``(a * sa) @ (b * sb).T`` for fp8 a (m, k) and b (n, k), fp32 accumulation, scales applied in fp32; returns
    (m, n) in out_dtype (bf16 | fp16 | fp32). Each scale is () (tensor), (rows, 1) (row), (rows, ceil(k/128)) (1x128
    tiles) or (ceil(rows/128), ceil(k/128)) (128x128 blocks), as `fp8_quantize` returns them. backend: "auto" |
    "triton" | "torch"; "auto" on CUDA uses torch._scaled_mm for tensorwise and rowwise cases it supports.
    """
    fn = "kernels.fp8_matmul"
    triton_path = use_triton(fn, backend, a)
    ga, gb = _check_matmul(fn, a, a_scale_inv, b, b_scale_inv, out_dtype)
    if not triton_path:
        return fp8_matmul_reference(a, a_scale_inv, b, b_scale_inv, out_dtype)
    if backend == "auto" and _scaled_mm_supports(a, ga, b, gb, out_dtype):
        if ga == "tensor":
            sa, sb = a_scale_inv.float().reshape(()), b_scale_inv.float().reshape(())
        else:
            sa, sb = a_scale_inv.float().reshape(-1, 1), b_scale_inv.float().reshape(1, -1)
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return _matmul_triton(a, a_scale_inv, ga, b, b_scale_inv, gb, out_dtype)
