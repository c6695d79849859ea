"""The activations this engine's own model stores for the backward pass, tensor by tensor, in bytes.

Why: `memory.estimate_activations` is Korthikanti et al. 2022's tally for their GPT block (16-bit residual stream,
dropout masks, the s x s scores). This engine trains differently: fp32 weights under bf16 autocast (so the residual
stream and every norm's input are fp32, and the projections save a bf16 cast of their input), flash attention
(softmax statistics instead of scores), dropout 0 by default, a SwiGLU MLP for llama. Measured on CPU with
`torch.autograd.graph.saved_tensors_hooks` (tests/scaling/test_activation_tally.py), the tally here equals what the
model saves byte for byte, for both kernel backends, every recompute mode, and tp 2 with and without sequence
parallelism. At a 7B-like shape (d_model 4096, 32 heads, seq 4096) an engine layer without recomputation stores
1.06x Korthikanti's selective-recompute figure for gpt2 and for llama with the Triton kernels, 1.45x with the torch
ones (whose RMSNorm keeps its fp32 normalised input and whose SwiGLU keeps silu(gate)).

Notation: n = tokens of one micro-batch on the rank (micro_batch * seq_len / cp), h = d_model, a = heads, f =
ffn_hidden, t = tp, r = t with sequence parallelism else 1 (what sp shards along the sequence), v = padded vocabulary,
kvw = this rank's key/value width (n_kv_heads * head_dim / t, or the whole width where the kv heads are replicated
because t does not divide them). Per layer, recompute "none":

    norm inputs, fp32 residual        2 * 4nh / r
    norm statistics, fp32             2 * n * (8 LayerNorm: mean, rstd | 4 RMSNorm: rstd; + 4h for the torch
                                      RMSNorm, which keeps its normalised input) / r
    projection inputs, bf16           2 * 2nh / r                       each norm output cast once and shared by
                                      q/k/v (gate/up) (engine/model/shared_cast.py); with sp kept as this rank's
                                      shard and all-gathered again in backward (engine/parallel/regather.py)
    q, k, v as attention saves them   2n(h/t + 2 kvw)                   (llama: q and k after rotary embedding)
    attention output                  2nh / t                           (also the output projection's input)
    softmax statistics (lse), fp32    4na / t
    MLP, bf16                         gpt2: 2 * 2nf/t (GELU input, down-projection input)
                                      llama: 3 * 2nf/t with the Triton SwiGLU (gate, up, down input),
                                             4 * 2nf/t with the torch one (which also keeps silu(gate))
"selective" recomputation drops the lse (the attention core's inputs and output stay alive anyway: the projections
produced and consume them) and the MLP's down-projection input, recomputed from the activation's inputs
(engine/parallel/activation_recompute.py): one MLP tensor, 2nf/t, less. "full" keeps each layer's fp32 input,
4nh / r. First stage: the token ids (int64, 8n, shared by the lookups) and, under tp, the vocab-parallel embedding's
mask (1 byte a token). Last stage: the final norm's input and statistics (as above), then the torch path keeps the
head's bf16 input cast (2nh), the fp32 log-softmax (4nv/t) and, under tp, the vocab-parallel loss's two masks (2n);
the Triton path's fused linear cross-entropy computes the gradients in the forward pass and keeps them: d(input), 2nh,
and d(weight), 4vh/t, which does not grow with the batch; only the torch path keeps the int64 targets (8n).

Multi-token prediction (`--train.objective mtp`, engine.model.mtp; `mtp_terms`), on the last stage, per depth
(never recomputed: the engine checkpoints the trunk's layers only; with sp, on the sequence shard, r = t, as the
trunk's layers):

    sequential (DeepSeek-V3)          shifted token ids 8n (+ n under tp), the embedding norm's fp32 input 4nh/r,
                                      two RMSNorms' statistics 2 * n * (4 | 4 + 4h torch) / r, the 2d -> d
                                      projection's bf16 input 4nh/r (the hidden norm's input is the previous depth's
                                      output, which that depth's head already keeps); then one layer (its output
                                      back in the residual stream's fp32, as the trunk's) and an output-head call
    parallel (Gloeckle et al.)        one layer less its first norm's input (the trunk's output, which the main head
                                      keeps), then an output-head call
Each head call keeps the output terms above (its own shifted targets with the torch loss): so with the Triton fused loss
D + 1 calls keep D + 1 weight gradients (4vh/t each). The modules count as layers (times the micro-batches in flight),
their head calls as the output term. Autocast copies each depth's block weights and the (replicated) 2h x h projection;
the head's copy is one. Parallel heads backpropagated one at a time (per_head_backward, which TrainStep uses without pp,
DDP, FSDP2 or gradient buffers) peak at the trunk plus one head: its whole layer and one head call.

Where it goes (Llama 3 70B at tp 8 + sp, 8192 tokens, selective, 80 layers): the projections' inputs were the
largest term while they were kept at the full sequence, 20 of 41 GiB (50 of 71 before the projections shared one
cast). Kept as the sequence shard and all-gathered again in the backward pass (as Megatron does) they take 2.5 GiB,
and with the down projection's input recomputed the layers keep 19.1 GiB, the MLP's gate and up (8.75 GiB) and the
fp32 norm inputs (5 GiB) the largest terms.

Besides activations, autocast keeps a bf16 copy of the matmul weights for the backward pass (2 bytes a parameter);
`autocast_weight_bytes` counts them for a rank's local parameters.

Not covered: dropout > 0 (the torch attention then falls back to a path that stores the s x s probabilities; use
Korthikanti's tally, which counts masks), the fp16/fp32 precisions (every "bf16" above becomes the compute dtype's
width), the t5 encoder-decoder, the zero-bubble schedule's deferred weight gradients (between a micro-batch's B and W
passes its projections' inputs stay alive, at the full sequence under sp), and FP8 linears (train.fp8: they keep
their fp8 copy of the input instead, and the sp and selective savings above do not apply to it). Small tensors that do
not grow with n (rotary tables, scalars) are left out.
"""

from __future__ import annotations

import math
from fractions import Fraction

from engine.config import ModelConfig
from engine.scaling.memory import estimate_activations

_RECOMPUTE = ("none", "selective", "full")
_KERNELS = ("torch", "triton")
_MTP_KINDS = ("sequential", "parallel")


def _check(cfg: ModelConfig, tp: int, recompute: str, kernels: str) -> None:
    if cfg.arch not in ("gpt2", "llama"):
        raise ValueError(f"the activation tally covers arch gpt2 and llama, not {cfg.arch!r}")
    if cfg.dropout:
        raise ValueError("the activation tally covers dropout 0 (use memory.estimate_activations for dropout)")
    if recompute not in _RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(_RECOMPUTE)}, got {recompute!r}")
    if kernels not in _KERNELS:
        raise ValueError(f"kernels must be torch or triton, got {kernels!r}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or cfg.n_heads % tp:
        raise ValueError(f"tp must be a positive integer dividing n_heads {cfg.n_heads}, got {tp!r}")


def _norm_stats(cfg: ModelConfig, kernels: str) -> int:
    """Bytes a token of the norm's statistics take beyond its fp32 input."""
    if cfg.arch == "gpt2":
        return 8  # LayerNorm: mean and rstd
    return 4 + (4 * cfg.d_model if kernels == "torch" else 0)  # RMSNorm: rstd (+ the normalised input in torch)


def layer_terms(cfg: ModelConfig, tokens: int, tp: int = 1, sp: bool = False, recompute: str = "none",
                kernels: str = "triton") -> dict[str, Fraction]:  # fmt: skip
    """Bytes one transformer layer of the engine stores for one micro-batch of `tokens` tokens on one tp rank, by
    term (module docstring). `cfg` resolved (n_kv_heads and ffn_hidden set)."""
    _check(cfg, tp, recompute, kernels)
    return _layer_terms(cfg, tokens, tp, sp, recompute, kernels)


def _layer_terms(cfg: ModelConfig, tokens: int, tp: int, sp: bool, recompute: str, kernels: str
                 ) -> dict[str, Fraction]:  # fmt: skip
    """`layer_terms` without the argument checks."""
    n, h, a, f, t = tokens, cfg.d_model, cfg.n_heads, cfg.ffn_hidden, tp
    r = t if sp and t > 1 else 1
    if recompute == "full":
        return {"layer input, fp32": Fraction(4 * n * h, r)}
    head_dim = h // a
    kvw = Fraction(cfg.n_kv_heads * head_dim, t if cfg.n_kv_heads % t == 0 else 1)
    llama = cfg.arch == "llama"
    mlp_tensors = (4 if kernels == "torch" else 3) if llama else 2
    terms = {
        "norm inputs, fp32": Fraction(2 * 4 * n * h, r),
        "norm statistics": Fraction(2 * n * _norm_stats(cfg, kernels), r),
        "projection inputs, bf16": Fraction(2 * 2 * n * h, r),
        "q, k, v": 2 * n * (Fraction(h, t) + 2 * kvw),
        "attention output": Fraction(2 * n * h, t),
        "softmax statistics": Fraction(4 * n * a, t),
        "MLP": Fraction(mlp_tensors * 2 * n * f, t),
    }
    if recompute == "selective":
        del terms["softmax statistics"]
        terms["MLP"] -= Fraction(2 * n * f, t)  # the down projection's input, recomputed from the activation's inputs
    return terms


def embedding_bytes(tokens: int, tp: int = 1) -> int:
    """The first stage's stored tensors for one micro-batch: the int64 token ids, and the vocab-parallel
    embedding's out-of-shard mask (1 byte a token) under tp."""
    return 8 * tokens + (tokens if tp > 1 else 0)


def output_terms(cfg: ModelConfig, tokens: int, tp: int = 1, sp: bool = False, kernels: str = "triton"
                 ) -> dict[str, Fraction]:  # fmt: skip
    """The last stage's stored tensors for one micro-batch: final norm, output head and loss (module docstring);
    `cfg.vocab_size` is the padded vocabulary."""
    _check(cfg, tp, "none", kernels)
    return _output_terms(cfg, tokens, tp, sp, kernels)


def _output_terms(cfg: ModelConfig, tokens: int, tp: int, sp: bool, kernels: str) -> dict[str, Fraction]:
    """`output_terms` without the argument checks."""
    n, h, v, t = tokens, cfg.d_model, cfg.vocab_size, tp
    r = t if sp and t > 1 else 1
    terms = {
        "final norm input, fp32": Fraction(4 * n * h, r),
        "final norm statistics": Fraction(n * _norm_stats(cfg, kernels), r),
    }
    if kernels == "triton":
        terms["fused loss: input gradient"] = Fraction(2 * n * h)
        terms["fused loss: weight gradient, fp32"] = Fraction(4 * v * h, t)
    else:  # the torch loss keeps its targets; the fused one, done with them in the forward pass, does not
        terms["head input cast, bf16"] = Fraction(2 * n * h)
        terms["log-softmax, fp32"] = Fraction(4 * n * v, t)
        if t > 1:
            terms["vocab-parallel loss masks"] = Fraction(2 * n)
        terms["targets, int64"] = Fraction(8 * n)
    return terms


def _check_mtp(depth: int, kind: str) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"mtp_depth must be a non-negative integer, got {depth!r}")
    if kind not in _MTP_KINDS:
        raise ValueError(f"mtp_kind must be sequential or parallel, got {kind!r}")


def _add(total: dict[str, Fraction], terms: dict[str, Fraction], prefix: str = "") -> None:
    for key, value in terms.items():
        total[prefix + key] = total.get(prefix + key, Fraction(0)) + value


def _mtp_parts(cfg: ModelConfig, tokens: int, depth: int, kind: str, tp: int, sp: bool, kernels: str
               ) -> tuple[dict[str, Fraction], dict[str, Fraction]]:  # fmt: skip
    """(the D modules' terms, their D output-head calls' terms), each summed over the depths (module docstring)."""
    n, h = tokens, cfg.d_model
    r = tp if sp and tp > 1 else 1
    modules: dict[str, Fraction] = {}
    heads: dict[str, Fraction] = {}
    for _ in range(depth):
        _add(heads, _output_terms(cfg, n, tp, sp, kernels))
        if kind == "parallel":
            block = _layer_terms(cfg, n, tp, sp, "none", kernels)
            block["norm inputs, fp32"] -= Fraction(4 * n * h, r)  # the trunk's output, kept by the main head's norm
        else:
            own = {  # the lookup takes the whole shifted ids; the rest acts on this rank's sequence shard under sp
                "shifted token ids": Fraction(embedding_bytes(n, tp)),
                "embedding norm input, fp32": Fraction(4 * n * h, r),
                "input norms' statistics": Fraction(2 * n * (4 + (4 * h if kernels == "torch" else 0)), r),
                "projection input, bf16": Fraction(4 * n * h, r),
            }
            _add(modules, own)
            block = _layer_terms(cfg, n, tp, sp, "none", kernels)
        _add(modules, block, "block: ")
    return modules, heads


def mtp_terms(cfg: ModelConfig, tokens: int, depth: int, kind: str = "sequential", tp: int = 1, sp: bool = False,
              kernels: str = "triton") -> dict[str, Fraction]:  # fmt: skip
    """Bytes the `depth` multi-token prediction modules of `kind` (sequential | parallel; engine.model.mtp) store
    for one micro-batch of `tokens` tokens on one tp rank, by term summed over the depths, their output-head calls
    included ("head: " terms; module docstring). Whatever model.recompute says: the engine checkpoints the trunk's
    layers only. With sequence parallelism the modules run on the rank's sequence shard."""
    _check(cfg, tp, "none", kernels)
    _check_mtp(depth, kind)
    modules, heads = _mtp_parts(cfg, tokens, depth, kind, tp, sp, kernels)
    _add(modules, heads, "head: ")
    return modules


def autocast_weight_bytes(cfg: ModelConfig, layers: int, tp: int = 1, recompute: str = "none",
                          kernels: str = "triton", last_stage: bool = True, mtp_depth: int = 0,
                          mtp_kind: str = "sequential") -> int:  # fmt: skip
    """The bf16 copies of a rank's matmul weights that autocast makes in the forward pass and the backward pass
    needs (fp32 weights): each layer's projections (none under full recomputation, which casts them again in the
    backward) and, on the last stage, the output head (not with the Triton fused loss, which reads the fp32 weight)
    and the `mtp_depth` MTP modules' blocks and projections (whatever `recompute`: only the trunk's layers are
    checkpointed); the head's copy is one, shared by its D + 1 calls (autocast caches it)."""
    _check(cfg, tp, recompute, kernels)
    h, f, t = cfg.d_model, cfg.ffn_hidden, tp
    kv_heads = cfg.n_kv_heads if cfg.n_kv_heads % t else cfg.n_kv_heads // t
    per_layer = 2 * h * h // t + 2 * h * kv_heads * (h // cfg.n_heads) + (3 if cfg.arch == "llama" else 2) * h * f // t
    n = 0 if recompute == "full" else per_layer * layers
    if last_stage and kernels == "torch":
        n += cfg.vocab_size * h // t
    if last_stage and mtp_depth:  # the MTP blocks are never recomputed; the sequential 2d -> d projection is replicated
        _check_mtp(mtp_depth, mtp_kind)
        n += mtp_depth * (per_layer + (2 * h * h if mtp_kind == "sequential" else 0))
    return 2 * n


def engine_activation_bytes(cfg: ModelConfig, micro_batch: int, layers: int, tp: int = 1, sp: bool = False,
                            cp: int = 1, recompute: str = "none", kernels: str = "triton", first_stage: bool = True,
                            last_stage: bool = True, in_flight_microbatches: float = 1, mtp_depth: int = 0,
                            mtp_kind: str = "sequential", mtp_per_head: bool = False) -> int:  # fmt: skip
    """One rank's stored activations at its peak: `layers` layers and the embedding for `in_flight_microbatches`
    micro-batches, plus the output term for one (as `memory.estimate_activations` composes Korthikanti's). On the
    last stage, `mtp_depth` MTP modules of `mtp_kind`: their modules counted as layers, their output-head calls as
    the output term; `mtp_per_head` (parallel heads backpropagated one at a time, engine.model.mtp.per_head_backward):
    the peak, the trunk with the largest head's graph (one MTP head with the trunk's output it keeps)."""
    tokens = micro_batch * cfg.seq_len // cp
    layer = sum(layer_terms(cfg, tokens, tp, sp, recompute, kernels).values())
    held = layer * layers + (embedding_bytes(tokens, tp) if first_stage else 0)
    total = held * Fraction(in_flight_microbatches)
    if last_stage:
        out = sum(output_terms(cfg, tokens, tp, sp, kernels).values())
        if mtp_depth:
            mtp = mtp_terms(cfg, tokens, 1 if mtp_per_head else mtp_depth, mtp_kind, tp, sp, kernels)
            modules = sum(v for k, v in mtp.items() if not k.startswith("head: "))
            heads = sum(v for k, v in mtp.items() if k.startswith("head: "))
            if mtp_per_head:
                if mtp_kind != "parallel":
                    raise ValueError("mtp_per_head needs parallel heads (mtp_kind parallel)")
                trunk_output = Fraction(4 * tokens * cfg.d_model, tp if sp and tp > 1 else 1)  # its head keeps it
                out = max(out, modules + trunk_output + heads)
            else:
                total += modules * Fraction(in_flight_microbatches)
                out += heads
        total += out
    return math.ceil(total)


def rank_activation_bytes(cfg: ModelConfig, micro_batch: int, layers: int, tp: int = 1, sp: bool = False,
                          cp: int = 1, recompute: str = "none", first_stage: bool = True, last_stage: bool = True,
                          in_flight_microbatches: float = 1, autocast_copies: bool = True, mtp_depth: int = 0,
                          mtp_kind: str = "sequential", mtp_per_head: bool = False) -> int:  # fmt: skip
    """What the dry run and the layout planner count as a rank's activations on a GPU: this module's tally for the
    kernels a GPU run uses (Triton unless `model.kernels` is torch) plus, with `autocast_copies` (fp32 weights under
    autocast), the weights' bf16 copies; for configs the tally does not cover (dropout > 0, other archs),
    Korthikanti et al.'s (memory.estimate_activations; selective with flash attention, whose scores are never
    stored). `mtp_depth`, `mtp_kind`, `mtp_per_head`: a last stage's multi-token prediction modules
    (`engine_activation_bytes`); outside the tally each counts as one more layer with an output term."""
    if cfg.dropout == 0 and cfg.arch in ("gpt2", "llama"):
        kernels = "torch" if cfg.kernels == "torch" else "triton"
        act = engine_activation_bytes(cfg, micro_batch, layers, tp, sp, cp, recompute, kernels, first_stage,
                                      last_stage, in_flight_microbatches, mtp_depth, mtp_kind,
                                      mtp_per_head)  # fmt: skip
        copies = 0
        if autocast_copies:
            depth = 1 if mtp_per_head and mtp_depth else mtp_depth  # one head's block cast at a time
            copies = autocast_weight_bytes(cfg, layers, tp, recompute, kernels, last_stage, depth, mtp_kind)
        return act + copies
    depth = mtp_depth if last_stage else 0
    est = estimate_activations(
        cfg.seq_len // cp, micro_batch, cfg.d_model, cfg.n_heads, cfg.vocab_size,
        layers + (1 if mtp_per_head and depth else depth), tp=tp, sp=sp, recompute=recompute,
        first_stage=first_stage, last_stage=last_stage, in_flight_microbatches=in_flight_microbatches,
    )  # fmt: skip
    return est.total_bytes + (0 if mtp_per_head else depth) * est.output_bytes
