"""The training step's loss normalisation: the sum of per-token losses over the whole global batch divided by its
loss-bearing tokens, whatever the micro-batching and data-parallel split and however unevenly the tokens fall."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from engine.config import Config, ModelConfig, OptimConfig
from engine.model.gpt import GPT
from engine.optim import build_optimizer
from engine.parallel.dims import ParallelDims
from engine.parallel.parallelize import parallelize_gpt
from engine.training.step import TrainStep
from tests.distributed import run_distributed

CFG = dict(n_layers=1, d_model=32, n_heads=2, vocab_size=40, seq_len=8, kernels="torch")
OPTIM = OptimConfig(lr=1e-2, impl="torch", clip=0.0)


def _batch():
    """4 sequences whose loss-bearing token counts are 8, 2, 5 and 0 (ignored targets are -100)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 40, (4, 8), generator=g)
    y = torch.randint(0, 40, (4, 8), generator=g)
    for row, keep in enumerate((8, 2, 5, 0)):
        y[row, keep:] = -100
    return x, y


def _step(model, wrapped=None, dp_group=None):
    opt = build_optimizer(model, OPTIM)
    return TrainStep(wrapped or model, model, opt, OPTIM.clip, contextlib.nullcontext, dp_group=dp_group), opt


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batches_with_uneven_tokens_equal_the_global_per_token_mean():
    x, y = _batch()
    ref = GPT(ModelConfig(**CFG), seed=1)
    expected = F.cross_entropy(ref(x).reshape(-1, 40), y.reshape(-1), ignore_index=-100)  # the global token mean
    results = []
    for split in (1, 2, 4):
        model = GPT(ModelConfig(**CFG), seed=1)
        step, opt = _step(model)
        n = step.count_tokens([(x, y)])
        assert n.item() == 15
        step.forward_backward([(a, b) for a, b in zip(x.chunk(split), y.chunk(split))], n)
        results.append(_grads(model))
        out_loss = sum(model(a, b, reduction="sum") for a, b in zip(x.chunk(split), y.chunk(split))) / 15
        torch.testing.assert_close(out_loss, expected, rtol=1e-6, atol=0)
    ref_grads = torch.autograd.grad(expected, list(ref.parameters()))
    for grads in results:
        for (name, g), r in zip(grads.items(), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    # The mean of per-micro-batch means (what a per-micro-batch normalisation gives) is a different number here.
    means = [F.cross_entropy(ref(x[i : i + 1]).reshape(-1, 40), y[i].reshape(-1), ignore_index=-100) for i in range(3)]
    assert abs(torch.stack(means).mean().item() - expected.item()) > 1e-3


def _dp_worker(rank, world):
    x, y = _batch()
    conf = Config(model=ModelConfig(**CFG))
    conf.train.seed = 1
    dims = ParallelDims.from_world()
    try:
        with torch.device("meta"):
            model = GPT(conf.model)
        [wrapped] = parallelize_gpt(model, dims, conf, device="cpu")
        step, _ = _step(model, wrapped, dims.group("dp"))
        out = step([(x.chunk(world)[rank], y.chunk(world)[rank])])  # rank 0: 10 tokens, rank 1: 5
        # A model built on a real device (or loaded) keeps its values through parallelize_gpt, and still gets DDP.
        eager = GPT(conf.model, seed=2)
        before = {n: p.detach().clone() for n, p in eager.named_parameters()}
        [wrapped_eager] = parallelize_gpt(eager, dims, conf)
        assert isinstance(wrapped_eager, torch.nn.parallel.DistributedDataParallel)
        assert all(torch.equal(p, before[n]) for n, p in eager.named_parameters())
        return out.loss, out.grad_norm, out.tokens
    finally:
        dims.destroy()


@pytest.mark.distributed
def test_data_parallel_ranks_with_uneven_tokens_sum_their_gradients():
    """2 data-parallel ranks holding 10 and 5 loss-bearing tokens step exactly like one process on all 15."""
    results = run_distributed(_dp_worker, 2, timeout=120)
    model = GPT(ModelConfig(**CFG), seed=1)
    step, _ = _step(model)
    x, y = _batch()
    one = step([(x, y)])
    for loss, norm, tokens in results:
        assert tokens == 15
        assert loss == pytest.approx(one.loss, rel=1e-6)
        assert norm == pytest.approx(one.grad_norm, rel=1e-5)
