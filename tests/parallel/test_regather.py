"""Sequence parallelism's projection inputs saved as shards and gathered again in backward (engine/parallel/regather.py)
give bit for bit the losses and gradients of saving the gathered tensor.

One 2-rank gloo world builds the real GPT at tp 2 + sp twice, once as parallelize_gpt does (regathering) and once
with the plain all-gather hook in its place, and compares loss and every gradient exactly: llama (GQA, SwiGLU) and
gpt2 (biases, the GELU MLP), fp32 and bf16 autocast, no and selective recomputation, a t5 (its cross-attention
regathers the decoder's and the encoder's shards; fully recomputed, it gathers no more than before), a block under
torch's checkpoint (the saved-tensor hooks nest in checkpoint's) and a graph backpropagated twice (retain_graph:
gathered again after the cache let go). It also checks that every backward gather starts from the prefetch hook,
right after the row-parallel projection's own all-gather (ahead of the projections that need it, behind the
collective before it), also in a retained graph's second backward, and that the hooks are gone after a forward, a
no-grad forward and a forward that raised. The memory saved is checked to the byte by
tests/scaling/test_activation_tally.py."""

import contextlib
import traceback

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import engine.parallel.parallelize as parallelize_module
import engine.parallel.regather as regather_module
import engine.parallel.sequence as sequence_module
from engine.config import Config, ModelConfig
from engine.model.gpt import GPT, Block, resolve
from engine.model.mtp import build_gpt
from engine.model.ops import rope_cos_sin
from engine.parallel.comm_count import count_collectives
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import apply_tensor_parallel, block_plan, parallelize_gpt
from engine.parallel.sequence import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from tests.distributed import run_distributed

VOCAB, SEQ = 40, 8
BASE = dict(n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, vocab_size=VOCAB, seq_len=SEQ, kernels="torch")


@contextlib.contextmanager
def _plain_gather():
    """parallelize_gpt with the all-gather hook that keeps the gathered tensor (what it did before regathering)."""

    def install(module, group, n_inputs=1, seq_dim=1):
        def hook(module, args):
            gathered = [gather_from_sequence_parallel_region(a, group, seq_dim) for a in args[:n_inputs]]
            return (*gathered, *args[n_inputs:])

        module.register_forward_pre_hook(hook)

    saved = parallelize_module.regather_region_inputs
    parallelize_module.regather_region_inputs = install
    try:
        yield
    finally:
        parallelize_module.regather_region_inputs = saved


def _model(model_cfg, dims, objective="clm"):
    conf = Config(model=model_cfg)
    conf.parallel.tp, conf.parallel.sp, conf.train.objective = 2, True, objective
    with torch.device("meta"):
        model = build_gpt(resolve(model_cfg), conf) if model_cfg.arch == "t5" else GPT(resolve(model_cfg))
    [wrapped] = parallelize_gpt(model, dims, conf, device="cpu")
    return wrapped


def _grads(model, run, autocast):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = run(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    bad = [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])]
    return bool(torch.equal(loss_a, loss_b)) and grads_a.keys() == grads_b.keys() and not bad, bad


def _gpt_run(model):
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    return model(tokens[:, :-1], tokens[:, 1:])


def _t5_run(model):
    g = torch.Generator().manual_seed(3)
    enc = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    dec = torch.randint(0, VOCAB, (2, SEQ // 2 + 1), generator=g)  # a decoder shorter than the encoder
    return model(enc, dec[:, 1:], decoder_inputs=dec[:, :-1])


CASES = {
    "llama fp32": (dict(BASE, arch="llama", n_kv_heads=2), False),
    "llama bf16": (dict(BASE, arch="llama", n_kv_heads=2), True),
    "llama bf16 selective": (dict(BASE, arch="llama", n_kv_heads=2, recompute="selective"), True),
    "gpt2 fp32": (dict(BASE, arch="gpt2"), False),
    "gpt2 bf16": (dict(BASE, arch="gpt2"), True),
    "t5 bf16": (dict(BASE, arch="t5"), True),
}


def _block_grads(dims, checkpointed, plain):
    """A lone llama block at tp 2 + sp, optionally under torch's (non-reentrant) checkpoint."""
    cfg = resolve(ModelConfig(**dict(BASE, arch="llama", n_layers=1)))
    block = Block(cfg)
    torch.manual_seed(5)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    group = dims.group("tp")
    with _plain_gather() if plain else contextlib.nullcontext():
        apply_tensor_parallel(block, group, True, model_cfg=cfg, plan=block_plan())
    cos, sin = rope_cos_sin(SEQ, cfg.d_model // cfg.n_heads, cfg.rope_theta)
    x = torch.randn(2, SEQ, cfg.d_model, generator=torch.Generator().manual_seed(6), requires_grad=True)
    shard = scatter_to_sequence_parallel_region(x, group)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = checkpoint(block, shard, cos, sin, use_reentrant=False) if checkpointed else block(shard, cos, sin)
    loss = y.float().square().sum()
    loss.backward()
    return loss.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in block.named_parameters()}}


def _worker(rank, world):
    dims = ParallelDims.from_world(tp=2)
    out = {}
    try:
        for name, (cfg, autocast) in CASES.items():
            run = _t5_run if cfg["arch"] == "t5" else _gpt_run
            model_cfg = ModelConfig(**cfg)
            regathered = _grads(_model(model_cfg, dims, "span" if cfg["arch"] == "t5" else "clm"), run, autocast)
            with _plain_gather():
                plain = _grads(_model(model_cfg, dims, "span" if cfg["arch"] == "t5" else "clm"), run, autocast)
            out[name] = _same(regathered, plain)

        # fully recomputed blocks (t5's encoder and decoder ones too) keep only their input: nothing to regather
        counts = []
        for plain in (False, True):
            with _plain_gather() if plain else contextlib.nullcontext():
                model = _model(ModelConfig(**dict(BASE, arch="t5", recompute="full")), dims, "span")
            loss = _t5_run(model)
            with count_collectives() as counter:
                loss.backward()
            counts.append(counter.by_op())
        out["full recompute"] = (counts[0] == counts[1], counts)

        out["checkpointed block"] = _same(_block_grads(dims, True, False), _block_grads(dims, False, True))

        # retain_graph: the second backward gathers again (the first let go of the cached tensor) and doubles the grads
        model = _model(ModelConfig(**CASES["llama bf16"][0]), dims)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _gpt_run(model)
        loss.backward(retain_graph=True)
        once = {n: p.grad.clone() for n, p in model.named_parameters()}
        loss.backward()
        out["twice"] = (all(torch.equal(p.grad, 2 * once[n]) for n, p in model.named_parameters()), [])

        # every backward gather of the regions starts from the prefetch hook, each right after the region's
        # row-parallel all-gather (the collective before it on the tp group), so it cannot hold that one up; and a
        # retained graph's second backward prefetches (and gathers once per region) again
        log = []
        real_async, real_sync = regather_module.all_gather_async, sequence_module.all_gather

        def spy_async(x, dim, group):
            log.append("prefetch" if any(f.name == "prefetch_on_backward" for f in traceback.extract_stack())
                       else "unpack")  # fmt: skip
            return real_async(x, dim, group)

        def spy_sync(x, dim, group):
            log.append("gather")
            return real_sync(x, dim, group)

        regather_module.all_gather_async, sequence_module.all_gather = spy_async, spy_sync
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _gpt_run(model)
            log.clear()  # the forward's gathers
            loss.backward(retain_graph=True)
            first, log[:] = list(log), []
            loss.backward()
        finally:
            regather_module.all_gather_async, sequence_module.all_gather = real_async, real_sync
        ok = True
        for run in (first, log):
            prefetches = [i for i, op in enumerate(run) if op == "prefetch"]
            ok &= len(prefetches) == 2 * 2 and "unpack" not in run  # 2 layers x (attention, MLP), all prefetched
            ok &= all(i > 0 and run[i - 1] == "gather" for i in prefetches)
        out["prefetched"] = (ok, [first, log])

        # no hooks left behind: after a forward, a no-grad forward, and a forward that raised
        top = torch._C._autograd._top_saved_tensors_default_hooks
        _gpt_run(model)
        clean = top(False) is None
        with torch.no_grad():
            _gpt_run(model)
        clean &= top(False) is None
        attn = model.layers["0"].attn
        handle = attn.q_proj.register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            _gpt_run(model)
        handle.remove()
        clean &= top(False) is None
        out["hooks removed"] = (clean, [])
    finally:
        dims.destroy()
    return out


@pytest.mark.distributed
def test_regathered_inputs_give_the_same_gradients():
    results = run_distributed(_worker, 2, timeout=300)
    for out in results:
        for name, (ok, detail) in out.items():
            assert ok, (name, detail)
