"""Data parallelism on CPU processes: step time, bytes communicated per step and optimizer state per rank, for DDP,
our ZeRO-1, FSDP2 and torch's ZeroRedundancyOptimizer on the same model and data in the same run.

    python -m benchmarks.bench_dp [--dp 2,4] [--steps 8] [--warmup 2] [--micro 2] [--micro-batch 4]
                                  [--layers 4 --d-model 256 --vocab 2048 --seq 128] [--bucket-mb 4] [--json out.json]

Rows, each over the same model (a llama from engine.config.ModelConfig, torch ops, fp32, tied embeddings), the same
initial values (parallelize_gpt's seeded init) and the same micro-batches, stepped by engine.training.step.TrainStep
(token-count normalisation, global-norm clip, AdamW with weight decay on matmul weights only):
  ddp         parallelize_gpt without zero1: torch DDP with our summing comm hook, plain AdamW (build_optimizer);
  zero1       ours: parallelize_gpt with parallel.zero1 (flat buffers, one reduce-scatter per bucket launched during
              backward, all-gather of the updated shards after the step), DistributedOptimizer;
  torch-zero  the ddp model with torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=torch.optim.AdamW)
              over the same weight-decay groups and hyperparameters: DDP all-reduces whole gradients, each rank
              steps the whole parameters its greedy partition gave it, then one broadcast per parameter;
  torch-zero-bucket  the same with parameters_as_bucket_view=True (one broadcast per rank's bucket).
Its overlap_with_ddp variant (the step inside DDP's last bucket hook, `hook_with_zero_step`) refuses gloo in torch
("Gloo backend using Overlapping DDP with ZeRO may meet hangs"); the benchmark tries it and prints why it did not run.
  fsdp2       parallelize_gpt with parallel.dp_shard = dp: torch's fully_shard per layer and at the root (ZeRO-3 over
              DTensor), plain AdamW on the shards: parameters all-gathered for each layer's forward and again for
              its backward, gradients reduce-scattered.

Step time: the median of `--steps` steps after `--warmup`, each between two barriers; the implementations take turns
step by step, so drifting load hits all alike. Bytes: engine.parallel.comm_count around one more step, per rank: payload
(the collective's full tensor) and ring wire bytes by op (all-reduce 2(n-1)/n of the payload, all-gather and
reduce-scatter (n-1)/n; a broadcast is counted as its payload on every rank, though only its root sends: torch ZeRO's
parameter broadcasts read n/(n-1) higher than what a rank sends on average, so the theirs/ours line gives the wire ratio
both ways). Closed form per rank and step, P fp32 parameters: ddp all-reduces 2(n-1)/n 4P, ours reduce-scatters and
all-gathers 2(n-1)/n 4P (the same), torch ZeRO all-reduces 2(n-1)/n 4P and broadcasts 4P. Optimizer state: the bytes of
AdamW's two moments held on each rank (ours: `state_bytes()`, which leaves out bucket padding; torch's: its local
optimizer's state tensors) against the closed form 8 P / dp for the sharded rows and 8 P for ddp (P parameters, fp32).
Correctness guard: every row's loss at every step against the ddp row's, within 1e-5; a larger difference prints
MISMATCH and the exit status is 1.

Timings are for relative comparison within one run: at dp 4 the processes share 2 cores (the usual CPU machine here),
so those rows measure contention as much as communication; every process runs one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import Config, ModelConfig, OptimConfig
from engine.parallel.comm_count import count_collectives

IMPLS = ("ddp", "zero1", "fsdp2", "torch-zero", "torch-zero-bucket")
OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
LOSS_TOL = 1e-5


def _config(args: dict, zero1: bool) -> Config:
    cfg = Config(
        model=ModelConfig(n_layers=args["layers"], d_model=args["d_model"], n_heads=args["heads"],
                          vocab_size=args["vocab"], seq_len=args["seq"], kernels="torch"),
        optim=OptimConfig(lr=1e-3, weight_decay=0.1, clip=1.0, impl="torch"),
    )  # fmt: skip
    cfg.train.seed = 1234
    cfg.parallel.zero1, cfg.parallel.bucket_mb = zero1, args["bucket_mb"]
    return cfg


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-element optimizer state (AdamW's moments, not its step counts) in `optimizer.state`."""
    local = [v.to_local() if hasattr(v, "to_local") else v for st in optimizer.state.values() for v in st.values()]
    return sum(v.numel() * v.element_size() for v in local if v.dim())


def _build(impl: str, dims, args: dict, fsdp_dims=None) -> tuple[Callable, Callable[[], int], int]:
    """(step(batches) -> StepResult, optimizer-state bytes on this rank, parameters) for one implementation."""
    from engine.model.gpt import GPT
    from engine.optim import build_optimizer
    from engine.optim.build import param_groups
    from engine.optim.distributed import DistributedOptimizer
    from engine.parallel.data_parallel import grad_buffers_of
    from engine.parallel.parallelize import parallelize_gpt
    from engine.training.step import TrainStep

    cfg = _config(args, zero1=impl == "zero1")
    if impl == "fsdp2":  # every data-parallel rank shards (dp_shard = dp): torch's fully_shard per layer and root
        dims, cfg.parallel.dp_shard = fsdp_dims, fsdp_dims.dp_shard
    with torch.device("meta"):
        model = GPT(cfg.model)
    [chunk] = parallelize_gpt(model, dims, cfg, device="cpu")
    inner = chunk.module if isinstance(chunk, torch.nn.parallel.DistributedDataParallel) else chunk
    n_params = sum(p.numel() for p in {id(p): p for p in inner.parameters()}.values())
    if impl in ("ddp", "fsdp2"):
        optimizer = build_optimizer(inner, cfg.optim)
        state = lambda: _state_bytes(optimizer)  # noqa: E731
    elif impl == "zero1":
        optimizer = DistributedOptimizer(inner, cfg.optim, grad_buffers_of(inner))
        state = optimizer.state_bytes
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        o = cfg.optim
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(inner, o.weight_decay)]
        optimizer = ZeroRedundancyOptimizer(
            [g for g in groups if g["params"]], optimizer_class=torch.optim.AdamW, process_group=dims.group("dp"),
            parameters_as_bucket_view=impl == "torch-zero-bucket", lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
            weight_decay=o.weight_decay,
        )  # fmt: skip
        state = lambda: _state_bytes(optimizer.optim)  # noqa: E731 - its local optimizer holds this rank's state
    step = TrainStep(chunk, inner, optimizer, cfg.optim.clip, contextlib.nullcontext, dp_group=dims.group("dp"))
    return step, state, n_params


def _try_overlap(dims, args: dict) -> str:
    """torch's overlap_with_ddp ZeRO: the one-line reason it does not run here (gloo), or why it is not timed."""
    from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from engine.model.gpt import GPT
    from engine.parallel.parallelize import sum_gradients_hook

    cfg = _config(args, zero1=False)
    model = GPT(cfg.model, seed=cfg.train.seed)
    group = dims.group("dp")
    ddp = DDP(model, process_group=group)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, overlap_with_ddp=True,
                                   process_group=group, lr=cfg.optim.lr)  # fmt: skip
    try:
        ddp.register_comm_hook(group, hook_with_zero_step(sum_gradients_hook, ddp, zero))
    except Exception as e:  # noqa: BLE001 - one line on why, the other rows still run
        return f"torch-zero overlap_with_ddp: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return "torch-zero overlap_with_ddp: not timed (its step runs inside backward, before any global-norm clip)"


def _batches(args: dict, dp: int, rank: int, n_steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each step's micro-batches for this rank: its slice of a global batch of dp x micro x micro_batch sequences."""
    g = torch.Generator().manual_seed(7)
    m, b, s = args["micro"], args["micro_batch"], args["seq"]
    out = []
    for _ in range(n_steps):
        tokens = torch.randint(0, args["vocab"], (dp, m, b, s + 1), generator=g)[rank]
        out.append([(t[:, :-1], t[:, 1:]) for t in tokens])
    return out


def _worker(rank: int, world: int, args: dict) -> dict:
    from engine.parallel.dims import ParallelDims

    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)  # torch 2.13's DDP
    dims = ParallelDims.from_world()
    fsdp_dims = ParallelDims.from_world(dp_shard=world)
    try:
        impls = {name: _build(name, dims, args, fsdp_dims) for name in IMPLS}
        n_total = args["warmup"] + args["steps"] + 1  # the last one counted
        data = _batches(args, world, rank, n_total)
        times: dict[str, list[float]] = {k: [] for k in impls}
        losses: dict[str, list[float]] = {k: [] for k in impls}
        for i, batches in enumerate(data[:-1]):
            for name, (step, _, _) in impls.items():
                dist.barrier()
                t0 = time.perf_counter()
                out = step(batches)
                dist.barrier()
                if i >= args["warmup"]:
                    times[name].append(time.perf_counter() - t0)
                losses[name].append(out.loss)
        rows = {}
        for name, (step, state, n_params) in impls.items():
            with count_collectives() as counter:
                out = step(data[-1])
            losses[name].append(out.loss)
            rows[name] = {
                "impl": name, "dp": world, "step_s": statistics.median(times[name]), "params": n_params,
                "calls": {op: counter.calls(op) for op in OPS},
                "payload_bytes": {op: counter.payload_bytes(op) for op in OPS},
                "wire_bytes": {op: counter.wire_bytes(op) for op in OPS},
                "other_ops": sorted(set(counter.by_op()) - set(OPS)),
                "state_bytes": state(), "losses": losses[name],
            }  # fmt: skip
        failures = [_try_overlap(dims, args)]
        return {"rows": rows, "failures": failures}
    finally:
        dims.destroy()
        fsdp_dims.destroy()


def _merge(results: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per implementation: rank 0's time and bytes, every rank's state bytes and whether bytes agree."""
    rows = []
    for name in IMPLS:
        per_rank = [r["rows"][name] for r in results]
        row = dict(per_rank[0])
        row["state_bytes_per_rank"] = [r["state_bytes"] for r in per_rank]
        row["bytes_equal_on_ranks"] = all(r["wire_bytes"] == row["wire_bytes"] for r in per_rank)
        row["step_s_per_rank"] = [r["step_s"] for r in per_rank]
        del row["state_bytes"]
        p, dp = row["params"], row["dp"]
        row["state_closed_form_bytes"] = 8 * p if name == "ddp" else 8 * p / dp
        ref = results[0]["rows"]["ddp"]["losses"]
        row["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(row["losses"], ref))
        rows.append(row)
    return rows, results[0]["failures"]


def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}" if x else "-"


def _print(rows: list[dict], failures: list[str], args: dict) -> bool:
    dp, p = rows[0]["dp"], rows[0]["params"]
    print(
        f"dp {dp}: llama {args['layers']} layers, d_model {args['d_model']}, vocab {args['vocab']}, seq {args['seq']}, "
        f"{p / 1e6:.2f}M parameters, fp32, {args['micro']} micro-batches x {args['micro_batch']} sequences per rank, "
        f"gloo, median of {args['steps']} steps after {args['warmup']}; MB = 2^20 bytes, per rank and step"
    )
    head = ("impl", "step s", "AR MB", "RS MB", "AG MB", "BC MB", "wire MB", "calls AR/RS/AG/BC",
            "state MB/rank", "8P/dp MB", "final loss")  # fmt: skip
    widths = (18, 7, 7, 7, 7, 7, 8, 18, 15, 9, 10)
    print(" ".join(f"{h:{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    ok = True
    for r in rows:
        states = r["state_bytes_per_rank"]
        state = _mb(min(states)) if min(states) == max(states) else f"{_mb(min(states))}-{_mb(max(states))}"
        cells = [
            f"{r['step_s']:.3f}", *(_mb(r["payload_bytes"][op]) for op in OPS), _mb(sum(r["wire_bytes"].values())),
            "/".join(str(r["calls"][op]) for op in OPS), state, _mb(r["state_closed_form_bytes"]),
            f"{r['losses'][-1]:.6f}",
        ]  # fmt: skip
        print(f"{r['impl']:{widths[0]}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:])))
        ok &= r["max_loss_diff_vs_ddp"] <= LOSS_TOL
    ours, theirs = rows[IMPLS.index("zero1")], rows[IMPLS.index("torch-zero")]
    for t in rows[IMPLS.index("torch-zero") :]:
        wire = sum(t["wire_bytes"].values()) / sum(ours["wire_bytes"].values())
        bc = t["wire_bytes"]["broadcast"]
        ring = (sum(t["wire_bytes"].values()) - bc + bc * (dp - 1) / dp) / sum(ours["wire_bytes"].values())
        pay = sum(t["payload_bytes"].values()) / sum(ours["payload_bytes"].values())
        print(
            f"{t['impl']}/zero1: step time {t['step_s'] / ours['step_s']:.3f}, payload bytes {pay:.3f}, wire bytes "
            f"{wire:.3f} ({ring:.3f} with its broadcasts at (n-1)/n of their payload, what a rank sends on average)"
        )
    diff = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    worst = max(r["max_loss_diff_vs_ddp"] for r in rows)
    print(f"loss guard over {len(ours['losses'])} steps: |zero1 - torch-zero| max {diff:.2e}, any row vs ddp max "
          f"{worst:.2e} (tolerance {LOSS_TOL:g}): {'MATCH' if ok and diff <= LOSS_TOL else 'MISMATCH'}")  # fmt: skip
    for line in failures:
        print(f"not run: {line}")
    return ok and diff <= LOSS_TOL


def main(argv: list[str] | None = None) -> int:
    from tests.distributed import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", default="2,4", help="comma-separated data-parallel degrees")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro", type=int, default=2, help="micro-batches per rank and step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--bucket-mb", type=float, default=4.0, help="our ZeRO-1 gradient buckets (DDP keeps its 25)")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    args = {k: v for k, v in vars(a).items() if k not in ("dp", "json")}
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    all_rows, ok = [], True
    for dp in (int(x) for x in a.dp.split(",")):
        if dp < 2:
            p.error("every --dp must be at least 2")
        rows, failures = _merge(run_distributed(_worker, dp, args, timeout=600))
        ok &= _print(rows, failures, args)
        all_rows += rows
        print()
    if a.json:
        a.json.write_text(json.dumps(all_rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
