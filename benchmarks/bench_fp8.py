"""FP8 GEMM throughput on a GPU: ours (kernels.fp8_matmul's Triton kernel) and torch._scaled_mm against a bf16
torch.matmul of the same shape, with and without the cost of quantising the inputs.

    python -m benchmarks.bench_fp8 [--shapes 4096,8192,16384,llama] [--json out.json]   # a lent GPU
    python -m benchmarks.bench_fp8 --smoke                                              # CPU: the code paths only

Per (m, n, k) (square sizes, and Llama-3 8B's linears at 8192 tokens: qkv 8192 x 6144 x 4096, o 8192 x 4096 x 4096,
gate+up 8192 x 28672 x 4096, down 8192 x 4096 x 14336): `(a sa) @ (b sb)^T` with a (m, k), b (n, k) in e4m3, bf16
output, for tensorwise and rowwise scales (ours and torch._scaled_mm) and DeepSeek-V3's 1x128 tiles x 128x128 blocks
(ours only; torch._scaled_mm takes no such scales here). Timings: `triton.testing.do_bench` medians; TFLOP/s =
2mnk / time. "+quant" rows time `fp8_quantize` of both bf16 inputs plus the GEMM (what a linear with current scaling
pays per call; a cached weight would pay half of the quantisation). Each row checks its output against the
dequantised fp32 product (relative Frobenius error printed; a row above 1e-2 is marked BAD and the exit status is 1).
The speed-up column is bf16 time / row time. Target (issue 13): at least 1.6x bf16 at 8192^3 on H100/H200.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

LLAMA = {"llama qkv": (8192, 6144, 4096), "llama o": (8192, 4096, 4096), "llama gate+up": (8192, 28672, 4096),
         "llama down": (8192, 4096, 14336)}  # fmt: skip
GRANULARITIES = {"tensor": ("tensor", "tensor"), "row": ("row", "row"), "tile x block": ("tile", "block2d")}


def _shapes(spec: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for item in spec.split(","):
        if item == "llama":
            out.update(LLAMA)
        else:
            n = int(item)
            out[f"{n}^3"] = (n, n, n)
    return out


def _time_ms(fn: Callable[[], object], smoke: bool) -> float:
    if smoke:  # CPU: one call, wall clock (the numbers mean nothing; the paths run)
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm().clamp(min=1e-30))


def _quantized_gemm(a, b, ga: str, gb: str, quant_backend: str, gemm_backend: str) -> torch.Tensor:
    """fp8_quantize both bf16 inputs, then the GEMM: what a current-scaling linear pays per call."""
    from kernels.fp8 import fp8_matmul, fp8_quantize

    xa, ya = fp8_quantize(a, "e4m3", ga, backend=quant_backend)
    xb, yb = fp8_quantize(b, "e4m3", gb, backend=quant_backend)
    return fp8_matmul(xa, ya, xb, yb, out_dtype=torch.bfloat16, backend=gemm_backend)


def bench_shape(name: str, m: int, n: int, k: int, smoke: bool) -> list[dict]:
    from kernels.fp8 import _scaled_mm_supports, fp8_dequantize, fp8_matmul, fp8_quantize

    device = "cpu" if smoke else "cuda"
    backend = "torch" if smoke else "triton"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    b = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(torch.bfloat16)
    flops = 2 * m * n * k
    bf16_ms = _time_ms(lambda: a @ b.t(), smoke)
    rows = [{"shape": name, "m": m, "n": n, "k": k, "impl": "bf16 matmul", "ms": bf16_ms,
             "tflops": flops / bf16_ms / 1e9, "speedup": 1.0, "err": 0.0}]  # fmt: skip
    for label, (ga, gb) in GRANULARITIES.items():
        qa, sa = fp8_quantize(a, "e4m3", ga, backend=backend)
        qb, sb = fp8_quantize(b, "e4m3", gb, backend=backend)
        want = fp8_dequantize(qa, sa) @ fp8_dequantize(qb, sb).t()
        impls = {"ours": backend}
        if not smoke and _scaled_mm_supports(qa, ga, qb, gb, torch.bfloat16):
            impls["torch._scaled_mm"] = "auto"
        for impl, be in impls.items():
            gemm = functools.partial(fp8_matmul, qa, sa, qb, sb, out_dtype=torch.bfloat16, backend=be)
            with_quant = functools.partial(_quantized_gemm, a, b, ga, gb, backend, be)
            err = _rel_err(gemm(), want)
            for suffix, fn in (("", gemm), (" +quant", with_quant)):
                ms = _time_ms(fn, smoke)
                rows.append({"shape": name, "m": m, "n": n, "k": k, "impl": f"{impl} {label}{suffix}", "ms": ms,
                             "tflops": flops / ms / 1e9, "speedup": bf16_ms / ms, "err": err})  # fmt: skip
        if not smoke:
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096,8192,16384,llama", help="square sizes and/or 'llama'")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: run the code paths (no timing meaning)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_fp8 needs a CUDA device (use --smoke on CPU)")
        return 0
    shapes = {"smoke 64x48x256": (64, 48, 256)} if args.smoke else _shapes(args.shapes)
    rows = []
    for name, (m, n, k) in shapes.items():
        rows += bench_shape(name, m, n, k, args.smoke)
    if not args.smoke:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':>16} {'impl':>34} {'ms':>9} {'TFLOP/s':>8} {'vs bf16':>8} {'rel err':>9}")
    bad = False
    for r in rows:
        flag = " BAD" if r["err"] > 1e-2 else ""
        bad |= bool(flag)
        print(f"{r['shape']:>16} {r['impl']:>34} {r['ms']:>9.3f} {r['tflops']:>8.1f} {r['speedup']:>7.2f}x "
              f"{r['err']:>9.2e}{flag}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
