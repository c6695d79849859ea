"""Launch-config sweeps for the Triton kernels on a GPU: the data behind each kernel's hard-coded config.

    python -m benchmarks.sweep_kernels [--only attention,norms,flce] [--json out.json] [--smoke]

Each kernel takes one config chosen on the host (no `@triton.autotune`: the Triton interpreter cannot run one with
several configs), so tuning is a sweep run once per GPU generation and its winner written into the config function:
- attention: `launch_config` replaced in turn by each candidate for the forward, the dK/dV kernel and the dQ kernel
  (bf16, head_dim 128, causal MHA and GQA); each candidate's outputs are checked against the current config's.
- norms: the row tile, warps (backward: twice the forward's) and number of reduction programs of the RMSNorm /
  LayerNorm forward and backward.
- flce: fused linear cross-entropy's chunk size at vocab 32k and 128k (time and peak memory), and the three ways to
  add a chunk's weight gradient into the fp32 sum (fp32-output GEMM, fp32 copies, a 16-bit product).
Times are `triton.testing.do_bench` medians in ms. `--smoke` runs tiny shapes with two candidates each, on CPU under
`TRITON_INTERPRET=1`, to check the script itself.
"""

# ruff: noqa: B023 - each timed lambda runs inside the loop iteration that made it

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

ATTN_FWD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3)]  # fmt: skip
ATTN_DKDV = [(64, 64, 8, 2), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3),
             (64, 64, 4, 3), (16, 128, 4, 3), (32, 128, 4, 2), (64, 64, 8, 3)]  # fmt: skip
ATTN_DQ = [(64, 64, 8, 2), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3),
           (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2), (128, 32, 4, 2)]  # fmt: skip


def bench(fn: Callable[[], object], smoke: bool) -> float:
    if smoke:
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=30)


def sweep_attention(dev: torch.device, smoke: bool) -> list[dict]:
    import kernels.attention as A

    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(1, 40, 2, 1, 16, True)] if smoke else [(4, 2048, 32, 32, 128, True), (2, 4096, 32, 8, 128, True)]
    rows = []
    default = A.launch_config
    for b, s, hq, hk, d, causal in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hk, hk))
        do = torch.randn(b, s, hq, d, device=dev, dtype=dtype, generator=g)
        scale = d**-0.5
        out0, lse0 = A.flash_attention_forward(q, k, v, causal, scale)
        grads0 = A.flash_attention_backward(do, None, q, k, v, out0, lse0, causal, scale)
        flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
        best = dict(default(d, dtype, dev))
        for kind, cands in (("fwd", ATTN_FWD), ("dkdv", ATTN_DKDV), ("dq", ATTN_DQ)):
            for cfg in cands[:2] if smoke else cands:
                trial = {**best, kind: cfg}
                A.launch_config = lambda *a, _t=trial: _t  # noqa: E731 - the module reads it at each launch
                row = {"sweep": "attention", "shape": [b, s, hq, hk, d, causal], "kernel": kind, "config": cfg}
                try:
                    if kind == "fwd":
                        out, lse = A.flash_attention_forward(q, k, v, causal, scale)
                        row["max_err"] = (out.float() - out0.float()).abs().max().item()
                        row["ms"] = bench(lambda: A.flash_attention_forward(q, k, v, causal, scale), smoke)
                        row["tflops"] = flops / row["ms"] / 1e9
                    else:
                        grads = A.flash_attention_backward(do, None, q, k, v, out0, lse0, causal, scale)
                        row["max_err"] = max(
                            (a.float() - b_.float()).abs().max().item() for a, b_ in zip(grads, grads0)
                        )
                        row["ms"] = bench(
                            lambda: A.flash_attention_backward(do, None, q, k, v, out0, lse0, causal, scale), smoke
                        )
                        row["tflops"] = 2.5 * flops / row["ms"] / 1e9
                except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                finally:
                    A.launch_config = default
                print(json.dumps(row), flush=True)
                rows.append(row)
            ok = [
                r for r in rows if r.get("kernel") == kind and r["shape"][1] == s and "ms" in r and r["max_err"] < 0.1
            ]
            if ok:
                best[kind] = tuple(min(ok, key=lambda r: r["ms"])["config"])
        print(json.dumps({"sweep": "attention", "shape": [b, s, hq, hk, d, causal], "best": best}), flush=True)
    return rows


def sweep_norms(dev: torch.device, smoke: bool) -> list[dict]:
    import kernels.norms as N

    dtype = torch.float32 if smoke else torch.bfloat16
    m, n = (37, 64) if smoke else (8192, 4096)
    x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(n, device=dev, dtype=dtype)).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    saved = N.launch_config, N.num_reduction_programs
    rows = []
    grid = [(bm, wp, mult) for bm in (1, 2, 4) for wp in (4, 8, 16) for mult in (1, 4, 16)]
    for name, fn in (
        ("rmsnorm", lambda: N.rms_norm(x, w, 1e-6)),
        ("layernorm", lambda: N.layer_norm(x, w, bias, 1e-5)),
    ):
        for bm, wp, mult in grid[:2] if smoke else grid:
            # forward warps wp, backward twice that (more live tensors per element), capped at 32
            N.launch_config = lambda cols, fn="", _bm=bm, _w=wp: (
                _bm,
                max(16, 1 << (cols - 1).bit_length()),
                _w,
                min(32, 2 * _w),
            )
            N.num_reduction_programs = lambda d, t, per_sm=1, _m=mult: max(1, min(t, _m * (4 if smoke else 132)))
            row = {"sweep": "norms", "kernel": name, "shape": [m, n], "block_m": bm, "warps": wp, "programs_x": mult}
            try:
                y = fn()
                row["fwd_ms"] = bench(fn, smoke)
                row["bwd_ms"] = bench(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True), smoke)
                row["fwd_gbs"] = 2 * m * n * dtype.itemsize / row["fwd_ms"] / 1e6
                row["bwd_gbs"] = 3 * m * n * dtype.itemsize / row["bwd_ms"] / 1e6
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                N.launch_config, N.num_reduction_programs = saved
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def sweep_flce(dev: torch.device, smoke: bool) -> list[dict]:
    import kernels.linear_cross_entropy as L

    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    shapes = [(64, 32, 200)] if smoke else [(8192, 4096, 32000), (8192, 4096, 131072)]
    for n, h, vocab in shapes:
        hid = (torch.randn(n, h, device=dev, dtype=dtype) * 0.5).requires_grad_()
        wt = (torch.randn(vocab, h, device=dev, dtype=dtype) * 0.02).requires_grad_()
        tgt = torch.randint(0, vocab, (n,), device=dev)
        chunks = [16, 32] if smoke else [256, 512, 1024, 2048, 4096, 8192]
        for chunk in chunks:
            row = {
                "sweep": "flce",
                "shape": [n, h, vocab],
                "chunk": chunk,
                "default": L.default_chunk_size(n, h, vocab),
            }

            def step(c=chunk):
                L.fused_linear_cross_entropy(hid, wt, tgt, chunk_size=c).backward()

            try:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                row["ms"] = bench(step, smoke)
                if dev.type == "cuda":
                    row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        # One chunk's weight-gradient accumulation (V x c x H into fp32), three ways.
        c = 64 if smoke else 256
        acc = torch.zeros(vocab, h, device=dev, dtype=torch.float32)
        a = torch.randn(vocab, c, device=dev, dtype=dtype)
        b = torch.randn(c, h, device=dev, dtype=dtype)
        ways = {
            "out_dtype": lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
            "fp32_copies": lambda: acc.addmm_(a.float(), b.float()),
            "16bit_product": lambda: acc.add_(a @ b),
        }
        for way, fn in ways.items():
            row = {"sweep": "flce_accumulate", "shape": [vocab, c, h], "way": way}
            try:
                row["ms"] = bench(fn, smoke)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


SWEEPS = {"attention": sweep_attention, "norms": sweep_norms, "flce": sweep_flce}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SWEEPS), help="comma-separated: " + ",".join(SWEEPS))
    p.add_argument("--json", help="write every row to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two candidates each (CPU interpreter check)")
    args = p.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    unknown = [s for s in names if s not in SWEEPS]
    if unknown:
        p.error(f"unknown sweep(s) {unknown}; choose from {list(SWEEPS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("sweep_kernels: needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    rows = []
    for name in names:
        try:
            rows += SWEEPS[name](dev, args.smoke)
        except Exception:  # noqa: BLE001 - one sweep's failure must not lose the others' rows
            traceback.print_exc()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
