"""One autocast copy for the projections that read the same activation (engine/model/shared_cast.py): the same bits
as a cast per projection, forward and backward, with one copy saved instead of several."""

import pytest
import torch

from engine.config import ModelConfig
from engine.model import attention, mlp
from engine.model.gpt import GPT, resolve
from engine.model.shared_cast import shared_autocast_inputs


def _loss_and_grads(arch):
    cfg = resolve(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if arch == "llama" else 0,
                              seq_len=12, vocab_size=64, kernels="torch"))  # fmt: skip
    model = GPT(cfg, seed=3)
    tokens, targets = torch.randint(0, 64, (2, 2, 12), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _per_projection(x, n):
    return [x] * n  # each nn.Linear casts x itself, as before the shared cast


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_same_bits_as_a_cast_per_projection(arch, monkeypatch):
    loss, grads = _loss_and_grads(arch)
    monkeypatch.setattr(attention, "shared_autocast_inputs", _per_projection)
    monkeypatch.setattr(mlp, "shared_autocast_inputs", _per_projection)
    ref_loss, ref_grads = _loss_and_grads(arch)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def test_one_copy_and_fp32_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    assert all(t is x for t in shared_autocast_inputs(x, 3))  # no autocast: x itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = shared_autocast_inputs(x, 2)
        assert a.dtype == b.dtype == torch.bfloat16
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one copy
        (a.float() * 3 + b.float() * 5).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.full_like(x, 8.0))
