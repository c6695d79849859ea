"""Context parallelism on CPU processes: the longest sequence one training step fits in a per-process memory cap at
cp 1, 2 and 4 (ring and all-to-all), and ring vs all-to-all step time at one sequence length.

    python -m benchmarks.bench_cp [--cp 1,2,4] [--impls ring,alltoall] [--cap-mb 256] [--time-seq 4096]
                                  [--layers 2 --d-model 64 --heads 4] [--documents] [--json out.json]

Model: a llama (engine.model.GPT, torch ops, fp32, byte-sized vocabulary) whose attention cores are swapped for
`ContextParallelAttentionCore` over the cp group (cp 1 included: the ring over one rank); one step = forward and
backward of one sequence (each rank its zigzag chunks), the gradients summed over cp, AdamW. Memory: the growth of
the process's peak resident set (`ru_maxrss`) over its value after a warm-up step, the largest over the cp ranks;
sequences are tried in increasing order (multiples of 512, about 1.25x apart, each a fresh step) until one exceeds
`--cap-mb`, and the last that fitted is reported (a row that reaches MAX_SEQ reports it, not its limit). On CPU both
implementations attend with torch's fused flash attention (the ring block by block, with the log-sum-exp the aten op
returns; all-to-all over the whole sequence with heads / cp heads), so neither materialises the score matrix and
memory is dominated by the s / cp tokens' activations each rank holds: both grow about linearly with cp. With
`--documents` the segment ids become additive masks of each block (ring) or of the whole sequence (all-to-all). Step
time: the median of 3 steps after one warm-up, each between barriers. At cp 4 the processes share the machine's cores
(2 here): times measure contention as well.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.model.gpt import GPT
from engine.parallel.context import apply_context_parallel, shard_sequence

MAX_SEQ = 1 << 15  # the longest sequence tried (a row that reaches it reports it, not its limit)


def _model(args: dict, seq_cap: int, impl: str) -> GPT:
    cfg = ModelConfig(arch="llama", n_layers=args["layers"], d_model=args["d_model"], n_heads=args["heads"],
                      seq_len=seq_cap, vocab_size=256, kernels="torch")  # fmt: skip
    model = GPT(cfg, seed=0)
    apply_context_parallel(model, dist.group.WORLD, impl)
    return model


def _step(model: GPT, opt: torch.optim.Optimizer, seq: int, documents: bool) -> float:
    """One training step on one sequence of `seq` tokens (this rank's zigzag chunks); returns its loss sum."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seq)
    tokens = torch.randint(0, 256, (1, seq + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    kw = {"positions": shard_sequence(torch.arange(seq)[None], world, rank)}
    if documents:  # documents of 1024 tokens
        kw["segment_ids"] = shard_sequence(torch.arange(seq)[None] // 1024, world, rank)
    loss = model(shard_sequence(x, world, rank), shard_sequence(y, world, rank), reduction="sum", **kw)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _candidates(start: int = 1024) -> list[int]:
    out, s = [], start
    while s <= MAX_SEQ:
        out.append(s)
        s = max(s + 512, int(s * 1.25) // 512 * 512)
    return out


def _worker(rank: int, world: int, args: dict, impl: str) -> dict:
    torch.set_num_threads(1)
    model = _model(args, MAX_SEQ, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, opt, 512, args["documents"])
    base = _peak_mb()
    longest, peak, tried = 0, 0.0, []
    for seq in _candidates():
        _step(model, opt, seq, args["documents"])
        grew = torch.tensor([_peak_mb() - base])
        dist.all_reduce(grew, op=dist.ReduceOp.MAX)
        tried.append((seq, round(float(grew), 1)))
        if float(grew) > args["cap_mb"]:
            break
        longest, peak = seq, float(grew)
    times = []
    if args["time_seq"]:
        _step(model, opt, args["time_seq"], args["documents"])
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            _step(model, opt, args["time_seq"], args["documents"])
            dist.barrier()
            times.append(time.perf_counter() - t0)
    return {"cp": world, "impl": impl, "longest_seq": longest, "peak_mb": round(peak, 1), "tried": tried,
            "step_s": statistics.median(times) if times else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from tests.distributed import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cp", default="1,2,4", help="comma-separated context-parallel degrees")
    p.add_argument("--impls", default="ring,alltoall")
    p.add_argument("--cap-mb", type=float, default=256.0, help="per-process memory cap (peak RSS growth), MiB")
    p.add_argument("--time-seq", type=int, default=4096, help="sequence length of the step-time comparison; 0: none")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--documents", action="store_true", help="segment ids: documents of 1024 tokens")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    args = {k: v for k, v in vars(a).items() if k not in ("cp", "impls", "json")}
    rows = []
    for cp in (int(x) for x in a.cp.split(",")):
        for impl in a.impls.split(","):
            if cp == 1 and impl != a.impls.split(",")[0]:
                continue  # one rank: the impls are the same attention
            [row, *_] = run_distributed(_worker, cp, args, impl, timeout=1800)
            rows.append(row)
    print(f"cap {a.cap_mb:.0f} MiB per process; model {a.layers} layers, d_model {a.d_model}, {a.heads} heads"
          f"{', documents of 1024 tokens' if a.documents else ''}")  # fmt: skip
    step_head = f"step s @ {a.time_seq}"
    print(f"{'cp':>3} {'impl':>9} {'longest seq':>12} {'peak MiB':>9} {'vs cp 1':>8} {step_head:>14}")
    base = next((r["longest_seq"] for r in rows if r["cp"] == 1), None)
    for r in rows:
        ratio = f"{r['longest_seq'] / base:.2f}x" if base else "-"
        step = f"{r['step_s']:.3f}" if r["step_s"] is not None else "-"
        print(f"{r['cp']:>3} {r['impl']:>9} {r['longest_seq']:>12} {r['peak_mb']:>9.1f} {ratio:>8} {step:>14}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
