"""Tensor/sequence-parallel benchmark: communication volume per step on CPU, per-layer time on a GPU.

CPU (default): spawns `--tp` gloo processes, runs one forward+backward of a small decoder built from the
engine.parallel layers, counts every collective (engine.parallel.comm_count) and checks calls and bytes against the
closed form below; exits non-zero on a mismatch.

    python -m benchmarks.bench_tp --tp 2 [--sp] [--layers 2 --d-model 64 --heads 4 --ffn 128 --vocab 251
                                          --batch 2 --seq 16]

Closed form per rank and step (Korthikanti et al. 2022, sec. 4.2; ring collectives: an all-reduce of P bytes
sends 2(t-1)/t P, an all-gather or reduce-scatter of a P-byte full tensor sends (t-1)/t P). With n = batch*seq
tokens, h = d_model, e = bytes per activation element, L layers:
  tp:  all-reduces: embedding 1 + per layer 4 (2 forward at the row-parallel outputs, 2 backward at the
       column-parallel inputs) + LM head input 1 (backward) of n*h*e bytes each, plus 2 for the vocab-parallel
       cross-entropy (max: 4n bytes; target logit and sum-exp stacked: 8n bytes).
       wire = 2(t-1)/t * ((4L + 2) n h e + 12 n)
  sp:  every n*h*e all-reduce above becomes one all-gather + one reduce-scatter (same wire bytes): 4L + 2 of each;
       plus one all-reduce of the sequence-parallel gradients (norm weights 2L+1, row biases 2L: (4L+1) h fp32).
       wire = 2(t-1)/t * ((4L + 2) n h e + 12 n + (4L + 1) h * 4)

GPU (`--gpu`; UNTESTED on a GPU: none was available when this was written, only the CPU path of `--time` ran):
one process, tp = 1; times forward+backward of one block: plain torch.nn.Linear, the tp layers at tp = 1 (their
overhead), and the fused Triton norm/SwiGLU kernels (`kernels.rms_norm`, `kernels.swiglu`) when importable.

    python -m benchmarks.bench_tp --gpu [--d-model 4096 --heads 32 --ffn 11008 --batch 4 --seq 2048]
    python -m benchmarks.bench_tp --time    # the same on CPU, small shapes, fp32, no fused variant
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel import state
from engine.parallel.comm_count import count_collectives
from engine.parallel.sequence import (
    allreduce_sequence_parallel_grads,
    mark_sequence_parallel,
    resolve_group,
)
from engine.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp_region,
    parallel_lm_logits,
    vocab_parallel_cross_entropy,
)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        import kernels

        return kernels.rms_norm(x, weight, eps=1e-6)
    return F.rms_norm(x, (x.shape[-1],), weight, eps=1e-6)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        import kernels

        return kernels.swiglu(gate, up)
    return F.silu(gate) * up


class ParallelBlock(nn.Module):
    """A pre-norm decoder block from the tp layers: causal attention (heads split over tp) and a SwiGLU MLP
    (hidden split over tp). Input and output are (b, s, d), or (b, s/tp, d) with `sequence_parallel`."""

    def __init__(
        self,
        d: int,
        n_heads: int,
        ffn: int,
        sequence_parallel: bool = False,
        group: dist.ProcessGroup | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.group = resolve_group(group)
        tp = dist.get_world_size(self.group)
        if n_heads % tp:
            raise ValueError(f"n_heads = {n_heads} is not divisible by the tensor-parallel size {tp}")
        self.sp, self.fused, self.head_dim, self.local_heads = sequence_parallel, fused, d // n_heads, n_heads // tp
        kw = dict(sequence_parallel=sequence_parallel, group=self.group)
        self.norm1 = nn.Parameter(torch.ones(d))
        self.q = ColumnParallelLinear(d, d, bias=False, skip_input_comm=True, **kw)
        self.k = ColumnParallelLinear(d, d, bias=False, skip_input_comm=True, **kw)
        self.v = ColumnParallelLinear(d, d, bias=False, skip_input_comm=True, **kw)
        self.o = RowParallelLinear(d, d, bias=True, **kw)
        self.norm2 = nn.Parameter(torch.ones(d))
        self.gate = ColumnParallelLinear(d, ffn, bias=False, skip_input_comm=True, **kw)
        self.up = ColumnParallelLinear(d, ffn, bias=False, skip_input_comm=True, **kw)
        self.down = RowParallelLinear(ffn, d, bias=True, **kw)
        if sequence_parallel:
            mark_sequence_parallel(self.norm1, self.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = enter_tp_region(_rms_norm(x, self.norm1, self.fused), self.group, self.sp)
        b, s = h.shape[:2]
        q, k, v = (m(h).view(b, s, self.local_heads, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(a)
        h = enter_tp_region(_rms_norm(x, self.norm2, self.fused), self.group, self.sp)
        return x + self.down(_swiglu(self.gate(h), self.up(h), self.fused))


class ReferenceBlock(nn.Module):
    """ParallelBlock's unsharded twin from plain torch.nn.Linear, built in the same order (same init per seed)."""

    def __init__(self, d: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.Parameter(torch.ones(d))
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.norm2 = nn.Parameter(torch.ones(d))
        self.gate, self.up = (nn.Linear(d, ffn, bias=False) for _ in range(2))
        self.down = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (x.shape[-1],), self.norm1, eps=1e-6)
        b, s, d = h.shape
        q, k, v = (m(h).view(b, s, self.n_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        h = F.rms_norm(x, (d,), self.norm2, eps=1e-6)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class ParallelGPT(nn.Module):
    """A tiny decoder from the tp layers: vocab-parallel embedding, blocks, final norm, tied vocab-parallel head and
    cross-entropy (the full logits never exist on one rank). `forward(tokens, targets)` returns the mean loss."""

    def __init__(
        self,
        vocab: int,
        d: int,
        n_heads: int,
        ffn: int,
        n_layers: int,
        sequence_parallel: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.group, self.sp, self.vocab = resolve_group(group), sequence_parallel, vocab
        self.embed = VocabParallelEmbedding(vocab, d, sequence_parallel=sequence_parallel, group=self.group)
        self.blocks = nn.ModuleList(
            ParallelBlock(d, n_heads, ffn, sequence_parallel, self.group) for _ in range(n_layers)
        )
        self.norm = nn.Parameter(torch.ones(d))
        if sequence_parallel:
            mark_sequence_parallel(self.norm)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, eps=1e-6)
        logits = parallel_lm_logits(x, self.embed.weight, self.group, self.sp)
        return vocab_parallel_cross_entropy(logits, targets, self.group, vocab_size=self.vocab)


def closed_form(tp: int, sp: bool, n_layers: int, d: int, tokens: int, elem: int = 4) -> dict[str, float]:
    """Expected collective calls and per-rank ring bytes for one ParallelGPT forward+backward (module docstring)."""
    big = tokens * d * elem
    ring = 2 * (tp - 1) / tp
    if sp:
        n = 4 * n_layers + 2
        calls = {"all_gather": n, "reduce_scatter": n, "all_reduce": 3}
        wire = ring * (n * big + 12 * tokens + (4 * n_layers + 1) * d * 4)
    else:
        calls = {"all_reduce": 4 * n_layers + 2 + 2}
        wire = ring * ((4 * n_layers + 2) * big + 12 * tokens)
    return {"calls": calls, "wire_bytes": wire}


def measure(rank: int, world: int, args: dict) -> dict:
    """One forward+backward under the counter (a `run_distributed` worker)."""
    state.initialize(tp=world)
    try:
        torch.manual_seed(0)
        model = ParallelGPT(
            args["vocab"], args["d_model"], args["heads"], args["ffn"], args["layers"], args["sp"], state.get_tp_group()
        )
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
        with count_collectives() as counter:
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            if args["sp"]:
                allreduce_sequence_parallel_grads(model, state.get_tp_group())
        return {"calls": counter.by_op(), "wire_bytes": counter.wire_bytes(), "loss": loss.item()}
    finally:
        state.destroy()


def run_cpu(args: argparse.Namespace) -> int:
    from tests.distributed import run_distributed

    cfg = dict(
        vocab=args.vocab, d_model=args.d_model, heads=args.heads, ffn=args.ffn, layers=args.layers,
        batch=args.batch, seq=args.seq, sp=args.sp,
    )  # fmt: skip
    results = run_distributed(measure, args.tp, cfg)
    expected = closed_form(args.tp, args.sp, args.layers, args.d_model, args.batch * args.seq)
    got = results[0]
    ok = got["calls"] == expected["calls"] and math.isclose(got["wire_bytes"], expected["wire_bytes"], rel_tol=1e-9)
    ok &= all(r["calls"] == got["calls"] and r["wire_bytes"] == got["wire_bytes"] for r in results)
    print(f"tp={args.tp} sp={args.sp} layers={args.layers} d={args.d_model} tokens={args.batch * args.seq} fp32")
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
    """tp = 1 per-block time: nn.Linear twin vs the tp layers (their overhead), unfused vs fused kernels (GPU)."""
    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("--gpu needs a CUDA device; use --time for a CPU timing", file=sys.stderr)
        return 2
    state.initialize(tp=1, backend="gloo")  # one process, no communication: gloo avoids an NCCL setup
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    x = torch.randn(args.batch, args.seq, args.d_model, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    rows = []
    variants = [("torch nn.Linear block", lambda: ReferenceBlock(args.d_model, args.heads, args.ffn))]
    variants.append(("tp layers, tp=1, unfused", lambda: ParallelBlock(args.d_model, args.heads, args.ffn)))
    if not cuda:
        rows.append(("tp layers, tp=1, fused", "GPU only (the CPU runs Triton in the interpreter)"))
    else:
        try:
            import kernels

            kernels.rms_norm, kernels.swiglu  # noqa: B018 - import the kernel modules now, to report a failure here
            fused = lambda: ParallelBlock(args.d_model, args.heads, args.ffn, fused=True)
            variants.append(("tp layers, tp=1, fused", fused))
        except Exception as e:  # noqa: BLE001 - report, do not fail, when the kernels are unavailable
            rows.append(("tp layers, tp=1, fused", f"unavailable: {type(e).__name__}: {e}"))
    try:
        for name, make in variants:
            block = make().to(dev, dtype)

            def step(block=block):
                block(x).backward(dy)

            rows.append((name, f"{_time(step, args.iters, cuda):.3f} ms"))
    finally:
        state.destroy()
    print(
        f"one block fwd+bwd on {dev}, b={args.batch} s={args.seq} d={args.d_model} heads={args.heads} "
        f"ffn={args.ffn} {str(dtype).removeprefix('torch.')}"
    )
    for name, value in rows:
        print(f"{name:32} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, help="default 64 on CPU, 4096 with --gpu")
    p.add_argument("--heads", type=int, help="default 4 on CPU, 32 with --gpu")
    p.add_argument("--ffn", type=int, help="default 128 on CPU, 11008 with --gpu")
    p.add_argument("--vocab", type=int, default=251)
    p.add_argument("--batch", type=int, help="default 2 on CPU, 4 with --gpu")
    p.add_argument("--seq", type=int, help="default 16 on CPU, 2048 with --gpu")
    p.add_argument("--gpu", action="store_true", help="time one block on a GPU at tp=1 (untested on a GPU)")
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
