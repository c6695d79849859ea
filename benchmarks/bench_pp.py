"""Pipeline schedules on CPU processes: our step time and bubble against the closed form, and against
torch.distributed.pipelining's schedules on the same stages in the same run.

    python -m benchmarks.bench_pp [--pp 2] [--micro 8] [--fwd-ms 20] [--bwd-ms 40] [--steps 3]

Each stage's forward and backward *sleep* a fixed time (a stand-in for compute that 2 shared cores cannot time
reliably: pp busy processes would measure the machine, not the schedule). The backward is split as a zero-bubble
schedule needs it: the input gradient (B) sleeps bwd/2 and the weight gradient (W) bwd/2, in two autograd nodes, so
our WeightGradStore (deferred.py) and torch's own input/weight split can each defer W. Bubble = 1 - busy / step time,
busy = m (F + B + W) with F = fwd, B = W = bwd/2; ideal step = busy / (1 - closed form). Closed forms, after the
bubble times of Qi et al. 2023 ("Zero Bubble Pipeline Parallelism"): GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B
(p-1)/(vm+p-1) (each of v chunks costs 1/v of a stage); ZB-H1 (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)), which is
(p-1)/(3m+p-1) at F = B = W (the defaults). Ours is engine.parallel.pipeline.runner; theirs is PipelineStage with
ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B (2 stages per rank), ScheduleInterleavedZeroBubble with one
stage per rank (ZB1P: the same action order as our ZB-H1 at pp 2) and, with no counterpart of ours,
ScheduleZBVZeroBubble (2 stages per rank in a V: rank r holds stages r and 2p-1-r, which it requires; no closed form
given). Both sides run the same micro-batches (theirs split the full batch themselves), the same sleeps and the same
(1, 4, 16) activations; torch's split leaves its first stage's B empty and runs the whole backward in W (its design).
A schedule that cannot run is reported in one line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.pipeline.deferred import WeightGradStore

D, S = 16, 4  # activation width, sequence length: activations are (1, S, D) per micro-batch


class _SleepInput(torch.autograd.Function):
    """The stage's forward (sleep fwd_s) and its input-gradient backward (sleep bwd_s)."""

    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, None, None


class _SleepWeight(torch.autograd.Function):
    """The stage's weight-gradient backward (sleep bwd_s), queued on the store while it is deferring (our B)."""

    @staticmethod
    def forward(ctx, w, bwd_s, store):
        ctx.bwd_s, ctx.store, ctx.param = bwd_s, store, w
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.store is not None and ctx.store.active is not None:
            param, bwd_s = ctx.param, ctx.bwd_s
            ctx.store.active.append(lambda: _weight_grad(param, grad, bwd_s))
            return None, None, None
        time.sleep(ctx.bwd_s)
        return grad, None, None


def _weight_grad(param: torch.Tensor, grad: torch.Tensor, bwd_s: float) -> None:
    time.sleep(bwd_s)
    param.grad = grad.clone() if param.grad is None else param.grad + grad


class SleepStage(nn.Module):
    """A pipeline stage costing fwd_s forward and bwd_s backward (half input, half weight gradient). Returns the
    activation, or with a target (our runner's last stage) its sum as the loss; theirs takes the loss from `_loss`."""

    weight_grad_store: WeightGradStore | None = None  # set by our runner for split-backward schedules

    def __init__(self, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.fwd_s, self.bwd_s = fwd_s, bwd_s
        self.tok_emb = self.output = None  # what our runner's chunks expose

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        if not x.is_floating_point():  # token ids at the first stage: a stand-in embedding output
            x = torch.ones(*x.shape, D, requires_grad=True)
        h = _SleepInput.apply(x, self.fwd_s, self.bwd_s / 2) * _SleepWeight.apply(
            self.w, self.bwd_s / 2, self.weight_grad_store
        )
        return h.sum() if y is not None else h


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.sum()


def _ours(schedule: str, pp: int, v: int, micro: int, fwd_s: float, bwd_s: float, steps: int) -> float:
    from engine.parallel.pipeline.runner import PipelineRunner

    rank = dist.get_rank()
    chunks = [SleepStage(fwd_s / v, bwd_s / v) for _ in range(v)]
    runner = PipelineRunner(chunks, schedule, list(range(pp)), rank, (1, S, D), torch.float32, torch.device("cpu"))
    batches = [(torch.zeros(1, S, dtype=torch.long), torch.zeros(1, S)) for _ in range(micro)]
    n = torch.tensor(float(micro), dtype=torch.float64)
    return _time(lambda: runner.run(batches, n), steps)


def _theirs(schedule: str, pp: int, v: int, micro: int, fwd_s: float, bwd_s: float, steps: int) -> float:
    from torch.distributed import pipelining as tp

    rank = dist.get_rank()
    if schedule == "zbv":
        indices = [rank, 2 * pp - 1 - rank]  # V layout
    else:
        indices = [c * pp + rank for c in range(v)]  # loop layout, as ours
    stages = [tp.PipelineStage(SleepStage(fwd_s / v, bwd_s / v), i, pp * v, torch.device("cpu")) for i in indices]
    if schedule in ("gpipe", "1f1b"):
        cls = tp.ScheduleGPipe if schedule == "gpipe" else tp.Schedule1F1B
        sched = cls(stages[0], n_microbatches=micro, loss_fn=_loss)
    else:
        cls = {"interleaved": tp.ScheduleInterleaved1F1B, "zb": tp.ScheduleInterleavedZeroBubble}.get(
            schedule, tp.ScheduleZBVZeroBubble
        )
        sched = cls(stages, n_microbatches=micro, loss_fn=_loss)
    x, y = torch.zeros(micro, S, dtype=torch.long), torch.zeros(micro, S)
    args = (x,) if any(s.is_first for s in stages) else ()
    kwargs = {"target": y} if any(s.is_last for s in stages) else {}
    return _time(lambda: sched.step(*args, **kwargs), steps)


def _time(fn: Callable[[], object], steps: int) -> float:
    fn()  # warm-up (their first step also infers shapes)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _closed_form(schedule: str, p: int, v: int, m: int, fwd: float, bwd: float) -> float:
    if schedule == "zb":
        f, b, w = fwd, bwd / 2, bwd / 2
        return (p - 1) * (f + b - w) / (m * (f + b + w) + (p - 1) * (f + b - w))
    return (p - 1) / (v * m + p - 1)


def _worker(rank: int, world: int, args: dict) -> tuple[list[tuple], list[str]]:
    m, fwd, bwd, steps = args["micro"], args["fwd"], args["bwd"], args["steps"]
    busy = m * (fwd + bwd)
    rows, failures = [], []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb", 1), ("zbv", 2)):
        if schedule == "interleaved" and m % world:
            failures.append(f"interleaved: {m} micro-batches not divisible by pp {world}")
            continue
        ours = _ours(schedule, world, v, m, fwd, bwd, steps) if schedule != "zbv" else None
        try:
            theirs = _theirs(schedule, world, v, m, fwd, bwd, steps)
        except Exception as e:  # noqa: BLE001 - one line on why, the other schedules still run
            theirs = None
            failures.append(f"torch {schedule}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
        closed = _closed_form(schedule, world, v, m, fwd, bwd) if ours is not None else None
        rows.append((schedule, v, ours, theirs, busy, closed))
    return rows, failures


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
    rows, failures = run_distributed(_worker, a.pp, args, timeout=600)[0]
    print(f"pp {a.pp}, {a.micro} micro-batches, stage forward {a.fwd_ms} ms + backward {a.bwd_ms} ms (sleeps), gloo")
    head = ("schedule", "ideal s", "ours s", "theirs s", "theirs/ours", "bubble", "their bubble", "closed form")
    widths = [14] + [max(len(h), 8) for h in head[1:]]
    print(" ".join(f"{h:>{w}}" if i else f"{h:{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    for schedule, v, ours, theirs, busy, closed in rows:
        ideal = busy / (1 - closed) if closed is not None else None
        ratio = theirs / ours if ours and theirs else None
        bubbles = (1 - busy / ours if ours else None, 1 - busy / theirs if theirs else None)
        cells = [_fmt(c, ".3f") for c in (ideal, ours, theirs, ratio, *bubbles, closed)]
        name = f"{schedule}-v{v}" if v > 1 else schedule
        print(f"{name:{widths[0]}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:])))
    for line in failures:
        print(f"not run: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
