"""Shared host-side helpers for the Triton kernels: the backend switch, device checks, row/tile sizing, launch
heuristics.

Nothing here imports triton at import time, so callers (the model's backend switch, the benchmarks) can ask
`triton_available()` without paying for the import. The sizing heuristics are deliberately simple functions of the
shape: the Triton interpreter cannot run `@triton.autotune` with more than one config, so tests and GPU runs use the
same launch parameters.

Backends. Every public op and module of `kernels` takes `backend` = "auto" | "triton" | "torch", resolved per call
from its first tensor's device by `use_triton` (so a module built on CPU and moved to CUDA picks the kernel):
- "auto" (default): the Triton kernel on CUDA tensors, or on CPU tensors while `TRITON_INTERPRET=1` (read from the
  environment at each call); otherwise the op's plain-PyTorch reference, so the same model code runs on a laptop;
- "triton": the kernel, and a one-line ValueError where it cannot run (a CPU tensor without the interpreter, or no
  triton package);
- "torch": the reference.
On CUDA "auto" is exactly the kernel, as before. Where triton is not installed at all (it is not packaged for macOS or
Windows), `import_triton` gives the kernel modules stand-ins, so they still import and "auto" runs the references.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")

# Largest row a row-wise kernel keeps in registers at once (elements). Above this a row would spill; the
# norms refuse it with a clear error instead of silently running slowly (hidden sizes in LLMs are <= 32k).
MAX_FUSED_ROW = 65536


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_import_failed = False  # set by import_triton when a kernel module had to take the stand-ins


def triton_available() -> bool:
    """True when the `triton` package can be imported (checked without importing it)."""
    if _triton_import_failed:
        return False
    if "triton" in sys.modules:  # imported already (or blocked: None)
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def can_run(t: torch.Tensor) -> bool:
    """True when Triton kernels can run on tensor `t`: a CUDA tensor, or a CPU tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def check_backend(fn: str, backend: str) -> str:
    """Validates a backend name (one-line ValueError naming `fn`); returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def use_triton(fn: str, backend: str, t: object) -> bool:
    """Resolves `backend` for one call of `fn` whose first tensor is `t`: True runs the Triton kernel, False the
    plain-PyTorch reference (see the module docstring). Reads the device and TRITON_INTERPRET now, never caches."""
    check_backend(fn, backend)
    if backend == "torch":
        return False
    runnable = isinstance(t, torch.Tensor) and can_run(t)
    if backend == "auto":
        return runnable and triton_available()
    if not triton_available():
        raise ValueError(f"{fn}: backend='triton' needs the triton package (not installed); use 'auto' or 'torch'")
    if isinstance(t, torch.Tensor) and not runnable:
        raise ValueError(
            f"{fn}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got one on "
            f"{t.device}; use backend='auto' or 'torch'"
        )
    return True


class _TritonStub:
    """Stands in for `triton` where it is not installed: `@triton.jit` leaves the function as it is (never called)."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str):
        raise ImportError(f"triton is not installed (triton.{name}); use backend='auto' or 'torch'")


class _LanguageStub:
    """Stands in for `triton.language` where triton is not installed: module-level `tl.constexpr(v)` gives `v`."""

    @staticmethod
    def constexpr(value=None):
        return value

    def __getattr__(self, name: str):
        raise ImportError(f"triton is not installed (triton.language.{name}); use backend='auto' or 'torch'")


def import_triton():
    """(triton, triton.language) for a kernel module, or stand-ins when triton cannot be imported, so that the module
    still imports and its ops run their torch references (backend "auto" or "torch")."""
    global _triton_import_failed
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _triton_import_failed = True
        return _TritonStub(), _LanguageStub()
    return triton, tl


def check_tensors(fn: str, need_triton: bool = True, **tensors: torch.Tensor | None) -> torch.device:
    """Check that the given tensors are floating point, on one device, and (if `need_triton`) that Triton can run
    there.

    Raises a one-line ValueError naming the function and the argument. Returns the common device.
    """
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if device is None:
            device = t.device
            if need_triton and not can_run(t):
                raise ValueError(
                    f"{fn}: {name} is on {t.device}; the Triton kernels need a CUDA tensor "
                    "(or TRITON_INTERPRET=1 for CPU tensors); use the torch backend instead"
                )
        elif t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the other inputs are on {device}")
    return device


def acc_dtype(*dtypes: torch.dtype | None) -> torch.dtype:
    """The in-kernel compute dtype: fp64 when any input is fp64 (so gradcheck can run on the kernels), else fp32.

    Every kernel upcasts to it right after loading: the Triton interpreter's bf16 arithmetic is wrong on CPU, and
    fp32 statistics are what the numerics contract asks for anyway.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tl_acc_dtype(*dtypes: torch.dtype | None):
    """`acc_dtype` as the `triton.language` dtype passed to a kernel's ACC constexpr (imports triton when called)."""
    import triton.language as tl  # here, not at module level: importing kernels.utils must not import triton

    return tl.float64 if acc_dtype(*dtypes) == torch.float64 else tl.float32


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_warps_for(block_elements: int) -> int:
    """Warps per program for a row tile of this many elements (Liger-Kernel's `calculate_settings` thresholds).

    Row kernels that keep more live tensors per element (the norms' backward) take twice as many warps, capped at 32:
    at 8 warps the 4096-wide LayerNorm backward needs 154-163 registers a thread on sm_90, at 16 warps 86.
    """
    if block_elements >= 32768:
        return 32
    if block_elements >= 8192:
        return 16
    if block_elements >= 2048:
        return 8
    return 4


def elementwise_warps(tile_elements: int, per_thread: int = 8) -> int:
    """Warps for an elementwise tile so each thread holds ~`per_thread` elements per tensor (one 16-byte bf16
    vector at 8): few registers, so several programs fit on an SM. Sized from sm_90 register counts (ptxas)."""
    return max(1, min(16, tile_elements // (32 * per_thread)))


def row_tile(n_cols: int, fn: str = "kernel", budget: int = 4096, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a kernel that holds whole rows of `n_cols` elements in registers.

    BLOCK_N covers the row (a power of two, at least 16 so the compiler never sees degenerate layouts);
    BLOCK_M packs several short rows into one program so small hidden sizes still give each program
    ~`budget` elements of work (on GPU: fewer, fatter programs; under the interpreter: far fewer program
    instances, each of which costs milliseconds).
    """
    block_n = max(16, next_power_of_2(n_cols))
    if block_n > MAX_FUSED_ROW:
        raise ValueError(f"{fn}: the last dim is {n_cols}, more than the {MAX_FUSED_ROW} a fused row kernel supports")
    block_m = max(1, min(max_rows, budget // block_n))
    return block_m, block_n


def elementwise_tile(n_cols: int, budget: int = 4096, max_cols: int = 1024) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a 2-D elementwise kernel over rows of `n_cols` elements (row strides allowed)."""
    block_n = max(16, min(max_cols, next_power_of_2(n_cols)))
    return max(1, budget // block_n), block_n


def num_reduction_programs(device: torch.device, n_tiles: int, per_sm: int = 1) -> int:
    """Programs for a persistent kernel that also reduces across rows (e.g. weight gradients).

    Each program writes one fp32 partial row, summed afterwards in a fixed order: deterministic for a given
    device. `per_sm` programs per SM on GPU (enough to fill it and hide each program's load latency, few partial
    rows to sum); at most 4 under the interpreter, so the tests still exercise the multi-program reduction.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = per_sm * torch.cuda.get_device_properties(index).multi_processor_count  # cached by torch
    else:
        cap = 4
    return max(1, min(cap, n_tiles))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View `x` as (rows, last_dim) with a unit stride along the last dim, copying only when needed.

    Row strides are kept (a `chunk` of a fused projection stays a view); the kernels take the row stride.
    """
    if x.dim() == 0:
        x = x.reshape(1)
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        x = x.contiguous()
    # A last dim of size 1 may keep any stride: the kernels only ever index column 0 of it.
    return x.reshape(-1, x.shape[-1])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (the absolute error when ref is all zero); inf on NaN/inf mismatch or bad shape.

    Normwise rather than elementwise, so entries near zero do not dominate; the fp32 kernel-parity bound (1e-5,
    docs/contracts.md "Kernel parity") applies to this number.
    """
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    num = (out[fin] - ref[fin]).abs().max().item()
    den = ref[fin].abs().max().item()
    return num / den if den > 0 else num


def two_x_rule(
    out: torch.Tensor, ref: torch.Tensor, ref_same_dtype: torch.Tensor, floor_ulps: float = 0.5
) -> tuple[float, float]:
    """(error, allowed) for the low-precision kernel-parity rule (docs/contracts.md, "Kernel parity").

    error = max|out - ref| against a high-precision reference; allowed = 2 * max|ref_same_dtype - ref|, where
    ref_same_dtype is plain torch computing in out's dtype, plus a floor of `floor_ulps` units in the last place of
    out's dtype at ref's largest magnitude (the final rounding's worst case, so exact-looking references don't make the
    bound zero). Pass when error <= allowed.
    """
    if not (out.shape == ref.shape == ref_same_dtype.shape):
        raise ValueError(f"two_x_rule: shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0, 0.0
    r = ref.detach().double()
    err = (out.detach().double() - r).abs().max().item()
    base = (ref_same_dtype.detach().double() - r).abs().max().item()
    floor = floor_ulps * torch.finfo(out.dtype).eps * r.abs().max().item()
    return (float("inf") if err != err else err), 2.0 * base + floor
