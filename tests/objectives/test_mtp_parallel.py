"""Parallel MTP heads' memory-saving backward (Gloeckle et al. 2024, sec. 2): the same loss and gradients as the
all-at-once backward, one head's logits alive at a time, and the trainer's step taking that path."""

import contextlib
import weakref

import pytest
import torch

from engine.config import ModelConfig
from engine.model.mtp import MultiTokenGPT, per_head_backward
from engine.training.step import TrainStep

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_size=64)
N = 17.0  # a stand-in for the global batch's token count: the backward divides each term by it


def _batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    y[1, 5] = -100
    return x, y


def _backward(loss):
    (loss / N).backward()


@pytest.mark.parametrize("tie", [True, False])
def test_per_head_backward_gives_the_all_at_once_loss_and_gradients(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    x, y = _batch()
    plain, split = (MultiTokenGPT(cfg, depth=3, weight=0.5, kind="parallel", seed=2) for _ in range(2))
    loss = plain(x, y, reduction="sum")
    _backward(loss)
    got = per_head_backward(split, x, y, _backward, contextlib.nullcontext)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), split.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _max_logits_alive(run) -> int:
    """The most logits-sized tensors (b * s * vocab elements) that autograd held at once while `run` ran."""
    alive, peak = [0], [0]

    def pack(t):
        box = _Saved(t)
        if t.numel() == 2 * 16 * 64:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(box, lambda: alive.__setitem__(0, alive[0] - 1))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        run()
    return peak[0]


def test_only_one_heads_logits_are_alive_at_a_time():
    x, y = _batch()
    model = MultiTokenGPT(CFG, depth=3, kind="parallel", seed=2)
    one_head = _max_logits_alive(lambda: _backward(model.output(model.hidden_states(x), y, "sum")))
    at_once = _max_logits_alive(lambda: _backward(model(x, y, reduction="sum")))
    per_head = _max_logits_alive(lambda: per_head_backward(model, x, y, _backward, contextlib.nullcontext))
    assert one_head >= 1 and at_once == 4 * one_head and per_head == one_head


def test_the_train_step_backpropagates_head_by_head_with_the_same_update():
    x, y = _batch()
    results = []
    for per_head in (True, False):
        model = MultiTokenGPT(CFG, depth=2, kind="parallel", seed=2)
        step = TrainStep(model, model, torch.optim.SGD(model.parameters(), lr=0.1), 1e9, contextlib.nullcontext)
        assert step.per_head  # one process, no DDP: the memory-saving path
        step.per_head = per_head
        results.append((step([(x, y)]), [p.detach().clone() for p in model.parameters()]))
    (a, pa), (b, pb) = results
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(pa, pb, strict=True))
    sequential = MultiTokenGPT(CFG, depth=2, seed=2)
    assert not TrainStep(sequential, sequential, torch.optim.SGD(sequential.parameters(), lr=0.1), 1.0,
                         contextlib.nullcontext).per_head  # fmt: skip
