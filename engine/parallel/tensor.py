"""Megatron tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", sec. 3) as explicit layers.

A tp region starts with a column-parallel linear (weight split by output rows: each rank computes its slice of the
output from the full input) and ends with a row-parallel linear (weight split by input columns: each rank computes a
partial sum that is all-reduced). The communication is in four paired autograd functions (the paper's f and g):

    copy_to_tp_region      forward identity     backward all-reduce   (f: entering a region)
    reduce_from_tp_region  forward all-reduce   backward identity     (g: leaving a region)
    scatter_to_tp_region   forward split(-1)    backward all-gather(-1)
    gather_from_tp_region  forward all-gather(-1)  backward split(-1)

With sequence parallelism (sequence.py) f becomes an all-gather along the sequence and g a reduce-scatter.

Layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ReplicatedKVLinear (GQA with fewer kv
heads than tp ranks); `parallel_lm_logits` + `vocab_parallel_cross_entropy` for the output layer and loss.
Every layer takes its process group explicitly (default: the grid's tp group), so other trainers can pass their own,
and converts from its plain twin (`from_linear`, `from_embedding`). Each describes how its parameters are sharded in
`param_shardings()` (sharding.py's `ParamSharding`: global shape, partition dim, rank, padding, partial-gradient
flags); the parameters themselves carry nothing. Built directly, a layer initialises like its torch.nn twin of the
full size for the same seed (`init_param_`); `shard_full_` and `gather_full` move between full and local tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel.pipeline.deferred import deferrable_linear
from engine.parallel.sequence import (
    ShapeError,
    all_gather,
    all_reduce,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    resolve_group,
    split,
)
from engine.parallel.sharding import ParamSharding

# --- the four mappings of a tp region ---


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, -1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Identity forward; all-reduce of the input gradient (each rank's slice of the layer contributes to it)."""
    return _CopyToTP.apply(x, resolve_group(group))


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-reduce of per-rank partial sums forward; identity backward."""
    return _ReduceFromTP.apply(x, resolve_group(group))


def scatter_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's slice of the last dim forward; all-gather backward."""
    return _ScatterToTP.apply(x, resolve_group(group))


def gather_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather of the last dim forward; this rank's slice backward."""
    return _GatherFromTP.apply(x, resolve_group(group))


def enter_tp_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False, seq_dim: int = 1
) -> torch.Tensor:
    """Brings a replicated (or, with SP, sequence-sharded) activation into a tp region: copy-to, or SP all-gather.

    Call it once when several column-parallel layers share one input (q, k, v; gate and up) and build them with
    `skip_input_comm=True`: one all-reduce (SP: one all-gather) per block side instead of one per layer.
    """
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group, seq_dim, tp_output_grad=True)
    return copy_to_tp_region(x, group)


# --- initialisation of standalone layers and sharded tensors ---

InitFn = Callable[[torch.Tensor], object]


def linear_weight_init(weight: torch.Tensor) -> None:
    """`torch.nn.Linear`'s default weight init (kaiming uniform, a=sqrt(5)); needs the full (out, in) tensor."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def linear_bias_init(fan_in: int) -> InitFn:
    """`torch.nn.Linear`'s default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with the full fan-in."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda b: nn.init.uniform_(b, -bound, bound)


def embedding_init(weight: torch.Tensor) -> None:
    """`torch.nn.Embedding`'s default init, N(0, 1)."""
    nn.init.normal_(weight)


@torch.no_grad()
def init_param_(param: torch.Tensor, spec: ParamSharding, init_fn: InitFn) -> torch.Tensor:
    """Initialises `param` (laid out as `spec`) with `init_fn` as if it were unsharded: `init_fn` runs on the full
    unpadded tensor drawn from the default generator, exactly as the unsharded layer would, and this rank keeps its
    slice (Megatron-LM's `_initialize_affine_weight_cpu`); padding rows are zero. A layer built on the meta device is
    left as it is (it is initialised after materialisation)."""
    if param.is_meta:
        return param
    if not spec.sharded:
        init_fn(param)
        return param
    full = torch.empty(spec.global_shape, dtype=param.dtype, device=param.device)
    init_fn(full)
    return param.copy_(spec.local_from_full(full))


@torch.no_grad()
def shard_full_(param: torch.Tensor, spec: ParamSharding, full: torch.Tensor) -> torch.Tensor:
    """Copies this rank's slice of the full unpadded tensor `full` into the sharded `param` (padding rows zero)."""
    if tuple(full.shape) != tuple(spec.global_shape):
        raise ShapeError(f"full tensor has shape {tuple(full.shape)}, the parameter's is {spec.global_shape}")
    return param.copy_(spec.local_from_full(full))


def gather_full(
    param: torch.Tensor, spec: ParamSharding | None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The full unpadded tensor of a sharded parameter (all-gather over its group); a replicated one as it is."""
    if spec is None or not spec.sharded:
        return param.detach()
    full = all_gather(param.detach(), spec.dim, resolve_group(group))
    return full.narrow(spec.dim, 0, spec.global_shape[spec.dim])


def _spec(full_shape: tuple[int, ...], dim: int, group: dist.ProcessGroup, padded: int | None = None) -> ParamSharding:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return ParamSharding(tuple(full_shape), dim, r, n, padded)


def _empty(spec: ParamSharding, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(spec.local_shape, device=device, dtype=dtype))


def _copy_from(param: nn.Parameter, spec: ParamSharding, source: torch.Tensor | None) -> None:
    """A converted layer takes its slice of the plain layer's tensor (nothing to copy from the meta device)."""
    if source is not None and not source.is_meta and not param.is_meta:
        with torch.no_grad():
            param.copy_(spec.local_from_full(source.detach().to(param.dtype)))


def _divisible(what: str, value: int, n: int) -> None:
    if value % n:
        raise ShapeError(f"{what} = {value} is not divisible by the tensor-parallel size {n}")


# --- layers ---


def _no_init(t: torch.Tensor) -> None:
    """For conversions: the values come from the plain layer (or from init_weights after materialisation)."""


class _ShardedLinear(nn.Module):
    """What the tensor-parallel linears share: their parameters' shardings, and conversion from a plain nn.Linear
    (the layer takes its slice of the weight and bias; nothing to copy from the meta device)."""

    weight_spec: ParamSharding
    bias_spec: ParamSharding
    weight_grad_store = None  # set by a zero-bubble pipeline runner: the weight gradient waits for the W pass
    fp8_scalers = None  # set by engine.precision.fp8.convert_to_fp8: the three GEMMs run in FP8
    fp8_capable = True

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's x W^T (+ b): in FP8 when converted, else a plain (possibly deferred-weight-gradient) linear."""
        if self.fp8_scalers is not None:
            from engine.precision.fp8 import fp8_linear

            return fp8_linear(x, self.weight, bias, self.fp8_scalers, self.training)
        return deferrable_linear(x, self.weight, bias, self.weight_grad_store)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype,
                    init_method=_no_init, bias_init_method=_no_init, **kwargs)  # fmt: skip
        return layer._take(linear)

    def _take(self, linear: nn.Linear):
        _copy_from(self.weight, self.weight_spec, linear.weight)
        if linear.bias is not None:
            _copy_from(self.bias, self.bias_spec, linear.bias)
        return self

    def param_shardings(self) -> dict[str, ParamSharding]:
        out = {"weight": self.weight_spec}
        if self.bias is not None:
            out["bias"] = self.bias_spec
        return out


class ColumnParallelLinear(_ShardedLinear):
    """y = x A^T + b with A split by output rows over tp: this rank outputs out_features / tp columns.

    The input is replicated (or sequence-sharded with `sequence_parallel`, then all-gathered here). `gather_output`
    all-gathers the output columns (not with SP). `skip_input_comm`: the caller already ran `enter_tp_region`.
    `pad_output` pads out_features up to a multiple of tp with zero rows (an odd vocabulary in an LM head); the
    padded columns must be masked downstream (vocab_parallel_cross_entropy's `vocab_size`). Built directly it is
    initialised like nn.Linear of the full size (same seed, same values); `from_linear` converts a plain layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_input_comm: bool = False,
        pad_output: bool = False,
        seq_dim: int = 1,
        group: dist.ProcessGroup | None = None,
        init_method: InitFn | None = None,
        bias_init_method: InitFn | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = resolve_group(group)
        n = dist.get_world_size(self.group)
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with sequence_parallel")
        padded = -(-out_features // n) * n if pad_output else out_features
        _divisible("ColumnParallelLinear out_features", padded, n)
        self.in_features, self.out_features, self.padded_out_features = in_features, out_features, padded
        self.gather_output, self.skip_input_comm = gather_output, skip_input_comm
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight_spec = _spec((out_features, in_features), 0, self.group, padded)
        self.bias_spec = _spec((out_features,), 0, self.group, padded)
        self.weight = _empty(self.weight_spec, device, dtype)
        self.bias = _empty(self.bias_spec, device, dtype) if bias else None
        self.reset_parameters(init_method, bias_init_method)

    def reset_parameters(self, init_method: InitFn | None = None, bias_init_method: InitFn | None = None) -> None:
        """Default: torch.nn.Linear's init of the full weight, sliced (equal to nn.Linear for the same seed)."""
        init_param_(self.weight, self.weight_spec, init_method or linear_weight_init)
        if self.bias is not None:
            init_param_(self.bias, self.bias_spec, bias_init_method or linear_bias_init(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip_input_comm:
            x = enter_tp_region(x, self.group, self.sequence_parallel, self.seq_dim)
        y = self._linear(x, self.bias)
        if self.gather_output:
            y = gather_from_tp_region(y, self.group)
            if self.padded_out_features != self.out_features:
                y = y[..., : self.out_features]
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, sp={self.sequence_parallel}"
        )


class RowParallelLinear(_ShardedLinear):
    """y = x A^T + b with A split by input columns over tp: each rank's partial product is summed over tp
    (all-reduce; with `sequence_parallel`, reduce-scatter along the sequence). The bias is replicated and added
    after the sum; under SP its gradient is a partial sum over tp (recorded in `param_shardings`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        group: dist.ProcessGroup | None = None,
        init_method: InitFn | None = None,
        bias_init_method: InitFn | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = resolve_group(group)
        n = dist.get_world_size(self.group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        _divisible("RowParallelLinear in_features", in_features, n)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.seq_dim = input_is_parallel, sequence_parallel, seq_dim
        self.weight_spec = _spec((out_features, in_features), 1, self.group)
        self.bias_spec = ParamSharding((out_features,), sequence_parallel=sequence_parallel)
        self.weight = _empty(self.weight_spec, device, dtype)
        self.bias = _empty(self.bias_spec, device, dtype) if bias else None
        self.reset_parameters(init_method, bias_init_method)

    def reset_parameters(self, init_method: InitFn | None = None, bias_init_method: InitFn | None = None) -> None:
        init_param_(self.weight, self.weight_spec, init_method or linear_weight_init)
        if self.bias is not None:
            init_param_(self.bias, self.bias_spec, bias_init_method or linear_bias_init(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = self._linear(x, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group, self.seq_dim)
        else:
            y = reduce_from_tp_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, sp={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp. The vocabulary is padded to a multiple of tp with zero rows;
    each rank looks up the ids in its range (others give zeros) and the partial rows are summed over tp
    (all-reduce; with `sequence_parallel`, reduce-scatter along the sequence). Takes the full (b, s) ids."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        group: dist.ProcessGroup | None = None,
        init_method: InitFn | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = resolve_group(group)
        n, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // n) * n
        per_rank = self.num_embeddings_padded // n
        self.vocab_start, self.vocab_end = r * per_rank, (r + 1) * per_rank
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight_spec = _spec((num_embeddings, embedding_dim), 0, self.group, self.num_embeddings_padded)
        self.weight = _empty(self.weight_spec, device, dtype)
        self.reset_parameters(init_method)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **kwargs) -> VocabParallelEmbedding:
        w = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device=w.device, dtype=w.dtype,
                    init_method=_no_init, **kwargs)  # fmt: skip
        _copy_from(layer.weight, layer.weight_spec, w)
        return layer

    def param_shardings(self) -> dict[str, ParamSharding]:
        return {"weight": self.weight_spec}

    def reset_parameters(self, init_method: InitFn | None = None) -> None:
        """Default: torch.nn.Embedding's N(0, 1) on the full table, sliced."""
        init_param_(self.weight, self.weight_spec, init_method or embedding_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group, self.seq_dim)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (padded {self.num_embeddings_padded}, local [{self.vocab_start}, "
            f"{self.vocab_end})), {self.embedding_dim}, sp={self.sequence_parallel}"
        )


def attention_heads_per_rank(n_heads: int, n_kv_heads: int, tp: int) -> tuple[int, int, bool]:
    """(q heads, kv heads, kv replicated) per tp rank for attention with `n_heads` query and `n_kv_heads` kv heads.

    q heads split evenly. kv heads split too when tp divides them; with fewer kv heads than ranks (GQA), tp must be
    a multiple of n_kv_heads and each rank keeps the one kv head its q heads use (`ReplicatedKVLinear`).
    """
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"model.n_heads = {n_heads} is not a multiple of model.n_kv_heads = {n_kv_heads}")
    if n_heads % tp:
        raise ValueError(f"model.n_heads = {n_heads} is not divisible by parallel.tp = {tp}")
    if n_kv_heads % tp == 0:
        return n_heads // tp, n_kv_heads // tp, False
    if tp % n_kv_heads:
        raise ValueError(
            f"model.n_kv_heads = {n_kv_heads} and parallel.tp = {tp}: one must divide the other (kv heads are split "
            "over tp, or replicated when there are fewer than tp)"
        )
    return n_heads // tp, 1, True


def check_tp_divisibility(n_heads: int, n_kv_heads: int, ffn_hidden: int, tp: int) -> None:
    """One-line ValueError naming the config key when a model shape cannot be split over `tp` ranks."""
    attention_heads_per_rank(n_heads, n_kv_heads, tp)
    if ffn_hidden % tp:
        raise ValueError(f"model.ffn_hidden = {ffn_hidden} is not divisible by parallel.tp = {tp}")


class ReplicatedKVLinear(_ShardedLinear):
    """The k or v projection under GQA when n_kv_heads < tp: every rank holds the full (n_kv_heads * head_dim, in)
    weight (initialised as the unsharded nn.Linear) and outputs only kv head `tp_rank // (tp / n_kv_heads)`, the
    one its q heads attend with. Each rank's weight gradient is then a partial sum over tp (recorded in
    `param_shardings`; `finish_tp_grads` sums it, with or without SP)."""

    fp8_capable = False  # its forward slices the weight's rows: it stays in the training dtype

    def __init__(
        self,
        in_features: int,
        n_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        *,
        sequence_parallel: bool = False,
        skip_input_comm: bool = False,
        seq_dim: int = 1,
        group: dist.ProcessGroup | None = None,
        init_method: InitFn | None = None,
        bias_init_method: InitFn | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = resolve_group(group)
        n, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        if n % n_kv_heads:
            raise ValueError(f"ReplicatedKVLinear: tp = {n} is not a multiple of n_kv_heads = {n_kv_heads}")
        self.in_features, self.head_dim, self.head = in_features, head_dim, r // (n // n_kv_heads)
        self.sequence_parallel, self.skip_input_comm, self.seq_dim = sequence_parallel, skip_input_comm, seq_dim
        out = n_kv_heads * head_dim
        self.weight_spec = ParamSharding((out, in_features), partial_grad=True)
        self.bias_spec = ParamSharding((out,), partial_grad=True)
        self.weight = _empty(self.weight_spec, device, dtype)
        self.bias = _empty(self.bias_spec, device, dtype) if bias else None
        init_param_(self.weight, self.weight_spec, init_method or linear_weight_init)
        if self.bias is not None:
            init_param_(self.bias, self.bias_spec, bias_init_method or linear_bias_init(in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, n_kv_heads: int, head_dim: int, **kwargs) -> ReplicatedKVLinear:
        w = linear.weight
        layer = cls(linear.in_features, n_kv_heads, head_dim, linear.bias is not None, device=w.device,
                    dtype=w.dtype, init_method=_no_init, bias_init_method=_no_init, **kwargs)  # fmt: skip
        return layer._take(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip_input_comm:
            x = enter_tp_region(x, self.group, self.sequence_parallel, self.seq_dim)
        rows = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        return F.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])


def parallel_lm_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    seq_dim: int = 1,
) -> torch.Tensor:
    """Vocab-sharded logits (b, s, V_padded / tp) from a vocab-sharded weight (e.g. a tied VocabParallelEmbedding's):
    the output layer as a column-parallel linear; feed them to `vocab_parallel_cross_entropy`."""
    return F.linear(enter_tp_region(hidden, group, sequence_parallel, seq_dim), weight)


# --- cross-entropy over vocab-sharded logits ---


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE from logits split over the vocabulary (Megatron `cross_entropy.py`), in fp32.

    loss = log(sum_j exp(z_j - m)) - (z_target - m) with m = max_j z_j. Two all-reduces of (tokens,) sizes: the max,
    then the target logit and the sum of exponentials stacked into one buffer. No rank holds the full logits.
    Gradient: softmax - onehot(target), both already local to the shard.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index):
        part = logits.shape[-1]
        start = dist.get_rank(group) * part
        z = logits.float()  # a copy when logits are lower precision; cloned below otherwise before in-place ops
        if vocab_size is not None and start + part > vocab_size:
            z = z.clone() if z is logits else z
            z[..., max(vocab_size - start, 0) :] = float("-inf")  # padding columns: zero probability
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        local_t = target - start
        in_shard = (local_t >= 0) & (local_t < part)
        local_t = local_t.masked_fill(~in_shard, 0)
        target_logit = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        exp = z.exp_()
        stats = torch.stack([target_logit, exp.sum(dim=-1)])
        dist.all_reduce(stats, group=group)
        target_logit, sum_exp = stats[0], stats[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_t, in_shard & valid, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, hit, valid = ctx.saved_tensors
        g = (grad_loss * valid).unsqueeze(-1)
        grad = softmax * g
        onehot = torch.zeros_like(softmax).scatter_(-1, local_t.unsqueeze(-1), hit.unsqueeze(-1).to(softmax.dtype))
        grad = grad - onehot * g
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits (..., V_padded / tp) against full-vocabulary `target` (...).

    `vocab_size`: the true vocabulary; logit columns at or beyond it (tp padding) are excluded from the softmax.
    reduction "mean" averages over targets != ignore_index (0 when there are none), like F.cross_entropy; "sum";
    "none" gives the per-token fp32 loss (0 at ignored positions).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be mean|sum|none, got {reduction!r}")
    if logits.shape[:-1] != target.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree before the vocab dim")
    loss = _VocabParallelCrossEntropy.apply(logits, target, resolve_group(group), vocab_size, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)
