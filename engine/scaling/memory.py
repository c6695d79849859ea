"""Per-rank memory arithmetic for `--train.dry_run`: stored activations and optimizer state, in bytes.

Why: before spending a GPU allocation on a config, the dry run prints what each rank will hold, so that a tp/sp/pp/
recompute/micro-batch choice that cannot fit is caught on a laptop. Everything here is integer/rational arithmetic
on config numbers; nothing imports torch or touches a device.

Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), section 4 and its Table 2. Notation: s = seq_len, b = micro_batch, h = d_model, a = n_heads,
t = tp, L = layers on the rank, v = vocab_size, p = micro-batches in flight. Activations are 16-bit (2 bytes per
element), dropout masks 1 byte per element.

Per transformer layer (`activation_bytes_per_layer`), for the paper's GPT block (pre-LayerNorm, multi-head attention
with h = a * head_dim and no grouped-query attention, a 4h GELU MLP, dropout after attention probabilities, attention
output and MLP output). The paper's tally for one layer, no parallelism:
  attention: QKV-matmul input 2sbh, Q and K for QK^T 4sbh, softmax output 2as^2b, softmax dropout mask as^2b,
             dropout output + V for the attention-over-values 2as^2b + 2sbh, output-projection input 2sbh,
             dropout mask sbh                                                        -> 11sbh + 5as^2b
  MLP:       first-linear input 2sbh, GELU input 8sbh, second-linear input 8sbh, dropout mask sbh  -> 19sbh
  2 LayerNorms: input 2sbh each                                                      -> 4sbh
giving, in bytes:
  recompute   none                               selective (attention core recomputed)   full
  no par.     sbh(34 + 5as/h)                    34sbh                                   2sbh
  tp          sbh(10 + 24/t + 5as/(ht))          sbh(10 + 24/t)                          2sbh
  tp + sp     sbh/t (34 + 5as/h)                 34sbh/t                                 2sbh/t
With tp alone the 10sbh are the LayerNorm and dropout tensors that tensor parallelism leaves replicated on every
rank; sequence parallelism shards them along s, so tp+sp divides all 34 by t. Selective recomputation recomputes the
QK^T/softmax/dropout/attention-over-values core in the backward pass, which removes the 5as^2b (= sbh*5as/h) term.
Full recomputation keeps only each layer's input (2sbh, sharded along s with sp) and recomputes the whole layer in
the backward pass; the transient one-layer working set during that recompute is not included. tp = 1 with or
without sp reproduces the no-parallelism row. Fractions (24/t, 5as/(ht)) are evaluated exactly and the total is
rounded up to whole bytes.

Extra terms (paper section 4.3, "Total Activations Memory"), included by `estimate_activations`:
  - input embeddings (first pipeline stage only): the embedding-dropout mask, sbh/t bytes with sp (sbh without sp,
    where the embedding output is replicated across the tp ranks). The word/position embedding lookups themselves
    store nothing significant; Megatron's code also counts the int64 token ids (8sb) -- not included here.
  - output layer + loss (last pipeline stage only): the final LayerNorm's input 2sbh/t, the output projection's
    input 2sbh/t, and the fp32 logits kept for the cross entropy 4sbv/t, i.e. 4sbh/t (1 + v/h). Without sp the two
    sbh inputs are replicated (4sbh) while the vocab-parallel logits still divide by t: 4sbh + 4sbv/t.
  The paper adds these to the first stage as sbhL/t (p/L + delta_{p=1} 4/L (1 + v/h)): the output layer sits on the
  first stage only when there is no pipeline. Here the caller says which stage the rank is (`first_stage`,
  `last_stage`); both are True for pp = 1.

Pipeline factor (paper 4.2.3): under 1F1B the first stage holds the activations of p micro-batches (p = pipeline
size) before its first backward, so a stage with L/p layers stores p * L/p = L layers' worth. `in_flight_microbatches`
multiplies the layer and embedding terms; pass p - stage_index for 1F1B stage stage_index, min(p, number of
micro-batches) when there are fewer micro-batches than stages, all micro-batches of the step for GPipe, and
Megatron's (1 + (p - 1)/(p v)) * p for the first stage of the interleaved schedule with v virtual stages (it may be
fractional; the result is rounded up). The output term counts one micro-batch, which is what the last stage holds
under 1F1B (each micro-batch's backward runs right after its forward there) and without a pipeline; under GPipe the
last stage keeps every micro-batch's logits too, so the output term is an underestimate there.

What the activation figures are not: exact. They are the paper's accounting for its GPT block with dropout on.
For this engine's Llama-style block (RMSNorm, SwiGLU with ~8/3 h hidden, grouped-query attention, RoPE) and for
dropout = 0 (no masks stored) they are an estimate: the SwiGLU MLP stores a different set of tensors than the 4h
GELU MLP, GQA shrinks the K/V terms, and a fused/flash attention kernel never materialises the s x s scores (so the
5as/h term is not stored even without recomputation; the `selective` figure is then the closer one). Allocator
fragmentation, communication buffers and temporaries are not counted either.

Optimizer state (`optimizer_state_bytes`), per local (this rank's) parameter, fp32 state:
  - adamw: two moments (exp_avg, exp_avg_sq), 8 B/param.
  - adafactor (engine.optim.adafactor, built without momentum): a factored second moment, so the exact size depends
    on shapes -- an n x m matrix keeps a row (n) and a column (m) accumulator, 4(n + m) bytes instead of 4nm, while
    vectors keep a full fp32 second moment. Without shapes the estimate is 4 B/param, the size of an unfactored
    second moment: an upper bound for every matrix with both dims >= 2 (and exact for vectors), far above the
    real figure for large matrices. Pass `shapes=` (the local parameters' shapes) for the exact count.
  - master_weights=True adds a 4 B/param fp32 copy of the parameters (for 16-bit model weights). This engine's
    parameters are already fp32 (bf16 autocast over fp32 weights), so its default is False.
  The per-tensor `step` scalars (4 bytes per parameter tensor) are counted only when `shapes` is given. Parameters
  and gradients themselves are not part of the optimizer state and are not counted here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

_RECOMPUTE = ("none", "selective", "full")
_OPTIMIZERS = ("adamw", "adafactor")


@dataclass(frozen=True)
class ActivationEstimate:
    """Stored activations of one rank at its peak, in bytes (see the module docstring for the terms)."""

    per_layer_bytes: int  # one transformer layer's stored activations for one micro-batch
    layers: int  # layers on this rank
    embedding_bytes: int  # input-embedding dropout mask (paper's extra term) x in-flight micro-batches; 0 off stage
    output_bytes: int  # final norm + output layer inputs + fp32 logits for the loss; 0 where not on this rank
    total_bytes: int  # per_layer_bytes * layers * in_flight + embedding_bytes + output_bytes, rounded up


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_recompute(recompute: str) -> None:
    if recompute not in _RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(_RECOMPUTE)}, got {recompute!r}")


def _per_layer(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str) -> Fraction:
    """Exact bytes of one layer (paper sec. 4, Table 2)."""
    sbh = s * b * h
    if recompute == "full":
        return Fraction(2 * sbh, t if sp else 1)
    attention_core = Fraction(5 * a * s, h) if recompute == "none" else Fraction(0)  # 5as/h
    if sp:
        return Fraction(sbh, t) * (34 + attention_core)
    return sbh * (10 + Fraction(24, t) + attention_core / t)


def activation_bytes_per_layer(
    seq_len: int,
    micro_batch: int,
    d_model: int,
    n_heads: int,
    tp: int = 1,
    sp: bool = False,
    recompute: str = "none",
) -> int:
    """Bytes one transformer layer stores for the backward pass of one micro-batch on one tp rank.

    Korthikanti et al. 2022, Table 2: sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/(ht)) with tensor
    parallelism, sbh/t (34 + 5as/h) with tensor + sequence parallelism; selective recomputation drops the 5as/h
    term, full recomputation keeps 2sbh (2sbh/t with sp). The paper's GPT block (4h MLP, no GQA); an estimate for
    Llama-style blocks. Rounded up to whole bytes.
    """
    s = _positive_int("seq_len", seq_len)
    b = _positive_int("micro_batch", micro_batch)
    h = _positive_int("d_model", d_model)
    a = _positive_int("n_heads", n_heads)
    t = _positive_int("tp", tp)
    _check_recompute(recompute)
    return math.ceil(_per_layer(s, b, h, a, t, bool(sp), recompute))


def estimate_activations(
    seq_len: int,
    micro_batch: int,
    d_model: int,
    n_heads: int,
    vocab_size: int,
    n_layers_on_rank: int,
    tp: int = 1,
    sp: bool = False,
    recompute: str = "none",
    first_stage: bool = True,
    last_stage: bool = True,
    in_flight_microbatches: float = 1,
) -> ActivationEstimate:
    """One rank's peak stored activations: its layers, plus the embedding term on the first pipeline stage and the
    output-layer/loss term on the last.

    total = (per_layer * n_layers_on_rank + embedding) * in_flight_microbatches + output, where embedding is the
    dropout mask sbh/t (sbh without sp) and output is 4sbh/t (1 + v/h) (4sbh + 4sbv/t without sp), paper sec. 4.3.
    `in_flight_microbatches` is the number of micro-batches whose activations the rank holds at once (p - stage for
    1F1B; may be fractional for the interleaved schedule); `embedding_bytes` is reported already multiplied by it.
    """
    s = _positive_int("seq_len", seq_len)
    b = _positive_int("micro_batch", micro_batch)
    h = _positive_int("d_model", d_model)
    a = _positive_int("n_heads", n_heads)
    v = _positive_int("vocab_size", vocab_size)
    t = _positive_int("tp", tp)
    if isinstance(n_layers_on_rank, bool) or not isinstance(n_layers_on_rank, int) or n_layers_on_rank < 0:
        raise ValueError(f"n_layers_on_rank must be a non-negative integer, got {n_layers_on_rank!r}")
    if isinstance(in_flight_microbatches, bool) or not in_flight_microbatches > 0:
        raise ValueError(f"in_flight_microbatches must be > 0, got {in_flight_microbatches!r}")
    _check_recompute(recompute)
    sp = bool(sp)
    in_flight = Fraction(in_flight_microbatches)
    sbh = s * b * h

    layer = _per_layer(s, b, h, a, t, sp, recompute)
    embedding = Fraction(sbh, t if sp else 1) * in_flight if first_stage else Fraction(0)
    if last_stage:
        # final norm input 2sbh + output projection input 2sbh (sharded along s with sp) + fp32 logits 4sbv/t
        output = Fraction(4 * sbh, t if sp else 1) + Fraction(4 * s * b * v, t)
    else:
        output = Fraction(0)
    total = layer * n_layers_on_rank * in_flight + embedding + output
    return ActivationEstimate(
        per_layer_bytes=math.ceil(layer),
        layers=n_layers_on_rank,
        embedding_bytes=math.ceil(embedding),
        output_bytes=math.ceil(output),
        total_bytes=math.ceil(total),
    )


def optimizer_state_bytes(
    n_params_local: int,
    optimizer: str = "adamw",
    master_weights: bool = False,
    *,
    shapes: Iterable[Sequence[int]] | None = None,
) -> int:
    """Bytes of optimizer state for this rank's `n_params_local` parameters (fp32 state).

    adamw: 8 B/param (exp_avg and exp_avg_sq). adafactor (no momentum, as engine.optim builds it): without `shapes`,
    4 B/param, the size of an unfactored second moment (an upper bound for matrices with both dims >= 2, exact for
    vectors); with `shapes`, exact: 4(prod(shape[:-1]) + prod(shape[:-2]) * shape[-1]) for tensors of 2+ dims (row
    and column accumulators), 4 * numel for the others. master_weights adds 4 B/param (fp32 copy). With `shapes`
    (whose element counts must sum to n_params_local) the 4-byte `step` scalar per tensor is counted too.
    """
    if isinstance(n_params_local, bool) or not isinstance(n_params_local, int) or n_params_local < 0:
        raise ValueError(f"n_params_local must be a non-negative integer, got {n_params_local!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}")
    master = 4 * n_params_local if master_weights else 0
    if shapes is None:
        return (8 if optimizer == "adamw" else 4) * n_params_local + master

    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if any(d < 0 for shape in shapes for d in shape):
        raise ValueError(f"shapes must have non-negative dims, got {shapes}")
    numel = sum(math.prod(shape) for shape in shapes)
    if numel != n_params_local:
        raise ValueError(f"shapes hold {numel} elements but n_params_local is {n_params_local}")
    state = 4 * len(shapes)  # one fp32 `step` scalar per tensor
    for shape in shapes:
        if optimizer == "adamw":
            state += 8 * math.prod(shape)
        elif len(shape) >= 2:
            state += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        else:
            state += 4 * math.prod(shape)
    return state + master


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """Binary units with two decimals: 512 -> "512 B", 1536 -> "1.50 KiB", 1.23 * 2**30 -> "1.23 GiB"."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if round(value, 2) < 1024 or unit == _UNITS[-1]:
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")
