"""Selective recomputation's MLP activation output (engine/parallel/activation_recompute.py): the down projection saves
the activation's inputs instead of its output, and the gradients are bit for bit those of keeping it.

Two copies of one model, the attention core checkpointed in both (selective recomputation as it was), one with the
activation's output recomputed: same loss and gradients exactly, for llama (SwiGLU, torch and Triton kernels) and gpt2
(GELU), in fp32 and under bf16 autocast, and through a graph backpropagated twice. Saved bytes: the rebuilt output is
not kept (the activation tally checks the whole layer to the byte, tests/scaling/test_activation_tally.py)."""

import contextlib
import os

import pytest
import torch
from torch.distributed._composable import checkpoint

from engine.config import ModelConfig
from engine.model.gpt import GPT, resolve
from engine.parallel.activation_recompute import recompute_output
from engine.parallel.parallelize import apply_recompute

VOCAB, SEQ = 40, 8


def _model(arch, kernels, recompute_act):
    cfg = resolve(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, vocab_size=VOCAB,
                              seq_len=SEQ, kernels=kernels))  # fmt: skip
    model = GPT(cfg, seed=7)
    if recompute_act:
        apply_recompute(model, "selective")
    else:
        for block in model.layers.values():
            checkpoint(block.attn.core)
    return model


def _run(model, autocast, twice=False):
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward(retain_graph=twice)
    if twice:
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved.values())


CASES = [("llama", "torch", False), ("llama", "torch", True), ("gpt2", "torch", False), ("gpt2", "torch", True)]
if os.environ.get("TRITON_INTERPRET") == "1":
    CASES.append(("llama", "triton", False))


@pytest.mark.parametrize("arch, kernels, autocast", CASES)
def test_recomputed_activation_gives_the_same_gradients(arch, kernels, autocast):
    loss_a, grads_a, bytes_a = _run(_model(arch, kernels, True), autocast)
    loss_b, grads_b, bytes_b = _run(_model(arch, kernels, False), autocast)
    assert torch.equal(loss_a, loss_b)
    bad = [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])]
    assert not bad, bad
    # one (b, s, ffn_hidden) tensor a layer less: the activation's output, in the dtype the MLP computes in
    itemsize = 2 if autocast else 4
    assert bytes_b - bytes_a == 2 * (2 * SEQ * 64 * itemsize), (bytes_a, bytes_b)


def test_a_retained_graph_rebuilds_the_output_again():
    """(Without the core's checkpoint, which torch's composable checkpoint cannot replay twice.)"""

    def build():
        model = GPT(resolve(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, seq_len=SEQ)), seed=7)
        for block in model.layers.values():
            recompute_output(block.mlp.act, block.mlp.down_proj)
        return model

    _, once, _ = _run(build(), True)
    _, twice, _ = _run(build(), True, twice=True)
    assert all(torch.equal(twice[n], 2 * once[n]) for n in once)


def test_no_grad_and_a_consumer_without_its_producer_save_nothing_odd():
    model = _model("llama", "torch", True)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        model(tokens)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    # the down projection called on its own (no activation call before it): a plain linear
    mlp = model.layers["0"].mlp
    x = torch.randn(2, SEQ, 64, requires_grad=True)
    mlp.down_proj(x).sum().backward()
    assert x.grad is not None and torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_recompute_output_rebuilds_with_the_producers_forward():
    """The unit on its own: a producer's output, saved by a consumer, comes back equal in backward."""
    producer, consumer = torch.nn.GELU(approximate="tanh"), torch.nn.Linear(6, 3)
    recompute_output(producer, consumer)
    a = torch.randn(4, 6, requires_grad=True)
    consumer(producer(a)).square().sum().backward()
    want_w, want_a = consumer.weight.grad.clone(), a.grad.clone()
    consumer.weight.grad, a.grad = None, None
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(consumer.state_dict())
    plain(torch.nn.functional.gelu(a, approximate="tanh")).square().sum().backward()
    assert torch.equal(plain.weight.grad, want_w) and torch.equal(a.grad, want_a)


def test_the_rebuild_runs_under_the_forward_autocast_state():
    """A producer whose output autocast decides (a linear: bf16 under autocast) is rebuilt the same way."""
    torch.manual_seed(0)
    producer, consumer = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
    ref_p, ref_c = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
    ref_p.load_state_dict(producer.state_dict())
    ref_c.load_state_dict(consumer.state_dict())
    recompute_output(producer, consumer)
    a = torch.randn(4, 6)
    for p, c in ((producer, consumer), (ref_p, ref_c)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = c(p(a))
        y.float().square().sum().backward()
    assert torch.equal(consumer.weight.grad, ref_c.weight.grad) and torch.equal(producer.weight.grad, ref_p.weight.grad)


def test_an_output_changed_in_place_or_never_consumed_is_left_alone():
    """Changed in place between the producer and the consumer: saved as it is (no stale rebuild). A producer call no
    consumer follows keeps nothing alive."""
    import weakref

    producer, consumer = torch.nn.GELU(approximate="tanh"), torch.nn.Linear(6, 3)
    recompute_output(producer, consumer)
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(consumer.state_dict())
    a = torch.randn(4, 6)
    consumer(producer(a).mul_(2.0)).square().sum().backward()
    plain(torch.nn.functional.gelu(a, approximate="tanh").mul_(2.0)).square().sum().backward()
    assert torch.equal(consumer.weight.grad, plain.weight.grad)

    x = torch.randn(4, 6, requires_grad=True)
    out = producer(x)
    ref = weakref.ref(out)
    del out
    assert ref() is None
