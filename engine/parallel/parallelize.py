"""parallelize_gpt: turns a plain `engine.model.GPT` into this rank's model chunks for a layout, from outside.

Order (torchtitan's), each step its own function so later parallelisms slot in between:
  0. `pipeline_split`: this rank's pipeline stages (pp x virtual_stages, engine.parallel.pipeline.stages);
  1. `apply_tensor_parallel`: the plan below (module-name pattern -> style) swaps nn.Linear / nn.Embedding / the
     output head for their Megatron tensor-parallel forms (Shoeybi et al. 2019) and, with sequence parallelism
     (Korthikanti et al. 2022), marks the norms and dropouts that run on sequence shards;
  2. `apply_recompute`: activation checkpointing per block (full) or of the attention core (selective, which also
     recomputes the MLP activation's output), with torch's composable checkpoint (parameter names unchanged),
     replaying the per-rank dropout stream;
  3. `materialize_and_init`: a model built on the meta device is allocated on the target device and every parameter
     (or local shard) initialised from its own seeded generator (engine.model.init), so any layout gets the same
     values;
  4. `apply_data_parallel`: DDP over the data-parallel group (it cannot wrap meta parameters, hence last), its
     gradient reduction a sum (the step divides by the global number of loss-bearing tokens); under pipeline
     parallelism the pipeline step sums over dp instead; with ZeRO-1 (cfg.parallel.zero1) flat gradient buffers
     with bucketed reduce-scatters (engine.parallel.data_parallel) instead of DDP, under any pp.
  1b. `apply_context_parallel` (cp > 1): each layer's attention core attends over the whole sequence held by the cp
     group (ring or all-to-all, engine.parallel.context); gradients are then summed over dp x cp.
  1a. `convert_to_fp8` (train.fp8): the transformer layers' linears become Fp8Linear (engine.precision.fp8), the
     first and last layer kept in the training dtype.
Returns the list of chunks this rank holds (its pipeline stages; one without pipeline parallelism).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.config import Config, ConfigError, ModelConfig
from engine.model.init import canonical_name, init_weights, materialize_
from engine.parallel.activation_recompute import recompute_output
from engine.parallel.context import apply_context_parallel, check_context_parallel
from engine.parallel.data_parallel import attach_grad_buffers, build_grad_buffers
from engine.parallel.dims import ParallelDims
from engine.parallel.output import VocabParallelOutputHead
from engine.parallel.regather import regather_region_inputs
from engine.parallel.rng import TP_SEED_OFFSET, RNGStatesTracker, attach_rng_tracker, recompute_context_fn
from engine.parallel.sequence import SequenceShardedPositionEmbedding
from engine.parallel.sharding import ShardingRegistry, attach_sharding, collect_sharding, sharding_of
from engine.parallel.tensor import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    attention_heads_per_rank,
    check_tp_divisibility,
    enter_tp_region,
)
from engine.precision.fp8 import Fp8Recipe, convert_to_fp8

# The tensor-parallel plan of engine.model.GPT: module-name pattern ("*" is one name segment) -> style. Styles
# starting with "sequence_" apply only with sequence parallelism.
TP_PLAN: dict[str, str] = {
    "tok_emb": "vocab_embedding",
    "mtp_emb": "vocab_embedding",  # a last pipeline stage's copy for multi-token prediction (pipeline/stages.py)
    "pos_emb": "sequence_positions",
    "emb_dropout": "sequence_dropout",
    "layers.*.attn_norm": "sequence_norm",
    "layers.*.attn": "enter_region",
    "layers.*.attn.q_proj": "column",
    "layers.*.attn.k_proj": "column_kv",
    "layers.*.attn.v_proj": "column_kv",
    "layers.*.attn.core": "split_heads_rng",
    "layers.*.attn.o_proj": "row",
    "layers.*.attn.resid_dropout": "sequence_dropout",
    "layers.*.mlp_norm": "sequence_norm",
    "layers.*.mlp": "enter_region",
    "layers.*.mlp.gate_proj": "column",
    "layers.*.mlp.up_proj": "column",
    "layers.*.mlp.down_proj": "row",
    "layers.*.mlp.dropout": "sequence_dropout",
    "output": "vocab_output",
    "output.norm": "sequence_norm",
}
# Multi-token prediction modules (engine.model.mtp, train.objective mtp): each depth's block is split as the trunk's
# blocks; its two norms and 2d -> d projection stay replicated. They act token by token, so with sequence parallelism
# they run on this rank's sequence shard (the previous depth's output, and the shifted embeddings the vocab-parallel
# embedding reduce-scatters), and their gradients are partial sums over tp, as a norm's are.
TP_PLAN.update(
    {"mtp.*.block." + k[len("layers.*.") :]: v for k, v in list(TP_PLAN.items()) if k.startswith("layers.*.")}
)
TP_PLAN.update(
    {"mtp.*.hidden_norm": "sequence_norm", "mtp.*.embed_norm": "sequence_norm", "mtp.*.proj": "sequence_replicated"}
)
# The t5 encoder-decoder (engine.model.encoder_decoder): its encoder's and decoder's blocks are split as the trunk's;
# the decoder's cross-attention as a self-attention whose keys and values read the encoder's output: q, k, v column
# parallel (this rank's heads), o row parallel, and both inputs entering the tp region (under sequence parallelism
# both are gathered there: the decoder's sequence shard and the encoder's, normalised by a sequence-parallel norm).
TP_PLAN.update(
    {
        stack + k[len("layers.*.") :]: v
        for stack in ("encoder_layers.*.", "decoder_layers.*.")
        for k, v in list(TP_PLAN.items())
        if k.startswith("layers.*.")
    }
)
TP_PLAN.update(
    {
        "encoder_norm": "sequence_norm",
        "decoder_layers.*.cross_norm": "sequence_norm",
        "decoder_layers.*.cross_attn": "enter_region_cross",
        "decoder_layers.*.cross_attn.q_proj": "column",
        "decoder_layers.*.cross_attn.k_proj": "column_kv",
        "decoder_layers.*.cross_attn.v_proj": "column_kv",
        "decoder_layers.*.cross_attn.core": "split_heads_rng",
        "decoder_layers.*.cross_attn.o_proj": "row",
        "decoder_layers.*.cross_attn.resid_dropout": "sequence_dropout",
    }
)


def check_tensor_parallel(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> None:
    """One-line ConfigError when a resolved model shape cannot be split over `tp` ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"parallel.tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    try:
        check_tp_divisibility(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if sequence_parallel and cfg.seq_len % tp:
        raise ConfigError(
            f"model.seq_len = {cfg.seq_len} is not divisible by parallel.tp = {tp} (needed with parallel.sp = true)"
        )


@dataclass
class _TPContext:
    group: dist.ProcessGroup
    tp: int
    sp: bool
    tracker: RNGStatesTracker | None
    cfg: ModelConfig
    fully_recomputed: frozenset[int] = frozenset()  # ids of the modules inside blocks apply_recompute checkpoints


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\*", r"[^.]+") + "$")


def block_plan() -> dict[str, str]:
    """TP_PLAN for one transformer block on its own (the `layers.*.` entries, relative to the block)."""
    return {k[len("layers.*.") :]: v for k, v in TP_PLAN.items() if k.startswith("layers.*.")}


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _enter_region_hook(ctx: _TPContext, n_inputs: int = 1) -> Callable:
    """The block side's first `n_inputs` inputs enter the tp region once (q, k, v / gate, up skip theirs); two for a
    cross-attention (queries' and keys' and values' inputs)."""

    def hook(module, args):
        return (*(enter_tp_region(a, ctx.group, ctx.sp) for a in args[:n_inputs]), *args[n_inputs:])

    return hook


def _convert(model: nn.Module, name: str, module: nn.Module, style: str, ctx: _TPContext) -> None:
    kw = dict(sequence_parallel=ctx.sp, group=ctx.group)
    if style == "column":
        _set_child(model, name, ColumnParallelLinear.from_linear(module, skip_input_comm=True, **kw))
    elif style == "column_kv":
        head_dim = ctx.cfg.d_model // ctx.cfg.n_heads
        if attention_heads_per_rank(ctx.cfg.n_heads, ctx.cfg.n_kv_heads, ctx.tp)[2]:
            new = ReplicatedKVLinear.from_linear(module, ctx.cfg.n_kv_heads, head_dim, skip_input_comm=True, **kw)
        else:
            new = ColumnParallelLinear.from_linear(module, skip_input_comm=True, **kw)
        _set_child(model, name, new)
    elif style == "row":
        _set_child(model, name, RowParallelLinear.from_linear(module, **kw))
    elif style == "vocab_embedding":
        _set_child(model, name, VocabParallelEmbedding.from_embedding(module, **kw))
    elif style == "vocab_output":
        # the embedding, or on a last pipeline stage the MTP modules' copy of it (converted first: it sits before)
        embedding = getattr(model, "tok_emb", None)
        embedding = embedding if embedding is not None else getattr(model, "mtp_emb", None)
        tied = embedding.weight if ctx.cfg.tie_embeddings and embedding is not None else None
        _set_child(model, name, VocabParallelOutputHead(module, ctx.group, ctx.sp, tied_weight=tied))
    elif style in ("enter_region", "enter_region_cross"):
        n_inputs = 2 if style == "enter_region_cross" else 1
        # under sp the projections keep this rank's shard, gathered again in backward (regather.py), except in a
        # fully recomputed block (apply_recompute's), which keeps only its input anyway
        if ctx.sp and id(module) not in ctx.fully_recomputed:
            regather_region_inputs(module, ctx.group, n_inputs)
        else:
            module.register_forward_pre_hook(_enter_region_hook(ctx, n_inputs))
    elif style in ("split_heads_rng", "sequence_dropout"):
        # this rank's heads (or tokens) differ from the other tp ranks': its own dropout stream
        if ctx.tracker is not None:
            module.rng_context = lambda: ctx.tracker.fork("tp")
    elif style == "sequence_positions":
        _set_child(model, name, SequenceShardedPositionEmbedding(module.weight, ctx.group))
    elif style not in ("sequence_norm", "sequence_replicated"):  # no conversion: the registry marks their
        # gradients partial (a replicated module that sees only this rank's tokens under sequence parallelism)
        raise ValueError(f"unknown tensor-parallel style {style!r} for {name}")


def apply_tensor_parallel(
    model: nn.Module,
    group: dist.ProcessGroup,
    sequence_parallel: bool = False,
    *,
    model_cfg: ModelConfig | None = None,
    tracker: RNGStatesTracker | None = None,
    plan: dict[str, str] | None = None,
) -> ShardingRegistry:
    """Converts `model` in place by `plan` (default TP_PLAN; `block_plan()` for a lone block) over the tp `group`
    and records its sharding registry (and the tp dropout stream `tracker`, if any) on it. `model_cfg`: the resolved
    model config (default `model.cfg`). Returns the registry."""
    cfg = model_cfg if model_cfg is not None else model.cfg
    tp = dist.get_world_size(group)
    check_tensor_parallel(cfg, tp, sequence_parallel)
    compiled = [(_pattern(p), style) for p, style in (TP_PLAN if plan is None else plan).items()]
    recomputed = model.layers.values() if cfg.recompute == "full" and hasattr(model, "layers") else ()
    ctx = _TPContext(group, tp, sequence_parallel, tracker, cfg,
                     frozenset(id(m) for block in recomputed for m in block.modules()))  # fmt: skip
    sp_modules = set()
    for name, module in list(model.named_modules()):
        cname = canonical_name(name) if name else ""
        style = next((st for pattern, st in compiled if pattern.match(cname)), None)
        if style is None or (style.startswith("sequence_") and not sequence_parallel):
            continue
        if style in ("sequence_norm", "sequence_positions", "sequence_replicated"):
            sp_modules.add(cname)
        _convert(model, name, module, style, ctx)
    registry = collect_sharding(model, frozenset(sp_modules), tp_group=group)
    attach_sharding(model, registry)
    if tracker is not None:
        attach_rng_tracker(model, tracker)
    return registry


def tp_dropout_tracker(dims: ParallelDims, seed: int) -> RNGStatesTracker:
    """The per-rank dropout stream for tp regions: seeded `seed + 2718 + (dp_rank * tp + tp_rank)` (Megatron's tp
    offset, numbered by model-parallel rank over dp so that data-parallel replicas, which see different data, also
    draw different masks; dp rank 0 keeps Megatron's seeds)."""
    tracker = RNGStatesTracker()
    tracker.add("tp", seed + TP_SEED_OFFSET + dims.rank_in("dp") * dims.tp + dims.rank_in("tp"))
    return tracker


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Activation checkpointing: "full" recomputes each block in backward; "selective" the attention core
    (Korthikanti et al. 2022, sec. 5) and the MLP activation's output, which the down projection saves
    (activation_recompute.py); "none" does nothing. Parameter names are unchanged."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    from engine.parallel.rng import rng_tracker_of

    context_fn = recompute_context_fn(rng_tracker_of(model))
    for block in model.layers.values():
        checkpoint(block if mode == "full" else block.attn.core, context_fn=context_fn)
        if mode == "selective":
            recompute_output(block.mlp.act, block.mlp.down_proj)


def materialize_and_init(model: nn.Module, device: torch.device | str, seed: int) -> None:
    """Allocates a meta-device model on `device` and initialises every parameter (each rank its local shards) from
    its (seed, name) generator; a model already on a real device is re-initialised the same way."""
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        materialize_(model, device)
    init_weights(model, seed, sharding_of(model))


def sum_gradients_bf16_hook(group, bucket):
    """`sum_gradients_hook` in bf16 on the wire (parallel.grad_reduce_dtype bf16): half the bytes, bf16 rounding."""
    buffer = bucket.buffer()
    low = buffer.to(torch.bfloat16)
    fut = dist.all_reduce(low, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].to(buffer.dtype))


def sum_gradients_hook(group, bucket):
    """DDP communication hook: sum each gradient bucket (a dist.GradBucket) over `group` (a process group); DDP's
    default divides by the group size. Unannotated on purpose: DDP compares the annotations with the real classes,
    which postponed (string) annotations are not."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def grad_group(dims: ParallelDims) -> dist.ProcessGroup | None:
    """The ranks whose gradients of the same weights are summed: dp, or dp x cp with context parallelism (the cp ranks
    of a dp rank hold the same weights and different tokens); None when that is one rank."""
    if dims.dp * dims.cp == 1:
        return None
    return dims.group("dp_cp" if dims.cp_enabled else "dp")


def apply_data_parallel(model: nn.Module, dims: ParallelDims, bf16_reduce: bool = False) -> nn.Module:
    """DDP over the gradient group (`grad_group`: dp, or dp x cp), summing gradients (in bf16 with `bf16_reduce`);
    the model itself when that group is one rank."""
    group = grad_group(dims)
    if group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(model.parameters()).device
    # The only buffers are the rotary angles, equal on every rank by construction: no per-forward broadcast.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
              broadcast_buffers=False)  # fmt: skip
    ddp.register_comm_hook(group, sum_gradients_bf16_hook if bf16_reduce else sum_gradients_hook)
    return ddp


def apply_fsdp(
    chunks: list[nn.Module], dims: ParallelDims, bf16_params: bool = False, bf16_reduce: bool = False
) -> list[nn.Module]:
    """FSDP2 (torch's `fully_shard`) over the dp_shard dimension: each layer, then the root (embedding, head), so a
    layer's parameters are gathered just for its forward and backward; HSDP (replicated over dp_replicate, sharded
    within) when dp_replicate > 1. FSDP2 averages gradients over dp: the step multiplies its loss by dp to keep the
    sum (engine.training.step). `bf16_params`: FSDP2's mixed precision, bf16 parameters gathered for compute from
    the fp32 shards (which are the master weights the optimizer steps), gradients reduced in fp32; `bf16_reduce`:
    gradients reduced in bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(chunks[0].parameters()).device.type
    # ranks are dp_replicate x dp_shard x pp x cp x tp, tp fastest: the mesh's row-major order. Under tp the
    # parameters are plain tp-local tensors, which FSDP2 shards again over dp_shard (the sharding registry keeps their
    # tp place); under pp each of this rank's stages is sharded over the dp_shard ranks holding the same stage; under
    # cp over dp_shard x cp (the cp ranks hold the same weights: torchtitan's dp_shard_cp).
    names = ("dp_replicate", "dp_shard", "pp", "cp", "tp")
    shape = (dims.dp_replicate, dims.dp_shard, dims.pp, dims.cp, dims.tp)
    keep = [i for i, n in enumerate(shape) if n > 1 or names[i] in ("dp_shard", "cp")]
    mesh = init_device_mesh(device, tuple(shape[i] for i in keep), mesh_dim_names=tuple(names[i] for i in keep))
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate_enabled else mesh["dp_shard_cp"]
    reduce = torch.bfloat16 if bf16_reduce else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_params else None, reduce_dtype=reduce)
    kw = {"mp_policy": mp} if bf16_params or bf16_reduce else {}
    for chunk in chunks:
        for layer in chunk.layers.values():
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(chunk, mesh=mesh, **kw)
    return chunks


def pipeline_split(model: nn.Module, dims: ParallelDims, cfg: Config) -> list[nn.Module]:
    """This rank's pipeline chunks of the plain model: chunk c is global stage c * pp + pp_rank of pp x
    virtual_stages stages (engine.parallel.pipeline.stages); the model itself when pp is 1."""
    if not dims.pp_enabled:
        if cfg.parallel.virtual_stages != 1:
            raise ConfigError("parallel.virtual_stages > 1 needs pipeline parallelism (parallel.pp > 1)")
        return [model]
    from engine.parallel.pipeline.stages import split_model

    v, rank = cfg.parallel.virtual_stages, dims.rank_in("pp")
    return [split_model(model, dims.pp * v, c * dims.pp + rank, cfg.parallel.pp_layers) for c in range(v)]


def parallelize_gpt(
    model: nn.Module, dims: ParallelDims, cfg: Config, device: torch.device | str | None = None
) -> list[nn.Module]:
    """Applies the layout of `dims` (and cfg.parallel.sp / virtual_stages / pp_layers, cfg.model.recompute, seeded by
    cfg.train.seed) to the plain `model` in the documented order and returns this rank's chunks (its pipeline stages;
    one without pipeline parallelism). `device`: where a meta-device model is materialised and initialised; "meta"
    (or None with a meta model) stops before materialisation (a dry run), so no data parallelism is applied either.
    A model on a real device keeps its values (moved to `device` if given). Under pipeline parallelism the chunks are
    not wrapped in DDP: the pipeline step sums their gradients over dp after the schedule. With cfg.parallel.zero1
    (and dp > 1) no chunk is wrapped either: their parameters and gradients move into the flat buffers of
    engine.parallel.data_parallel, attached to every chunk (`grad_buffers_of`), which the optimizer shards."""
    if dims.cp_enabled:
        check_context_parallel(model.cfg.seq_len, dims.cp, cfg.parallel.cp_impl, model.cfg.n_heads // dims.tp)
    if dims.dp_shard_enabled and cfg.parallel.pp_schedule == "zb" and dims.pp_enabled:
        raise ConfigError("parallel.dp_shard (FSDP2) with the zb schedule is not implemented yet (deferred weight "
                          "gradients land after FSDP2 has resharded the weights); use 1f1b, gpipe or interleaved")
    sp = cfg.parallel.sp and dims.tp_enabled
    on_meta = any(p.is_meta for p in model.parameters())
    chunks = pipeline_split(model, dims, cfg)
    for chunk in chunks:
        if dims.tp_enabled:
            apply_tensor_parallel(chunk, dims.group("tp"), sp, tracker=tp_dropout_tracker(dims, cfg.train.seed))
        if cfg.train.fp8 != "off":
            convert_to_fp8(chunk, Fp8Recipe(cfg.train.fp8, cfg.train.fp8_amax_history, cfg.train.fp8_margin))
        if dims.cp_enabled:
            apply_context_parallel(chunk, dims.group("cp"), cfg.parallel.cp_impl)
        apply_recompute(chunk, chunk.cfg.recompute)
    if (device is None and on_meta) or (device is not None and torch.device(device).type == "meta"):
        return chunks
    for chunk in chunks:
        if on_meta:
            materialize_and_init(chunk, device, cfg.train.seed)
        elif device is not None:
            chunk.to(device)  # a model built (or loaded) on a real device keeps its values
    if dims.dp_shard_enabled:
        return apply_fsdp(chunks, dims, cfg.train.param_dtype == "bf16", cfg.parallel.grad_reduce_dtype == "bf16")
    bf16_params, bf16_reduce = cfg.train.param_dtype == "bf16", cfg.parallel.grad_reduce_dtype == "bf16"
    if bf16_params and grad_group(dims) is not None and not cfg.parallel.zero1:
        raise ConfigError("train.param_dtype bf16 keeps its fp32 master weights in ZeRO-1's shards: set parallel.zero1")
    if (cfg.parallel.zero1 and grad_group(dims) is not None) or bf16_params:  # our own buffers: ZeRO-1 shards them
        if bf16_params:  # initialised in fp32, then rounded
            for p in (p for chunk in chunks for p in chunk.parameters()):
                p.data = p.data.to(torch.bfloat16)
        group = dims.group("dp_cp" if dims.cp_enabled else "dp")  # grad_group's, even of one rank
        buffers = build_grad_buffers(chunks, group, cfg.parallel.bucket_mb, zero1=True,
                                     reduce_dtype=torch.bfloat16 if bf16_reduce else None)  # fmt: skip
        for chunk in chunks:
            attach_grad_buffers(chunk, buffers)
        return chunks
    return chunks if dims.pp_enabled else [apply_data_parallel(chunks[0], dims, bf16_reduce)]
