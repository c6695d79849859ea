"""The split backward of zero-bubble schedules: inside `deferring`, a linear's backward gives the input (and bias)
gradient at once and queues the weight gradient for the W pass, which then equals the ordinary one."""

import torch

from engine.config import ModelConfig
from engine.model.gpt import GPT
from engine.parallel.pipeline.deferred import DeferredLinear, WeightGradStore
from engine.parallel.pipeline.runner import _defer_weight_grads


def test_weight_gradient_waits_for_the_w_pass_and_then_equals_the_plain_one():
    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)
    lin = torch.nn.Linear(5, 3)
    lin.load_state_dict(ref.state_dict())
    lin.__class__ = DeferredLinear
    lin.weight_grad_store = store = WeightGradStore()
    x = torch.randn(2, 4, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):  # two micro-batches accumulate
        with store.deferring((0, 7)):
            lin(x).pow(2).sum().backward()
        assert lin.bias.grad is not None and x.grad is not None
        ref(x_ref).pow(2).sum().backward()
    assert lin.weight.grad is None  # deferred: B computed only the input and bias gradients
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert store.run((0, 7)) == 2 and store.run((0, 7)) == 0
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)
    lin(x).sum().backward()  # outside `deferring`: an ordinary backward
    assert store.queues == {}


def test_chunk_linears_defer_but_the_output_head_does_not():
    model = GPT(ModelConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=32, seq_len=8, kernels="torch",
                            tie_embeddings=False), seed=1)  # fmt: skip
    _defer_weight_grads(model, WeightGradStore())
    block = model.layers["0"]
    assert type(block.attn.q_proj) is DeferredLinear and type(block.mlp.down_proj) is DeferredLinear
    assert type(model.output.proj) is torch.nn.Linear
    assert [n for n, _ in model.named_parameters()][:3] == ["tok_emb.weight", "layers.0.attn_norm.weight",
                                                            "layers.0.attn.q_proj.weight"]  # fmt: skip
