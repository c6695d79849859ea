"""apply_kernels on CUDA in bf16 (the dtype models train in): our Triton kernels against the unpatched model."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.hf import HFRMSNorm, apply_kernels  # noqa: E402

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=32003)  # fmt: skip


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


@pytest.mark.gpu
def test_bf16_llama_on_cuda_is_as_close_to_fp32_as_transformers():
    """bf16 rounds differently on each path, so both bf16 models are measured against the fp32 model: ours must be
    about as close to it as transformers' own bf16 run (a wrong kernel is off by O(1))."""
    torch.manual_seed(0)
    exact = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to("cuda")
    ref = copy.deepcopy(exact).to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    assert apply_kernels(ours, backend="triton") == {"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 257), device="cuda")
    labels = ids.clone()
    labels[:, :10] = -100
    losses = {}
    for name, model in (("exact", exact), ("ref", ref), ("ours", ours)):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        losses[name] = out.loss.item()
    assert abs(losses["ours"] - losses["exact"]) < 2e-2 * losses["exact"], losses
    exact_params, ref_params = dict(exact.named_parameters()), dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        ours_err, ref_err = _rel(p.grad, exact_params[name].grad), _rel(ref_params[name].grad, exact_params[name].grad)
        assert ours_err < 3 * ref_err + 1e-2, (name, ours_err, ref_err)
    with torch.no_grad():
        want = exact(input_ids=ids).logits
        ours_err, ref_err = _rel(ours(input_ids=ids).logits, want), _rel(ref(input_ids=ids).logits, want)
    assert ours_err < 3 * ref_err + 1e-2, (ours_err, ref_err)


@pytest.mark.gpu
def test_bf16_rms_norm_on_cuda_rounds_as_transformers():
    """The Triton path in bf16 on CUDA (round to nearest): transformers' outputs but for rare 1-ulp flips where the
    kernel's fp32 rsqrt and torch's differ in the last bit just at a rounding boundary."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    theirs = LlamaRMSNorm(1024).to("cuda", torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(1024) * 3)
    x = torch.randn(64, 1024, device="cuda").to(torch.bfloat16)
    got, want = HFRMSNorm(theirs, backend="triton")(x), theirs(x)
    assert (got != want).float().mean().item() < 1e-2
    assert _rel(got, want) < 4e-3
