"""Layout planner: which tp x pp x cp x dp (x dp_shard, ZeRO-1, recompute, micro-batch, schedule) layout to run a
model on a cluster, estimated before any GPU is spent.

    python -m engine.scaling layout --config MODEL.toml --gpus 1024 --device h100 --seq-len 8192 --global-batch 1024

For every layout that divides the model and the batch it estimates, per GPU:

- **Memory** of the worst pipeline rank: its parameters, gradients and optimizer state (`rank_params`: the layers
  split the way `engine.parallel.pipeline.stages` splits them, each tensor sharded over tp as engine/parallel/tensor.py
  shards it, then by FSDP2 or ZeRO-1 as `--train.dry_run` counts them), plus the activations the schedule holds on
  that rank (`engine.scaling.activations.rank_activation_bytes`: what this engine's layers save for the backward pass
  with its Triton kernels, checked tensor by tensor against the model, with the in-flight micro-batches of the bounds
  engine/parallel/pipeline/schedules.py implements; Korthikanti et al. 2022's formula for configs it does not cover);
  the tests check both equal the dry run's, rank by rank. With fp32 weights, autocast's bf16 weight copies count too.
  A trainer config with `train.objective = "mtp"` adds its multi-token prediction modules to the last stage (their
  parameters, activations and FLOPs, and the stage balance that costs each as a layer).
  Under FSDP each rank also holds one gathered layer in 16 bits, twice (the prefetch). A fraction of the device
  (`MEMORY_HEADROOM`) is kept for the CUDA context, NCCL buffers, temporaries and fragmentation.
- **Compute**: the hardware FLOPs of a step (`hardware_flops_per_token`, recomputation included) over tp x cp x pp,
  matmuls at `MATMUL_EFFICIENCY` of the bf16 peak and the attention core at `ATTENTION_EFFICIENCY`, plus a
  memory-bound term: each stored activation byte written once in the forward and read once and its gradient
  written once in the backward, at the HBM bandwidth (a roofline: the elementwise work cannot beat HBM).
- **Pipeline bubble**: the closed forms engine/parallel/pipeline's schedules are tested against: (p - 1) / (m + p - 1)
  for GPipe and 1F1B, (p - 1) / (v m + p - 1) interleaved, (p - 1) / (3 m + p - 1) for ZB-H1.
- **Communication** per step and GPU, ring algorithm (engine.parallel.comm_count's wire bytes), in the 16-bit
  activation / parameter and fp32 gradient dtypes the trainer uses: tp 4 all-reduces (or all-gather + reduce-scatter
  pairs with sp, the same bytes, and 2 all-gathers more in the backward pass) of a micro-batch's activations per
  layer (6 with full recomputation), not overlapped (the backward gathers are prefetched, but not credited here);
  cp's ring sends each K/V chunk cp - 1 times forward and K/V plus their gradients backward, overlapped with the
  attention it feeds; pp sends an activation and a gradient per micro-batch and chunk boundary, exposed;
  the gradient reduction over dp x cp (all-reduce; ZeRO-1: reduce-scatter of fp32 gradients + all-gather of 16-bit
  parameters; FSDP: two all-gathers of 16-bit parameters + a reduce-scatter of fp32 gradients over dp_shard)
  overlapped with the backward pass except its last bucket. A group whose ranks lie in one node (tp fastest, then
  cp, pp, dp_shard, dp: engine.parallel.dims's order) runs at the NVLink bandwidth, otherwise at the network's.

Step time = compute / (1 - bubble) + exposed communication; MFU = model FLOPs / (step time x GPUs x peak).
The bandwidths are typical nccl-tests bus bandwidths, not link peaks. This is a roofline-grade model: it ranks
layouts and explains why the others lose (out of memory, bubble, communication); it is not a promise of a step time.
tests/scaling/test_layout.py checks it against the dry run's counts (memory), the measured collective counts'
closed forms (communication) and published Megatron-LM / torchtitan layouts (MFU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

from engine.config import Config, ConfigError, ModelConfig, load_config
from engine.model.gpt import count_params, flops_per_token, resolve
from engine.scaling.activations import rank_activation_bytes
from engine.scaling.flops import hardware_flops_per_token, mtp_flops_per_token
from engine.scaling.memory import format_bytes

MATMUL_EFFICIENCY = 0.75  # large bf16 GEMMs reach ~70-80% of the dense peak on H100/A100 (cuBLAS)
ATTENTION_EFFICIENCY = 0.5  # flash attention forward + backward: ~50% of peak (FlashAttention-2/3 papers)
MEMORY_HEADROOM = 0.1  # of device memory kept for context, NCCL buffers, temporaries, fragmentation
BUCKET_BYTES = 25 * 2**20  # the last gradient bucket's reduction is never hidden behind the backward


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16
    memory_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # bus bandwidth of a collective inside a node
    network_bytes_per_s: float  # bus bandwidth per GPU across nodes
    gpus_per_node: int = 8


# Data-sheet peaks and memories; NVLink and network figures are typical nccl-tests bus bandwidths (H100 SXM: NVLink 4
# ~360 GB/s, one 400 Gb/s NIC per GPU ~45 GB/s; A100: NVLink 3 ~230 GB/s, 200 Gb/s HDR ~22 GB/s).
DEVICES = {
    "h100": Device("H100 SXM 80GB", 989e12, 80e9, 3.35e12, 360e9, 45e9),
    "h200": Device("H200 141GB", 989e12, 141e9, 4.8e12, 360e9, 45e9),
    "a100": Device("A100 SXM 80GB", 312e12, 80e9, 2.0e12, 230e9, 22e9),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1  # replicas (DDP or ZeRO-1)
    dp_shard: int = 1  # FSDP2 shards
    zero1: bool = False
    sp: bool = False
    recompute: str = "none"
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp * self.dp_shard

    def flags(self) -> str:
        """The trainer's flags for this layout (dp is what the world leaves)."""
        parts = [f"--parallel.tp {self.tp}", f"--parallel.pp {self.pp}", f"--parallel.cp {self.cp}"]
        if self.dp_shard > 1:
            parts.append(f"--parallel.dp_shard {self.dp_shard}")
        if self.zero1:
            parts.append("--parallel.zero1 true")
        if self.sp:
            parts.append("--parallel.sp true")
        if self.pp > 1:
            parts.append(f"--parallel.pp_schedule {self.schedule}")
            if self.virtual_stages > 1:
                parts.append(f"--parallel.virtual_stages {self.virtual_stages}")
        parts += [f"--model.recompute {self.recompute}", f"--train.micro_batch {self.micro_batch}"]
        return " ".join(parts)

    def label(self) -> str:
        text = f"tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} cp{self.cp} dp{self.dp}"
        text += f" fsdp{self.dp_shard}" if self.dp_shard > 1 else ""
        text += " zero1" if self.zero1 else ""
        if self.pp > 1:
            text += f" {self.schedule}" + (f" v{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return text + f" mb{self.micro_batch} rc:{self.recompute}"


@dataclass
class Estimate:
    layout: Layout
    fits: bool
    memory_bytes: int  # per GPU, the worst stage
    param_state_bytes: int  # parameters + gradients + optimizer state
    activation_bytes: int
    micro_batches: int  # per step and replica
    compute_s: float
    bubble: float  # fraction of the pipeline's step idle
    comm_s: dict[str, float]  # exposed seconds per step, by parallelism
    comm_bytes: dict[str, float]  # wire bytes per GPU and step, by parallelism
    step_s: float
    mfu: float
    reason: str = ""  # why it is not the best: out of memory / the biggest loss


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def _ring(op: str, n: int) -> Fraction:
    """Wire bytes one rank sends per payload byte (bandwidth-optimal ring; engine.parallel.comm_count)."""
    if n <= 1:
        return Fraction(0)
    return Fraction(2 * (n - 1), n) if op == "all_reduce" else Fraction(n - 1, n)


def _group_bw(device: Device, span: int) -> float:
    """Bus bandwidth of a group whose ranks lie within `span` consecutive ranks: NVLink when that is one node."""
    return device.nvlink_bytes_per_s if span <= device.gpus_per_node else device.network_bytes_per_s


def tp_wire_bytes(layers: float, micro_batches: int, tokens: int, d_model: int, tp: int, elem: int = 2,
                  recompute: str = "none", ends: int = 2, sp: bool = False) -> float:  # fmt: skip
    """Wire bytes per rank and step of Megatron tensor parallelism: 4 all-reduces of a micro-batch's activations
    (tokens x d_model) per layer, forward and backward (6 with full recomputation, whose forward runs again), plus
    one per pipeline end (the vocabulary-parallel embedding's forward, the output's input gradient). Sequence
    parallelism replaces each all-reduce by an all-gather and a reduce-scatter (the same bytes) and, outside full
    recomputation, all-gathers the projections' saved inputs again in the backward pass: two all-gathers a layer,
    one all-reduce's bytes (engine/parallel/regather.py)."""
    per_layer = 6 if recompute == "full" else (5 if sp else 4)
    return float((per_layer * layers + ends) * micro_batches * tokens * d_model * elem * _ring("all_reduce", tp))


def cp_wire_bytes(kv_bytes: int, cp: int) -> float:
    """Bytes a rank sends per layer and micro-batch in this engine's ring attention (engine/parallel/context.py):
    its K and V chunk (`kv_bytes` together) passed on cp - 1 times forward and again backward, and the K/V gradient
    accumulators cp times (the last one home)."""
    return float((2 * (cp - 1) + cp) * kv_bytes) if cp > 1 else 0.0


def dp_wire_bytes(params: int, n: int, mode: str, micro_batches: int = 1, grad_bytes: int = 4, param_bytes: int = 2,
                  root_params: int = 0) -> float:  # fmt: skip
    """Wire bytes per rank and step over the n data-parallel ranks; `params`: the model-parallel rank's parameters.
    ddp all-reduces the gradients once a step; zero1 reduce-scatters them and all-gathers the updated parameters;
    fsdp all-gathers each layer's parameters for its forward and again for its backward in every micro-batch (the
    root module's `root_params` once a micro-batch: not resharded after the forward) and reduce-scatters the
    gradients once a step."""
    if n <= 1:
        return 0.0
    if mode == "ddp":
        return float(params * grad_bytes * _ring("all_reduce", n))
    if mode == "zero1":
        return float(params * (grad_bytes + param_bytes) * _ring("all_gather", n))
    if mode == "fsdp":
        gathers = (2 * (params - root_params) + root_params) * micro_batches * param_bytes
        return float((gathers + params * grad_bytes) * _ring("all_gather", n))
    raise ValueError(f"mode must be ddp, zero1 or fsdp, got {mode!r}")


def _layer_params_local(cfg: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one tp rank, as engine/parallel/tensor.py shards them: q, k, v, the MLP's
    column weights and biases split over tp; o and the MLP's row weights split, their biases replicated; k and v
    replicated whole when there are fewer kv heads than ranks (`ReplicatedKVLinear`); norms replicated."""
    d, f = cfg.d_model, cfg.ffn_hidden
    kv_width = cfg.n_kv_heads * (d // cfg.n_heads)
    kv_split = tp if cfg.n_kv_heads % tp == 0 else 1
    if cfg.arch == "llama":
        return d * d // tp + 2 * kv_width * d // kv_split + d * d // tp + 3 * f * d // tp + 2 * d
    attention = (d * d + d) // tp + 2 * (kv_width * d + kv_width) // kv_split + d * d // tp + d
    return attention + (f * d + f) // tp + f * d // tp + d + 4 * d


def _mtp_params_local(cfg: ModelConfig, tp: int, pp: int, depth: int, kind: str) -> int:
    """The multi-token prediction modules' parameters on the last stage's tp rank (engine.model.mtp): per depth a
    block split as the trunk's, and for the sequential kind two RMSNorm gains and the replicated 2d -> d projection;
    under pp the sequential kind's copy of the embedding (`mtp_emb`), which is the output weight itself when tied."""
    if not depth:
        return 0
    d = cfg.d_model
    own = 2 * d + 2 * d * d if kind == "sequential" else 0
    copy = cfg.vocab_size * d // tp if kind == "sequential" and pp > 1 and not cfg.tie_embeddings else 0
    return depth * (_layer_params_local(cfg, tp) + own) + copy


def rank_params(cfg: ModelConfig, tp: int = 1, pp: int = 1, virtual_stages: int = 1, mtp_depth: int = 0,
                mtp_kind: str = "sequential") -> list[int]:  # fmt: skip
    """Parameters held by each pipeline rank (all its chunks) on one tp rank: layers split the way
    engine.parallel.pipeline.stages splits them, the vocabulary-parallel embedding (and gpt2's replicated positions)
    on the first stage, the final norm and the vocabulary-parallel output on the last; a tied output weight counts on
    both ends when they are different ranks, as both hold it; `mtp_depth` multi-token prediction modules of
    `mtp_kind` on the last stage. `cfg` resolved (its vocabulary divisible by tp)."""
    d, v = cfg.d_model, cfg.vocab_size
    n_stages = pp * virtual_stages
    out = [0] * pp
    for stage, count in enumerate(_stage_counts(cfg, pp * virtual_stages, mtp_depth)):
        out[stage % pp] += count * _layer_params_local(cfg, tp)
    out[0] += v * d // tp + (cfg.seq_len * d if cfg.arch == "gpt2" else 0)
    last = (n_stages - 1) % pp
    out[last] += (d if cfg.arch == "llama" else 2 * d) + (v * d // tp if (not cfg.tie_embeddings or pp > 1) else 0)
    out[last] += _mtp_params_local(cfg, tp, pp, mtp_depth, mtp_kind)
    return out


def _in_flight(schedule: str, pp: int, v: int, m: int, rank: int = 0) -> Fraction:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak, in units of its whole share of layers
    (the bounds tests/parallel/test_pipeline_schedules.py checks the schedules against: pp - rank for 1F1B; pp on
    every rank for ZB-H1, whose deferred weight gradients keep a later rank's micro-batches until their W pass)."""
    if pp == 1:
        return Fraction(1)
    if schedule == "gpipe":
        return Fraction(m)
    if schedule == "interleaved":
        return Fraction(min((pp - 1 - rank) * 2 + (v - 1) * pp + 1, v * m), v)
    return Fraction(min(pp if schedule == "zb" else pp - rank, m))  # 1f1b, zb


def bubble_fraction(schedule: str, pp: int, v: int, m: int) -> float:
    """Idle fraction of a pipeline step (closed forms of engine/parallel/pipeline/schedules.py)."""
    if pp == 1:
        return 0.0
    if schedule == "zb":
        return (pp - 1) / (3 * m + pp - 1)
    return (pp - 1) / ((v if schedule == "interleaved" else 1) * m + pp - 1)


def estimate_layout(cfg: ModelConfig, layout: Layout, global_batch: int, device: Device, optimizer: str = "adamw",
                    param_dtype: str = "bf16", mtp_depth: int = 0, mtp_kind: str = "sequential"
                    ) -> Estimate:  # fmt: skip
    """Memory, time and MFU of one layout (module docstring). `cfg` resolved; `global_batch` in sequences;
    `mtp_depth` multi-token prediction modules of `mtp_kind` (train.objective mtp) on the last stage."""
    lt = layout
    s, h, L = cfg.seq_len, cfg.d_model, cfg.n_layers
    replicas = lt.dp * lt.dp_shard
    m = global_batch // (lt.micro_batch * replicas)
    cfg_rc = replace(cfg, recompute=lt.recompute)
    # Memory of each pipeline rank: parameters, gradients, optimizer state, activations; the worst one counts
    params = rank_params(cfg, lt.tp, lt.pp, lt.virtual_stages, mtp_depth, mtp_kind)
    counts = _stage_counts(cfg, lt.pp * lt.virtual_stages, mtp_depth)
    fsdp_ranks = lt.dp_shard * lt.cp if lt.dp_shard > 1 else 1  # FSDP2 shards over dp_shard x cp (parallelize.py)
    bf16 = param_dtype == "bf16" and lt.dp_shard == 1  # FSDP2 keeps fp32 shards, which are the masters
    gathered = 2 * 2 * _layer_params_local(cfg, lt.tp) if lt.dp_shard > 1 else 0  # one layer + the prefetched one
    copies = param_dtype == "fp32" and lt.dp_shard == 1  # autocast's bf16 weight copies (fp32 weights)

    def param_state_of(local: int) -> int:
        held = math.ceil(local / fsdp_ranks)
        state_n = math.ceil(local / (lt.dp * lt.cp)) if lt.zero1 else held
        state_bytes = (8 if optimizer == "adamw" else 4) * state_n + (4 * state_n if bf16 else 0)
        return (2 if bf16 else 4) * held + 4 * held + state_bytes

    # parallel heads backpropagated one at a time where the trainer does so (engine.training.dry_run's condition)
    per_head = mtp_kind == "parallel" and lt.pp == 1 and lt.dp * lt.cp == 1 and param_dtype != "bf16"

    def activations_of(rank: int) -> int:
        last = rank == lt.pp - 1
        return rank_activation_bytes(
            cfg_rc, lt.micro_batch, sum(c for i, c in enumerate(counts) if i % lt.pp == rank), lt.tp, lt.sp, lt.cp,
            lt.recompute, first_stage=rank == 0, last_stage=last,
            in_flight_microbatches=_in_flight(lt.schedule, lt.pp, lt.virtual_stages, m, rank),
            autocast_copies=copies, mtp_depth=mtp_depth if last else 0, mtp_kind=mtp_kind,
            mtp_per_head=per_head and mtp_depth > 0,
        )  # fmt: skip

    local = max(params)  # the rank with the most parameters: the one whose gradients take longest to reduce
    held = math.ceil(local / fsdp_ranks)
    param_state = max(param_state_of(p) for p in params)
    memory, act = max((param_state_of(params[r]) + gathered + a, a) for r in range(lt.pp) for a in [activations_of(r)])
    fits = memory <= device.memory_bytes * (1 - MEMORY_HEADROOM)

    # Compute per GPU and step (the MTP modules are never recomputed)
    tokens = global_batch * s
    extra = mtp_flops_per_token(cfg, mtp_depth, mtp_kind) * tokens
    model_flops = flops_per_token(cfg) * tokens + extra
    hw = hardware_flops_per_token(cfg_rc) * tokens + extra
    head_dim = h // cfg.n_heads
    keys = min(s, cfg.window) if cfg.window else s
    attn_per_token = 12 * L * cfg.n_heads * head_dim * keys + (4 * L * cfg.n_heads * head_dim * keys
                                                               if lt.recompute != "none" else 0)  # fmt: skip
    attn = attn_per_token * tokens
    split = lt.tp * lt.cp * lt.pp * replicas
    compute = ((hw - attn) / (device.peak_flops * MATMUL_EFFICIENCY) + attn / (device.peak_flops * ATTENTION_EFFICIENCY)
               ) / split  # fmt: skip
    stored_per_layer = rank_activation_bytes(cfg_rc, lt.micro_batch, 1, lt.tp, lt.sp, lt.cp, "none", False, False,
                                             autocast_copies=False)  # fmt: skip
    compute += 3 * stored_per_layer * (L / lt.pp) * m / device.hbm_bytes_per_s
    bubble = bubble_fraction(lt.schedule, lt.pp, lt.virtual_stages, m)
    backward = compute * 2 / 3

    # Communication per GPU and step: wire bytes and exposed seconds
    tokens_micro = (s // lt.cp) * lt.micro_batch  # a micro-batch's tokens on one cp rank
    layers_local = L / lt.pp
    ends = 2 if lt.pp == 1 else 1  # the worst stage: first (embedding) or last (output), both without pp
    comm_bytes: dict[str, float] = {}
    exposed: dict[str, float] = {}
    if lt.tp > 1:
        comm_bytes["tp"] = tp_wire_bytes(layers_local, m, tokens_micro, h, lt.tp, 2, lt.recompute, ends, lt.sp)
        exposed["tp"] = comm_bytes["tp"] / _group_bw(device, lt.tp)
    if lt.cp > 1:
        kv = 2 * tokens_micro * cfg.n_kv_heads * head_dim * 2 // lt.tp  # this rank's K and V chunk, 16-bit
        comm_bytes["cp"] = cp_wire_bytes(kv, lt.cp) * layers_local * m
        attn_time = attn / (device.peak_flops * ATTENTION_EFFICIENCY) / split
        exposed["cp"] = max(0.0, comm_bytes["cp"] / _group_bw(device, lt.tp * lt.cp) - attn_time)
    if lt.pp > 1:  # an activation forward and its gradient back, per micro-batch and chunk
        comm_bytes["pp"] = float(2 * 2 * tokens_micro * h // (lt.tp if lt.sp else 1) * m * lt.virtual_stages)
        exposed["pp"] = comm_bytes["pp"] / _group_bw(device, lt.tp * lt.cp * lt.pp)
    dp_span = lt.tp * lt.cp * lt.pp * lt.dp_shard
    root = cfg.vocab_size * h // lt.tp  # FSDP's root module (embedding, output): gathered once per micro-batch
    if lt.dp_shard > 1:
        comm_bytes["fsdp"] = dp_wire_bytes(local, fsdp_ranks, "fsdp", m, 4, 2, root_params=min(root, local))
        exposed["fsdp"] = max(0.0, comm_bytes["fsdp"] / _group_bw(device, dp_span) - compute)
    reduce_n = lt.dp * (lt.cp if lt.dp_shard == 1 else 1)  # over the replicas and cp ranks (FSDP: in its own)
    if reduce_n > 1:
        grads = dp_wire_bytes(held, reduce_n, "zero1" if lt.zero1 else "ddp", m, 4, 2)
        bw = _group_bw(device, lt.world if lt.dp > 1 else lt.tp * lt.cp)
        comm_bytes["dp"] = grads
        exposed["dp"] = max(grads / bw - backward, min(BUCKET_BYTES, grads) / bw)
    step = compute / (1 - bubble) + sum(exposed.values())
    mfu = model_flops / (step * lt.world * device.peak_flops)
    return Estimate(lt, fits, memory, param_state, act, m, compute, bubble, exposed, comm_bytes, step, mfu)


def _stage_counts(cfg: ModelConfig, n_stages: int, mtp_depth: int = 0) -> list[int]:
    from engine.parallel.pipeline.stages import stage_layer_counts

    return stage_layer_counts(cfg.n_layers, n_stages, last_stage_extra=mtp_depth)


class LayoutError(ValueError):
    """A request no layout can serve (bad numbers, an unknown device); one line."""


def layouts(cfg: ModelConfig, gpus: int, global_batch: int, device: Device,
            micro_batches: tuple[int, ...] = (1, 2, 4, 8)) -> list[Layout]:  # fmt: skip
    """Every layout that divides the model, the sequence and the batch: tp within a node and dividing the heads,
    cp dividing seq_len into 2 cp zigzag chunks, pp no more stages than layers, FSDP over all the replicas or one
    node's worth (HSDP) or none, ZeRO-1 on or off, sp with tp, each recomputation mode and schedule."""
    out = []
    for tp, cp, pp in _model_splits(cfg, gpus, device):
        replicas = gpus // (tp * cp * pp)
        shards = {1, replicas} | ({device.gpus_per_node} if replicas % device.gpus_per_node == 0 else set())
        for dp_shard, mb in itertools.product(sorted(x for x in shards if replicas % x == 0), micro_batches):
            if global_batch % (mb * replicas):
                continue
            dp, m = replicas // dp_shard, global_batch // (mb * replicas)
            schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("zb", 1), ("gpipe", 1)]
            if pp > 1 and m % pp == 0:
                schedules += [("interleaved", v) for v in (2, 4) if pp * v <= cfg.n_layers]
            zero1s = (False, True) if dp * cp > 1 and dp_shard == 1 else (False,)
            for zero1, rc, (sched, v) in itertools.product(zero1s, ("none", "selective", "full"), schedules):
                out.append(Layout(tp, pp, cp, dp, dp_shard, zero1, tp > 1, rc, mb, sched, v))
    return out


def _model_splits(cfg: ModelConfig, gpus: int, device: Device) -> list[tuple[int, int, int]]:
    """(tp, cp, pp) dividing `gpus`: tp within a node, dividing the heads and the MLP (kv heads split or replicated),
    cp cutting the sequence into 2 cp zigzag chunks, pp no more stages than layers."""
    kv = cfg.n_kv_heads
    tps = [t for t in _divisors(gpus) if t <= device.gpus_per_node and not cfg.n_heads % t and not cfg.ffn_hidden % t
           and not (kv % t and t % kv)]  # fmt: skip
    return [(tp, cp, pp) for tp in tps
            for cp in _divisors(gpus // tp) if not cfg.seq_len % (2 * cp if cp > 1 else 1)
            for pp in _divisors(gpus // (tp * cp)) if pp <= cfg.n_layers]  # fmt: skip


def plan_layouts(cfg: ModelConfig, gpus: int, global_batch: int, device: str = "h100", top: int = 5,
                 optimizer: str = "adamw", mtp_depth: int = 0, mtp_kind: str = "sequential"
                 ) -> tuple[list[Estimate], dict[str, int]]:  # fmt: skip
    """The `top` fastest layouts that fit, each with the reason it trails the best, and the number of layouts
    rejected by reason ("out of memory", or invalid for the model/batch: not enumerated). `mtp_depth`, `mtp_kind`:
    multi-token prediction modules (train.objective mtp)."""
    if device not in DEVICES:
        raise LayoutError(f"unknown device {device!r}; one of {', '.join(DEVICES)}")
    if gpus < 1 or global_batch < 1:
        raise LayoutError(f"--gpus and --global-batch must be positive, got {gpus} and {global_batch}")
    if top < 1:
        raise LayoutError(f"--top must be at least 1, got {top}")
    dev = DEVICES[device]
    cands = layouts(cfg, gpus, global_batch, dev)
    if not cands:
        raise LayoutError(f"no layout divides {gpus} GPUs, a global batch of {global_batch} and this model "
                          f"(heads {cfg.n_heads}, layers {cfg.n_layers}, seq_len {cfg.seq_len})")  # fmt: skip
    ests = [estimate_layout(cfg, lt, global_batch, dev, optimizer, mtp_depth=mtp_depth, mtp_kind=mtp_kind)
            for lt in cands]  # fmt: skip
    fitting = sorted((e for e in ests if e.fits), key=lambda e: e.step_s)
    rejected = {"out of memory": sum(not e.fits for e in ests)}
    best = fitting[:top]
    if best:
        for e in best[1:]:
            e.reason = _why_slower(e, best[0])
    return best, rejected


def _why_slower(e: Estimate, best: Estimate) -> str:
    losses = {"bubble": e.compute_s * e.bubble / (1 - e.bubble) - best.compute_s * best.bubble / (1 - best.bubble),
              "compute (recomputation, memory-bound work)": e.compute_s - best.compute_s}  # fmt: skip
    for k in set(e.comm_s) | set(best.comm_s):
        losses[f"{k} communication"] = e.comm_s.get(k, 0.0) - best.comm_s.get(k, 0.0)
    k, v = max(losses.items(), key=lambda kv: kv[1])
    return f"{k} +{v * 1e3:.1f} ms"


def _trainer_config(path: str) -> Config:
    if not Path(path).is_file():
        raise LayoutError(f"--config {path}: no such file")
    try:
        return load_config(["--config", str(path)])
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        raise LayoutError(f"--config {path}: {e}") from None


def model_config_from(path: str) -> ModelConfig:
    """The model of a trainer config file (its [model] table over the defaults, read by the trainer's own loader);
    one-line errors. A vocabulary left to the tokenizer (0) is taken as 32000: no tokenizer is loaded here."""
    model = _trainer_config(path).model
    if model.vocab_size == 0:
        model.vocab_size = 32000
    return model


def mtp_from(path: str) -> tuple[int, str]:
    """(depth, kind) of the multi-token prediction modules a trainer config file trains (train.objective mtp and its
    [objective] table), or (0, "sequential")."""
    cfg = _trainer_config(path)
    if cfg.train.objective != "mtp":
        return 0, "sequential"
    return cfg.objective.mtp_depth, cfg.objective.mtp_kind


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.scaling layout", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a trainer TOML; its [model] table is the model")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICES)} (default h100)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the config's)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per step")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the config's, else 32000)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return p


def cli_main(argv: list[str]) -> int:
    """`python -m engine.scaling layout ...`; returns the exit status (2 with a one-line error for bad input)."""
    args = _parser().parse_args(argv)
    try:
        cfg = model_config_from(args.config)
        if args.seq_len:
            cfg.seq_len = args.seq_len
        if args.vocab:
            cfg.vocab_size = args.vocab
        cfg = resolve(cfg)
        depth, kind = mtp_from(args.config)
        best, rejected = plan_layouts(cfg, args.gpus, args.global_batch, args.device, args.top, args.optimizer,
                                      depth, kind)  # fmt: skip
    except (LayoutError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"best": [asdict(e) for e in best], "rejected": rejected}, indent=1))
        return 0
    dev = DEVICES[args.device]
    mtp = f", {depth} {kind} MTP module{'s' * (depth > 1)}" if depth else ""
    print(f"{count_params(cfg) / 1e9:.2f}B parameters, {cfg.n_layers} layers{mtp}, d_model {cfg.d_model}, seq_len "
          f"{cfg.seq_len}; {args.gpus} x {dev.name}, global batch {args.global_batch}")  # fmt: skip
    if not best:
        print(f"no layout fits in {format_bytes(int(dev.memory_bytes))}: {rejected['out of memory']} out of memory")
        return 1
    print(f"{'layout':<48} {'memory':>10} {'bubble':>7} {'comm ms':>8} {'step s':>8} {'MFU':>6}  why not first")
    for e in best:
        print(f"{e.layout.label():<48} {format_bytes(e.memory_bytes):>10} {e.bubble:>7.1%} "
              f"{sum(e.comm_s.values()) * 1e3:>8.1f} {e.step_s:>8.3f} {e.mfu:>6.1%}  {e.reason or 'best'}")  # fmt: skip
    print(f"rejected: {rejected['out of memory']} layouts out of memory")
    print(f"run the best with: {best[0].layout.flags()}")
    return 0
