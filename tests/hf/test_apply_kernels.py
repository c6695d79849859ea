"""engine.hf.apply_kernels on tiny random-weight transformers models (no download), fp32 on CPU.

The kernels are forced to backend="triton" and run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 on machines without CUDA); a spy counts the launches of each kernel's autograd Function, so the
parity below is that of our Triton kernels, not of their torch fallbacks.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.hf import HFRMSNorm, SwiGLUMLP, UnsupportedModelError, apply_kernels  # noqa: E402
from kernels import glu, linear_cross_entropy, norms, rope  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=101, initializer_range=0.2)  # fmt: skip
SEQ = 17
FUNCTIONS = {"rms_norm": (norms, "_NormFunction"), "rope": (rope, "_RopeFunction"), "swiglu": (glu, "_GLUFunction"),
             "loss": (linear_cross_entropy, "FusedLinearCrossEntropyFunction")}  # fmt: skip


@pytest.fixture
def launches(monkeypatch):
    """Counts the calls of each of our kernels' autograd Functions (the Triton paths) by name."""
    counts = dict.fromkeys(FUNCTIONS, 0)
    for name, (module, attr) in FUNCTIONS.items():
        fn = getattr(module, attr)
        original = fn.apply

        def counted(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(fn, "apply", counted)
    return counts


def _models(arch: str, **overrides):
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SMALL, **overrides)).float()
    return model, copy.deepcopy(model)


def _batch(batch=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (batch, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored tokens
    return ids, labels


def _close(got, want, what):
    got, want = got.detach(), want.detach()
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def _check_parity(ours, ref, launches, **inputs):
    """Loss and every parameter gradient with labels, logits without, equal to the unpatched model's."""
    out, want = ours(**inputs), ref(**inputs)
    assert out.logits is None  # the fused loss never built them
    _close(out.loss, want.loss, "loss")
    out.loss.backward()
    want.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, grads[name].grad, f"grad of {name}")
    inputs.pop("labels")
    with torch.no_grad():
        _close(ours(**inputs).logits, ref(**inputs).logits, "logits")
    assert all(launches.values()), launches  # every kernel ran its Triton path


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_parity_with_unpatched_model(arch, launches):
    ours, ref = _models(arch)
    done = apply_kernels(ours, backend="triton")
    assert done == {"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}
    layer = ours.model.layers[0]
    assert isinstance(layer.input_layernorm, HFRMSNorm) and isinstance(ours.model.norm, HFRMSNorm)
    assert isinstance(layer.mlp, SwiGLUMLP) and layer.mlp.gate_proj is not None
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ids, labels = _batch()
    _check_parity(ours, ref, launches, input_ids=ids, labels=labels)
    # Two forwards of ours, none of the unpatched copy (its attention keeps transformers' rotary function).
    assert launches == {"rms_norm": 10, "rope": 8, "swiglu": 4, "loss": 1}
    assert apply_kernels(ours, backend="triton") == dict.fromkeys(done, 0)  # a second call finds nothing left


def test_qwen2_per_row_positions_and_num_items_in_batch(launches):
    """Qwen2 (q/k/v biases); position_ids that differ per row (cos/sin gathered per batch row); transformers'
    gradient-accumulation normaliser num_items_in_batch (sum / count instead of the mean)."""
    ours, ref = _models("qwen2")
    apply_kernels(ours, backend="triton")
    ids, labels = _batch()
    positions = torch.stack([torch.arange(SEQ), torch.arange(SEQ) + 5])
    _check_parity(ours, ref, launches, input_ids=ids, labels=labels, position_ids=positions, num_items_in_batch=40)


def test_bf16_norm_rounds_before_the_weight_as_transformers_does():
    """bf16: the normalised x is rounded to bf16 before the weight multiply (Llama's order), not after, so the
    outputs are transformers' bit for bit. On the torch backend: the Triton interpreter rounds fp32 -> bf16 toward
    zero (CUDA rounds to nearest), so bit parity of the triton path is checked on CUDA (test_hf_kernels_gpu.py)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    theirs = LlamaRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(64) * 3)
    ours = HFRMSNorm(theirs, backend="torch")
    x = torch.randn(3, SEQ, 64).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))
    assert not torch.equal(norms.rms_norm(x, theirs.weight, backend="torch"), theirs(x))  # the other order differs


def test_refusals():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported model class .*GPT2LMHeadModel") as err:
        apply_kernels(gpt2)
    assert "\n" not in str(err.value)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1},
                                                                   hidden_act="gelu"))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        apply_kernels(llama)
    assert apply_kernels(llama, swiglu=False)["swiglu"] == 0
