"""`--train.dry_run true`: build the model on the meta device for the requested layout, without real peers, print
what each rank would hold, and exit.

Every rank of the first data-parallel replica is built in turn in this one process, each inside torch's `fake`
process-group backend (collectives are no-ops, sizes and ranks are real), through the same `parallelize_gpt` the
trainer uses. Nothing is allocated: the counts come from the local parameter shapes. Bytes per rank: parameters and
gradients in fp32 (the master weights; 4 bytes each), the optimizer state (engine.scaling.optimizer_state_bytes), and
the activations of the micro-batches the schedule holds: engine.scaling.activations' tally of what this engine's
layers save for the backward pass on a GPU (checked tensor by tensor against the CPU model), with the bf16 weight
copies autocast keeps, or Korthikanti et al. 2022's formula for configs that tally does not cover (dropout > 0);
with `--train.objective mtp`, the multi-token prediction modules' share on the rank holding them (the last stage).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError
from engine.model.gpt import count_params, resolve
from engine.model.mtp import build_gpt
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import check_tensor_parallel, parallelize_gpt
from engine.parallel.state import LayoutError
from engine.scaling.activations import rank_activation_bytes
from engine.scaling.memory import format_bytes, optimizer_state_bytes
from engine.training.validate import batch_layout


@dataclass
class RankMemory:
    rank: int
    params: int  # local parameter elements (vocabulary padding included)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class DryRunReport:
    total_params: int
    non_embedding_params: int
    world_size: int
    micro_batch: int
    ranks: list[RankMemory]


def _rank_memory(cfg: Config, model_cfg, dims: ParallelDims, micro: int, micro_batches: int) -> RankMemory:
    with torch.device("meta"):
        model = build_gpt(model_cfg, cfg)  # with multi-token prediction modules under train.objective mtp
    chunks = parallelize_gpt(model, dims, cfg, device="meta")  # this rank's pipeline stages (one without pp)
    n = sum(p.numel() for p in torch.nn.ModuleList(chunks).parameters())  # each shared tensor once
    sp = cfg.parallel.sp and dims.tp_enabled
    in_flight = 1.0
    if dims.pp_enabled:  # micro-batches whose activations the schedule holds at once on this rank, per chunk
        from engine.parallel.pipeline.simulate import simulate

        peak = simulate(cfg.parallel.pp_schedule, dims.pp, len(chunks), micro_batches).peak_in_flight
        in_flight = peak[dims.rank_in("pp")] / len(chunks)
    # the engine's own tally (engine.scaling.activations) where it covers the config, Korthikanti's otherwise;
    # under context parallelism a rank holds seq_len / cp of each sequence
    copies = cfg.train.dtype != "fp32" and cfg.train.param_dtype == "fp32" and dims.dp_shard == 1
    # multi-token prediction modules: on the chunk that holds them (the last stage under pp). Parallel heads run
    # one at a time (per_head_backward) where engine.training.step's TrainStep does so: without pp, DDP, FSDP2 or
    # our gradient buffers (ZeRO-1 at dp > 1, bf16 parameters); the peak is then the trunk with one head's graph.
    mtp_depth = sum(len(c.mtp) for c in chunks if getattr(c, "mtp", None) is not None)
    mtp_kind = getattr(model, "mtp_kind", "sequential")
    per_head = mtp_kind == "parallel" and not dims.pp_enabled and dims.dp * dims.cp == 1
    per_head = per_head and cfg.train.param_dtype != "bf16"
    act = rank_activation_bytes(
        model_cfg, micro, sum(len(c.layers) for c in chunks), dims.tp, sp, dims.cp, model_cfg.recompute,
        first_stage=any(c.tok_emb is not None for c in chunks), last_stage=any(c.output is not None for c in chunks),
        in_flight_microbatches=in_flight, autocast_copies=copies, mtp_depth=mtp_depth, mtp_kind=mtp_kind,
        mtp_per_head=per_head and mtp_depth > 0,
    )  # fmt: skip
    # ZeRO-1: this rank's shard of the optimizer state (engine.optim.distributed), up to each bucket's padding;
    # FSDP2: its shard of parameters, gradients and state over dp_shard x cp (up to each tensor's padding)
    # bf16 parameters: 2 bytes each, fp32 gradients, fp32 master weights with the optimizer state (2 + 4 + 12 / dp)
    held = -(-n // (dims.dp_shard * dims.cp)) if dims.dp_shard > 1 else n  # FSDP2 shards over dp_shard x cp
    n_state = -(-n // (dims.dp * dims.cp)) if cfg.parallel.zero1 else held  # ZeRO-1 shards over dp x cp
    bf16 = cfg.train.param_dtype == "bf16" and dims.dp_shard == 1  # FSDP2 keeps fp32 shards, which are the masters
    opt = optimizer_state_bytes(n_state, cfg.optim.name, master_weights=bf16)
    return RankMemory(dims.rank, held, (2 if bf16 else 4) * held, 4 * held, opt, act)


def dry_run(cfg: Config, vocab_size: int | None = None, out: Callable[[str], None] = print) -> DryRunReport:
    """Builds every rank of the first data-parallel replica on meta and prints their memory (see module docstring).

    The world is tp x pp x cp x dp_shard x dp with dp from $WORLD_SIZE when set (else 1). `vocab_size`: the
    tokenizer's (default: loaded from data.tokenizer when model.vocab_size is 0)."""
    if vocab_size is None and cfg.model.vocab_size == 0:
        from engine.training.samples import load_data_sources

        vocab_size = load_data_sources(cfg).tokenizer.vocab_size
    if dist.is_initialized():
        raise ConfigError("train.dry_run runs in one process without torch.distributed; run it without torchrun")
    model_cfg = resolve(cfg.model, tokenizer_vocab=vocab_size)
    p = cfg.parallel
    model_ranks = p.tp * p.pp * p.cp * p.dp_shard
    world = int(os.environ.get("WORLD_SIZE", model_ranks))
    try:
        dims0 = ParallelDims(p.tp, p.pp, p.cp, p.dp_shard, world, 0)  # checks the layout
    except LayoutError as e:  # one line, as the trainer gives it
        raise ConfigError(str(e)) from None
    check_tensor_parallel(model_cfg, p.tp, p.sp and p.tp > 1)
    micro, accum = batch_layout(cfg.train.global_batch, cfg.train.micro_batch, dims0.dp)
    if p.pp > 1:
        from engine.parallel.pipeline.schedules import check_schedule

        check_schedule(p.pp_schedule, p.pp, p.virtual_stages, accum)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    ranks = []
    for rank in range(model_ranks):  # the first replica: dp rank 0
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            dims = ParallelDims(p.tp, p.pp, p.cp, p.dp_shard, world, rank)
            ranks.append(_rank_memory(cfg, model_cfg, dims, micro, accum))
        finally:
            dist.destroy_process_group()
    report = DryRunReport(count_params(model_cfg), count_params(model_cfg, non_embedding=True), world, micro, ranks)
    _print(report, cfg, model_cfg, dims0, out)
    return report


def _print(report: DryRunReport, cfg: Config, model_cfg, dims: ParallelDims, out: Callable[[str], None]) -> None:
    layout = " ".join(f"{k} {v}" for k, v in dims.as_dict().items() if k == "world_size" or v > 1)
    sp = " + sp" if cfg.parallel.sp and dims.tp_enabled else ""
    out(
        f"dry run: {model_cfg.arch}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}: "
        f"{report.total_params:,} parameters ({report.total_params / 1e9:.3f}B), "
        f"{report.non_embedding_params:,} non-embedding ({report.non_embedding_params / 1e9:.3f}B); "
        f"layout {layout}{sp}"
    )
    out(
        f"per rank (fp32 parameters and gradients, {cfg.optim.name} state, activations of the micro-batches of "
        f"{report.micro_batch} x {model_cfg.seq_len} tokens the schedule holds, recompute {model_cfg.recompute}):"
    )
    out(f"{'rank':>5} {'parameters':>15} {'param bytes':>12} {'grad bytes':>12} {'optimizer':>12} "
        f"{'activations':>12} {'total':>12}")  # fmt: skip
    for r in report.ranks:
        out(
            f"{r.rank:>5} {r.params:>15,} {format_bytes(r.param_bytes):>12} {format_bytes(r.grad_bytes):>12} "
            f"{format_bytes(r.optimizer_bytes):>12} {format_bytes(r.activation_bytes):>12} "
            f"{format_bytes(r.total_bytes):>12}"
        )
