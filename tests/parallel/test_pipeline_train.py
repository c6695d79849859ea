"""Pipeline parallelism trains like one process (docs/contracts.md, layout invariance): the schedules' runner over
real gloo processes (GPipe, 1F1B, interleaved, ZB-H1 with its split backward), composed with dp and tp (+sp), tied
embeddings split over the first and last stage."""

import contextlib

import pytest
import torch

from engine.config import Config, ModelConfig, OptimConfig
from engine.model.gpt import GPT
from engine.optim import build_optimizer
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import parallelize_gpt
from engine.training.pipeline_step import PipelineStep
from engine.training.step import TrainStep
from tests.distributed import run_distributed

VOCAB, SEQ, BATCH, STEPS = 50, 8, 8, 6
BASE = dict(n_layers=4, d_model=32, n_heads=4, ffn_hidden=64, vocab_size=VOCAB, seq_len=SEQ, kernels="torch")
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, impl="torch", clip=0.5)


def _batches():
    pool = torch.randint(0, VOCAB, (2, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(40))
    return pool[torch.arange(STEPS) % 2]


def _reference(model_kw):
    model = GPT(ModelConfig(**{**BASE, **model_kw}), seed=41)
    step = TrainStep(model, model, build_optimizer(model, OPTIM), OPTIM.clip, contextlib.nullcontext)
    losses, norms = [], []
    for batch in _batches():
        out = step([(batch[:, :-1], batch[:, 1:])])
        losses.append(out.loss)
        norms.append(out.grad_norm)
    return losses, norms


def _pipeline(model_kw, dims, schedule, micro, v=1, sp=False):
    conf = Config(model=ModelConfig(**{**BASE, **model_kw}))
    conf.train.seed, conf.parallel.sp, conf.parallel.virtual_stages = 41, sp, v
    with torch.device("meta"):
        whole = GPT(conf.model)
    chunks = parallelize_gpt(whole, dims, conf, device="cpu")
    opt = build_optimizer(torch.nn.ModuleList(chunks), OPTIM)
    seq_local = SEQ // dims.tp if sp and dims.tp_enabled else SEQ
    step = PipelineStep(chunks, opt, OPTIM.clip, contextlib.nullcontext, dims, schedule, (micro, seq_local, 32))
    dp, dp_rank = dims.dp, dims.rank_in("dp")
    losses, norms = [], []
    for batch in _batches():
        mine = batch.chunk(dp)[dp_rank]
        out = step([(b[:, :-1], b[:, 1:]) for b in mine.split(micro)])
        losses.append(out.loss)
        norms.append(out.grad_norm)
    return losses, norms


def _close(got, ref, what, rtol):
    for a, b in zip(got, ref):
        assert abs(a - b) <= rtol * abs(b), f"{what}: {got} vs {ref}"


def _worker(rank, world):
    refs = {"llama": _reference({}), "gpt2": _reference(dict(arch="gpt2", tie_embeddings=True)),
            "llama8": _reference(dict(n_layers=8))}  # fmt: skip
    runs = []

    def check(name, model_kw, dims, schedule, micro, v=1, sp=False):
        losses, norms = _pipeline(model_kw, dims, schedule, micro, v, sp)
        label = f"{name} {schedule} pp={dims.pp} tp={dims.tp} dp={dims.dp} micro={micro} v={v} sp={sp}"
        _close(losses, refs[name][0], f"{label} losses", 1e-5)
        _close(norms, refs[name][1], f"{label} grad norms", 1e-4)
        runs.append(label)

    dims = ParallelDims.from_world(pp=2)  # pp 2 x dp 2
    try:
        for schedule in ("gpipe", "1f1b"):
            for micro in (4, 1):  # 1 and 4 micro-batches per dp rank
                check("llama", {}, dims, schedule, micro)
        check("llama", {}, dims, "interleaved", 1, v=2)  # 4 micro-batches, 4 stages over 4 layers
        check("gpt2", dict(arch="gpt2", tie_embeddings=True), dims, "1f1b", 2)  # tied, split over stages 0 and 1
        check("gpt2", dict(arch="gpt2", tie_embeddings=True), dims, "zb", 1)  # split backward, biases, 4 micro
    finally:
        dims.destroy()
    dims = ParallelDims.from_world(pp=4)
    try:
        check("llama", {}, dims, "1f1b", 1)  # 8 micro-batches
        check("llama8", dict(n_layers=8), dims, "interleaved", 2, v=2)  # 4 micro-batches, 8 stages
        check("gpt2", dict(arch="gpt2", tie_embeddings=True), dims, "gpipe", 2)
        check("llama", {}, dims, "zb", 1)  # 8 micro-batches, W deferred by up to 3 iterations
    finally:
        dims.destroy()
    dims = ParallelDims.from_world(pp=2, tp=2)
    try:
        for sp in (False, True):
            check("llama", {}, dims, "1f1b", 2, sp=sp)
        check("llama", {}, dims, "zb", 2, sp=True)  # column/row-parallel linears defer their weight gradients
    finally:
        dims.destroy()
    return runs


@pytest.mark.distributed
def test_pipeline_layouts_train_like_one_process():
    results = run_distributed(_worker, 4, timeout=300)
    assert all(len(r) == 14 for r in results)


def _order_worker(rank, world):
    """Every message tagged 0, so gloo pairs messages by their order between two ranks alone, as NCCL does."""
    from engine.parallel.pipeline.runner import PipelineRunner

    PipelineRunner._tag = lambda self, direction, stage, micro: 0
    ref, ref8 = _reference({}), _reference(dict(n_layers=8))
    dims = ParallelDims.from_world(pp=2)
    runs = []
    try:
        for schedule, micro, v, model_kw, want in (
            ("interleaved", 1, 2, {}, ref),  # 8 micro-batches: F-B exchanges, the wrap-around from stage 1 to 2
            ("interleaved", 4, 4, dict(n_layers=8), ref8),  # 2 micro-batches (= pp): per-compute exchanges
            ("zb", 1, 1, {}, ref),
            ("gpipe", 2, 1, {}, ref),
        ):
            losses, norms = _pipeline(model_kw, dims, schedule, micro, v)
            _close(losses, want[0], f"{schedule} v={v} micro={micro} losses, messages matched by order", 1e-5)
            _close(norms, want[1], f"{schedule} v={v} micro={micro} grad norms, messages matched by order", 1e-4)
            runs.append(schedule)
    finally:
        dims.destroy()
    return runs


@pytest.mark.distributed
def test_messages_pair_by_order_alone():
    assert all(len(r) == 4 for r in run_distributed(_order_worker, 2, timeout=300))
