"""The activation tally's multi-token prediction term (engine.scaling.activations.mtp_terms) equals what the D MTP
modules of engine.model.mtp save for the backward pass.

Measured as tests/scaling/test_activation_tally.py does (saved_tensors_hooks under bf16 autocast, each storage once,
parameters and buffers left out), as the difference between a MultiTokenGPT of depth D and the GPT of the same trunk,
forward with reduction "sum" (the trainer's). That difference holds the modules, their D output-head calls and the
bf16 weight copies autocast keeps for the modules' blocks and projections, so it checks to the byte the terms that
grow with the batch and those that do not (the Triton fused loss's weight gradient, one per head call), up to the
one scalar each torch loss call keeps at tp 1 (4 bytes). Parallel heads backpropagated one at a time
(per_head_backward) are checked at their peak: the most saved bytes alive at once."""

import weakref

import pytest
import torch

from engine.config import Config, ModelConfig
from engine.model.gpt import GPT, resolve
from engine.model.mtp import MultiTokenGPT, per_head_backward
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import apply_recompute, parallelize_gpt
from engine.scaling.activations import (
    autocast_weight_bytes,
    engine_activation_bytes,
    mtp_terms,
    output_terms,
    rank_activation_bytes,
)
from tests.distributed import run_distributed

S, D, VOCAB = 24, 32, 128


def _cfg(arch, kernels, recompute="none"):
    return ModelConfig(arch=arch, n_layers=1, d_model=D, n_heads=4, n_kv_heads=2 if arch == "llama" else 0,
                       seq_len=S, vocab_size=VOCAB, kernels=kernels, recompute=recompute)  # fmt: skip


def _build(model_cfg, depth, kind, tp=1, sp=False):
    """The GPT (depth 0) or MultiTokenGPT of `model_cfg`, as the trainer builds it at tp 1 or tp (with or without
    sp)."""
    cfg = resolve(model_cfg)
    make = (lambda: GPT(cfg, seed=1)) if depth == 0 else (lambda: MultiTokenGPT(cfg, depth, kind=kind, seed=1))
    if tp == 1:
        model = make()
        apply_recompute(model, model_cfg.recompute)
        return model
    conf = Config(model=model_cfg)
    conf.parallel.tp, conf.parallel.sp = tp, sp
    with torch.device("meta"):
        model = make()
    [wrapped] = parallelize_gpt(model, ParallelDims.from_world(tp=tp), conf, device="cpu")
    return wrapped


def _batch(b):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (b, S), generator=g), torch.randint(0, VOCAB, (b, S), generator=g)


class _Saved:
    """saved_tensors_hooks that count each storage the graph saves once (parameters and the rotary tables, buffers,
    left out): `total` over the
    forward, `peak` the most bytes alive at once (a storage leaves when the last graph holding it is freed)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
        self.all, self.live, self.peak = {}, {}, 0

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        size = t.untyped_storage().nbytes()
        self.all[ptr] = size
        count = self.live.get(ptr, (0, size))[0]
        self.live[ptr] = (count + 1, size)
        holder = _Holder(t)
        weakref.finalize(holder, self._release, ptr)
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return holder

    def _release(self, ptr):
        count, size = self.live[ptr]
        if count == 1:
            del self.live[ptr]
        else:
            self.live[ptr] = (count - 1, size)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h if isinstance(h, torch.Tensor) else h.t)

    @property
    def total(self):
        return sum(self.all.values())


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _saved(model, b):
    tokens, targets = _batch(b)
    saved = _Saved(model)
    with saved.hooks(), _autocast():
        model(tokens, targets, reduction="sum")
    return saved.total


def _measure(arch, kernels, kind, depth, recompute="none", tp=1, sp=False):
    """{b: the depth-D model's saved bytes minus the plain GPT's} for b = 1, 2."""
    model_cfg = _cfg(arch, kernels, recompute)
    return {
        b: _saved(_build(model_cfg, depth, kind, tp, sp), b) - _saved(_build(model_cfg, 0, kind, tp, sp), b)
        for b in (1, 2)
    }


def _expected(arch, kernels, kind, depth, recompute="none", tp=1, sp=False):
    cfg = resolve(_cfg(arch, kernels, recompute))
    copies = autocast_weight_bytes(cfg, 1, tp, recompute, kernels, mtp_depth=depth, mtp_kind=kind)
    copies -= autocast_weight_bytes(cfg, 1, tp, recompute, kernels)
    scalars = 4 * depth if kernels == "torch" and tp == 1 else 0  # each torch loss call keeps an fp32 scalar
    return {b: sum(mtp_terms(cfg, b * S, depth, kind, tp, sp, kernels).values()) + copies + scalars for b in (1, 2)}


def _check(case, measured):
    want = _expected(**case)
    assert measured[2] - measured[1] == want[2] - want[1], (case, "one sample", measured, want)
    assert measured == want, (case, "total", measured, want)


CASES = [
    dict(arch=arch, kernels=kernels, kind=kind, depth=depth)
    for arch, kernels in (("llama", "torch"), ("llama", "triton"), ("gpt2", "torch"), ("gpt2", "triton"))
    for kind in ("sequential", "parallel")
    for depth in (1, 2)
    if arch == "llama" or kind == "sequential" or depth == 1
] + [
    dict(arch="llama", kernels="torch", kind="sequential", depth=2, recompute="full"),
    dict(arch="gpt2", kernels="torch", kind="parallel", depth=1, recompute="selective"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_mtp_tally_equals_saved_tensors(case):
    _check(case, _measure(**case))


TP = [
    dict(arch="llama", kernels="torch", kind="sequential", depth=2, tp=2),
    dict(arch="llama", kernels="torch", kind="parallel", depth=2, tp=2),
    dict(arch="llama", kernels="torch", kind="sequential", depth=2, tp=2, sp=True),
    dict(arch="gpt2", kernels="torch", kind="parallel", depth=2, tp=2, sp=True),
]


def _tp_worker(rank, world):
    return [_measure(**case) for case in TP]


@pytest.mark.distributed
def test_mtp_tally_equals_saved_tensors_under_tp():
    measured = run_distributed(_tp_worker, 2)[0]
    for case, got in zip(TP, measured, strict=True):
        _check(case, got)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_per_head_backward_peak(kernels):
    """Parallel heads backpropagated one at a time keep the trunk's graph and one head's at once: the tally's
    `mtp_per_head` peak (the trunk, one head's block with the trunk's output it keeps, one head call)."""
    cfg = resolve(_cfg("llama", kernels))
    got = {}
    for b in (1, 2):
        model = MultiTokenGPT(cfg, 2, kind="parallel", seed=1)
        tokens, targets = _batch(b)
        saved = _Saved(model)
        with saved.hooks():
            per_head_backward(model, tokens, targets, lambda loss: loss.backward(), _autocast)
        got[b] = saved.peak
    copies = autocast_weight_bytes(cfg, 1, kernels=kernels, mtp_depth=1, mtp_kind="parallel")
    scalar = 4 if kernels == "torch" else 0
    want = {b: engine_activation_bytes(cfg, b, 1, kernels=kernels, mtp_depth=2, mtp_kind="parallel", mtp_per_head=True)
            + copies + scalar for b in (1, 2)}  # fmt: skip
    assert got == want, (got, want)
    at_once = engine_activation_bytes(cfg, 1, 1, kernels=kernels, mtp_depth=2, mtp_kind="parallel")
    assert want[1] - copies - scalar < at_once


def test_rank_bytes_add_the_mtp_modules_on_the_last_stage_only():
    cfg = resolve(_cfg("llama", "triton"))
    plain = rank_activation_bytes(cfg, 2, 1)
    seq = rank_activation_bytes(cfg, 2, 1, mtp_depth=2, mtp_kind="sequential")
    mods = sum(mtp_terms(cfg, 2 * S, 2, "sequential").values())
    copies = autocast_weight_bytes(cfg, 1, mtp_depth=2) - autocast_weight_bytes(cfg, 1)
    assert seq == plain + mods + copies
    assert rank_activation_bytes(cfg, 2, 1, last_stage=False, mtp_depth=2) == rank_activation_bytes(
        cfg, 2, 1, last_stage=False
    )
    # the Triton fused loss keeps one weight gradient per head call: D + 1 of them on the last stage
    dw = 4 * VOCAB * D
    assert output_terms(cfg, 2 * S)["fused loss: weight gradient, fp32"] == dw
    assert mtp_terms(cfg, 2 * S, 2, "parallel")["head: fused loss: weight gradient, fp32"] == 2 * dw


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(depth=-1), "mtp_depth must be"),
        (dict(kind="tree"), "mtp_kind must be"),
    ],
)
def test_bad_mtp_arguments(kw, message):
    cfg = resolve(_cfg("llama", "triton"))
    args = dict(depth=1, kind="sequential", tp=1, sp=False) | kw
    with pytest.raises(ValueError, match=message):
        mtp_terms(cfg, S, **args)
