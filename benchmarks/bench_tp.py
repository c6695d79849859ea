"""Tensor/sequence-parallel benchmark: communication volume per step on CPU, per-layer time on a GPU.

CPU (default): spawns `--tp` gloo processes, runs one forward+backward (and `finish_tp_grads`) of the real GPT
(engine.model, tied embeddings) built over the tp group, counts every collective (engine.parallel.comm_count) and
checks calls and bytes against the closed form below; exits non-zero on a mismatch.

    python -m benchmarks.bench_tp --tp 2 [--sp] [--arch llama|gpt2 --layers 2 --d-model 64 --heads 4 --kv-heads 4
                                          --ffn 128 --vocab 251 --batch 2 --seq 16]

Closed form per rank and step (Korthikanti et al. 2022, sec. 4.2; ring collectives: an all-reduce of P bytes
sends 2(t-1)/t P, an all-gather or reduce-scatter of a P-byte full tensor sends (t-1)/t P). With n = batch*seq
tokens, h = d_model, e = bytes per activation element, L layers:
  tp:  all-reduces: embedding 1 + per layer 4 (2 forward at the row-parallel outputs, 2 backward at the
       column-parallel inputs) + LM head input 1 (backward) of n*h*e bytes each, plus 2 for the vocab-parallel
       cross-entropy (max: 4n bytes; target logit and sum-exp stacked: 8n bytes).
       wire = 2(t-1)/t * ((4L + 2) n h e + 12 n)
  sp:  every n*h*e all-reduce above becomes one all-gather + one reduce-scatter (same wire bytes): 4L + 2 of each;
       plus one all-reduce of the gradients computed on sequence shards, G fp32 elements:
       llama G = (2L + 1) h (norm gains); gpt2 G = 2(2L + 1) h (norm gains and biases) + 2L h (row-parallel
       biases) + seq_len h (learned positions).
       wire = 2(t-1)/t * ((4L + 2) n h e + 12 n + 4 G)
       and 2L more all-gathers in the backward pass: the attention's and the MLP's projections keep their input as
       this rank's shard and gather it again (engine/parallel/regather.py): + (t-1)/t * 2L n h e
  GQA with fewer kv heads than t (kv projections replicated, `ReplicatedKVLinear`): their 2L (kv*hd) x h weight
  gradients are partial sums too: one more all-reduce without sp, the same flat buffer with sp.

GPU (`--gpu`): one process, tp = 1; times forward+backward of one real decoder block (engine.model.gpt.Block, llama)
with the plain PyTorch ops (`model.kernels=torch`) and with our fused Triton kernels (`model.kernels=triton`), each
without and with selective recomputation (the attention core checkpointed, the MLP activation's output rebuilt in
backward), and the peak memory of a step above the weights and inputs.

    python -m benchmarks.bench_tp --gpu [--d-model 4096 --heads 32 --ffn 11008 --batch 4 --seq 2048]
    python -m benchmarks.bench_tp --time    # the same on CPU, small shapes, fp32, torch ops only
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch.distributed._composable import checkpoint

from engine.config import Config, ModelConfig
from engine.model.gpt import GPT, Block, resolve
from engine.model.ops import rope_cos_sin
from engine.parallel.activation_recompute import recompute_output
from engine.parallel.comm_count import count_collectives
from engine.parallel.dims import ParallelDims
from engine.parallel.grads import finish_tp_grads
from engine.parallel.parallelize import parallelize_gpt


def model_config(args: dict) -> ModelConfig:
    """The benchmarked model: tied embeddings, torch ops, no dropout."""
    return ModelConfig(
        arch=args["arch"], n_layers=args["layers"], d_model=args["d_model"], n_heads=args["heads"],
        n_kv_heads=args["kv_heads"], ffn_hidden=args["ffn"], vocab_size=args["vocab"], seq_len=args["seq"],
        kernels="torch",
    )  # fmt: skip


def closed_form(
    tp: int,
    sp: bool,
    n_layers: int,
    d: int,
    tokens: int,
    elem: int = 4,
    arch: str = "llama",
    seq_len: int = 0,
    n_heads: int = 1,
    kv_heads: int = 0,
) -> dict[str, float]:
    """Expected collective calls and per-rank ring bytes for one GPT forward+backward + finish_tp_grads (module
    docstring). `seq_len`: the model's (learned positions, gpt2); `kv_heads` 0: as many as `n_heads`."""
    big = tokens * d * elem
    ring = 2 * (tp - 1) / tp
    kv_heads = kv_heads or n_heads
    partial = 2 * n_layers * kv_heads * (d // n_heads) * d if kv_heads < tp else 0  # replicated kv weights
    if sp:
        n = 4 * n_layers + 2
        g = (2 * n_layers + 1) * d if arch == "llama" else 2 * (2 * n_layers + 1) * d + 2 * n_layers * d + seq_len * d
        calls = {"all_gather": n + 2 * n_layers, "reduce_scatter": n, "all_reduce": 3}
        wire = ring * ((n + n_layers) * big + 12 * tokens + 4 * (g + partial))
    else:
        calls = {"all_reduce": 4 * n_layers + 2 + 2 + (1 if partial else 0)}
        wire = ring * ((4 * n_layers + 2) * big + 12 * tokens + 4 * partial)
    return {"calls": calls, "wire_bytes": wire}


def measure(rank: int, world: int, args: dict) -> dict:
    """One forward+backward of the real GPT under the counter (a `run_distributed` worker)."""
    dims = ParallelDims.from_world(tp=world)
    try:
        cfg = Config(model=model_config(args))
        cfg.parallel.sp = args["sp"]
        with torch.device("meta"):
            model = GPT(cfg.model)
        [model] = parallelize_gpt(model, dims, cfg, device="cpu")
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
        with count_collectives() as counter:
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            finish_tp_grads(model)
        return {"calls": counter.by_op(), "wire_bytes": counter.wire_bytes(), "loss": loss.item()}
    finally:
        dims.destroy()


def run_cpu(args: argparse.Namespace) -> int:
    from tests.distributed import run_distributed

    cfg = dict(
        arch=args.arch, vocab=args.vocab, d_model=args.d_model, heads=args.heads, kv_heads=args.kv_heads,
        ffn=args.ffn, layers=args.layers, batch=args.batch, seq=args.seq, sp=args.sp,
    )  # fmt: skip
    results = run_distributed(measure, args.tp, cfg)
    expected = closed_form(
        args.tp, args.sp, args.layers, args.d_model, args.batch * args.seq, arch=args.arch, seq_len=args.seq,
        n_heads=args.heads, kv_heads=args.kv_heads,
    )  # fmt: skip
    got = results[0]
    ok = got["calls"] == expected["calls"] and math.isclose(got["wire_bytes"], expected["wire_bytes"], rel_tol=1e-9)
    ok &= all(r["calls"] == got["calls"] and r["wire_bytes"] == got["wire_bytes"] for r in results)
    print(
        f"tp={args.tp} sp={args.sp} {args.arch} layers={args.layers} d={args.d_model} heads={args.heads}/"
        f"{args.kv_heads or args.heads} tokens={args.batch * args.seq} fp32"
    )
    print(f"{'':12} {'calls':60} {'wire bytes/rank':>16}")
    print(f"{'measured':12} {str(got['calls']):60} {got['wire_bytes']:16.0f}")
    print(f"{'closed form':12} {str(expected['calls']):60} {expected['wire_bytes']:16.0f}")
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


def _time(fn, iters: int, cuda: bool) -> float:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def run_timing(args: argparse.Namespace) -> int:
    """tp = 1 time of one real decoder block (llama), plain PyTorch ops vs our fused Triton kernels (GPU)."""
    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("--gpu needs a CUDA device; use --time for a CPU timing", file=sys.stderr)
        return 2
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    x = torch.randn(args.batch, args.seq, args.d_model, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    cos, sin = rope_cos_sin(args.seq, args.d_model // args.heads, 10000.0, device=dev)
    rows = []
    backends = ["torch"]
    if cuda:
        backends.append("triton")
    else:
        rows.append(("block, kernels=triton (fused)", "GPU only (the CPU runs Triton in the interpreter)"))
    for backend, recompute in [(b, r) for b in backends for r in ("none", "selective")]:
        cfg = model_config(dict(vars(args), layers=1, vocab=64, arch="llama"))
        cfg.kernels = backend
        name = f"block, kernels={backend}, recompute={recompute}"
        try:
            block = Block(resolve(cfg)).to(dev, dtype)
            if recompute == "selective":  # apply_recompute's: the attention core, and the MLP activation's output
                checkpoint(block.attn.core)
                recompute_output(block.mlp.act, block.mlp.down_proj)

            def step(block=block):
                block(x, cos, sin).backward(dy)

            ms = _time(step, args.iters, cuda)
            if cuda:  # the peak over one more step, above what is allocated before it (weights, x, dy)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows.append((name, f"{ms:.3f} ms, peak +{peak:.0f} MiB"))
            else:
                rows.append((name, f"{ms:.3f} ms"))
        except Exception as e:  # noqa: BLE001 - report, do not fail, when a backend is unavailable
            rows.append((name, f"unavailable: {type(e).__name__}: {e}"))
    print(
        f"one llama block fwd+bwd on {dev}, b={args.batch} s={args.seq} d={args.d_model} heads={args.heads} "
        f"ffn={args.ffn} {str(dtype).removeprefix('torch.')}"
    )
    for name, value in rows:
        print(f"{name:48} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, help="default 64 on CPU, 4096 with --gpu")
    p.add_argument("--heads", type=int, help="default 4 on CPU, 32 with --gpu")
    p.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    p.add_argument("--ffn", type=int, help="default 128 on CPU, 11008 with --gpu")
    p.add_argument("--vocab", type=int, default=251)
    p.add_argument("--batch", type=int, help="default 2 on CPU, 4 with --gpu")
    p.add_argument("--seq", type=int, help="default 16 on CPU, 2048 with --gpu")
    p.add_argument("--gpu", action="store_true", help="time one block on a GPU at tp=1")
    p.add_argument("--time", action="store_true", help="time one block at tp=1 on whatever device there is")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    big = args.gpu or (args.time and torch.cuda.is_available())
    defaults = (4096, 32, 11008, 4, 2048) if big else (64, 4, 128, 2, 16)
    for key, value in zip(("d_model", "heads", "ffn", "batch", "seq"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu or args.time:
        return run_timing(args)
    if args.tp < 2:
        p.error("--tp must be at least 2 for the communication count")
    return run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
