"""Pipeline schedules on CPU processes: the measured step time and bubble against the closed form.

    python -m benchmarks.bench_pp [--pp 2] [--micro 8] [--fwd-ms 20] [--bwd-ms 40]

Each stage's forward and backward *sleep* a fixed time (a stand-in for compute that 2 shared cores cannot time
reliably: pp busy processes would measure the machine, not the schedule), so the bubble fraction
1 - busy / step time should approach (p-1)/(m+p-1) for GPipe and 1F1B and (p-1)/(vm+p-1) for interleaved 1F1B
(each of v chunks costs 1/v of a stage), plus messaging overhead; the runner is engine.parallel.pipeline.runner.
The comparison with torch.distributed.pipelining in the same run is still to come.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

D = 16  # activation width


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, grad.sum().reshape(1), None, None


class SleepStage(nn.Module):
    """A pipeline stage costing fwd_s forward and bwd_s backward; the last one returns a loss."""

    def __init__(self, fwd_s: float, bwd_s: float, last: bool):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.fwd_s, self.bwd_s, self.last = fwd_s, bwd_s, last
        self.tok_emb = self.output = None  # what our runner's chunks expose

    def forward(self, x, y=None, reduction="mean"):
        if x.dtype != torch.float32:  # token ids at the first stage
            x = torch.ones(*x.shape, D)
        h = _Sleep.apply(x, self.w, self.fwd_s, self.bwd_s)
        return h.sum() if y is not None else h


def _ours(schedule, pp, v, micro, fwd_s, bwd_s, steps):
    from engine.parallel.pipeline.runner import PipelineRunner

    rank = dist.get_rank()
    n_stages = pp * v
    chunks = [SleepStage(fwd_s / v, bwd_s / v, c * pp + rank == n_stages - 1) for c in range(v)]
    runner = PipelineRunner(chunks, schedule, list(range(pp)), rank, (1, 4, D), torch.float32, torch.device("cpu"))
    batches = [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)) for _ in range(micro)]
    n = torch.tensor(float(micro), dtype=torch.float64)
    return _time(lambda: runner.run(batches, n), steps)


def _time(fn, steps):
    fn()  # warm-up (their first step also agrees shapes)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, args):
    rows = []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        if schedule == "interleaved" and args["micro"] % world:
            continue
        ours = _ours(schedule, world, v, args["micro"], args["fwd"], args["bwd"], args["steps"])
        busy = args["micro"] * (args["fwd"] + args["bwd"])
        closed = (world - 1) / (v * args["micro"] + world - 1)
        rows.append((schedule, v, ours, busy / (1 - closed), 1 - busy / ours, closed))
    return rows


def main(argv: list[str] | None = None) -> int:
    from tests.distributed import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--fwd-ms", type=float, default=20.0)
    p.add_argument("--bwd-ms", type=float, default=40.0)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    args = {"micro": a.micro, "fwd": a.fwd_ms / 1e3, "bwd": a.bwd_ms / 1e3, "steps": a.steps}
    rows = run_distributed(_worker, a.pp, args, timeout=600)[0]
    print(f"pp {a.pp}, {a.micro} micro-batches, stage forward {a.fwd_ms} ms + backward {a.bwd_ms} ms (sleeps), gloo")
    print(f"{'schedule':14} {'step s':>8} {'ideal s':>8} {'bubble':>7} {'closed form':>11}")
    for schedule, v, ours, ideal, bubble, closed in rows:
        name = f"{schedule} v{v}" if v > 1 else schedule
        print(f"{name:14} {ours:8.3f} {ideal:8.3f} {bubble:7.3f} {closed:11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
