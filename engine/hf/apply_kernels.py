"""`apply_kernels(model)`: our kernels in a Hugging Face transformers Llama/Mistral/Qwen2 model, swapped in place.

The approach of Liger-Kernel's `_apply_liger_kernel_to_instance` (patch one model instance, not the classes), written
for our kernels (docs/hf_kernels.md):
- RMSNorm: every `<Arch>RMSNorm` module becomes an `HFRMSNorm` holding the same weight (modules.py);
- RoPE: every `<Arch>Attention` module calls our kernel instead of `apply_rotary_pos_emb` (rope.py);
- SwiGLU: every `<Arch>MLP` becomes a `SwiGLUMLP` holding the same projections (modules.py), when the config's
  activation is SiLU;
- loss: a `<Arch>ForCausalLM`'s forward computes the loss with our fused linear cross-entropy when given labels,
  without materialising the logits (loss.py); a base `<Arch>Model` has no head and keeps its forward.
Any other model class is refused with a one-line `UnsupportedModelError` naming it. transformers is imported only when
a model is patched.
"""

from __future__ import annotations

import importlib
import types

from torch import nn

from engine.hf.loss import fused_loss_forward
from engine.hf.modules import SILU_ACTS, HFRMSNorm, SwiGLUMLP
from engine.hf.rope import install_rope_dispatch, patch_attention
from kernels.utils import check_backend

# transformers model_type -> (modeling module, class-name prefix).
ARCHITECTURES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}
LOSS_MARK = "_engine_hf_fused_loss"


class UnsupportedModelError(ValueError):
    """A model (or a part of one) that apply_kernels cannot patch; the message is one line."""


def supported_classes() -> list[str]:
    """The model class names apply_kernels accepts (named in its refusal)."""
    return [f"{prefix}{suffix}" for _, prefix in ARCHITECTURES.values() for suffix in ("ForCausalLM", "Model")]


def _architecture(model: nn.Module) -> tuple[types.ModuleType, str]:
    """(the model's modeling module, its class-name prefix), or UnsupportedModelError naming the class."""
    cls = type(model)
    for module_name, prefix in ARCHITECTURES.values():
        if cls.__module__ == module_name and cls.__name__ in (f"{prefix}ForCausalLM", f"{prefix}Model"):
            return importlib.import_module(module_name), prefix
    raise UnsupportedModelError(
        f"apply_kernels: unsupported model class {cls.__module__}.{cls.__qualname__}; "
        f"supported: {', '.join(supported_classes())}"
    )


def _replace_modules(model: nn.Module, cls: type, make) -> int:
    """Replaces every submodule of exactly type `cls` by `make(old)`; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is cls]
    for name, old in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(old))
    return len(targets)


def apply_kernels(
    model: nn.Module,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    loss: bool = True,
    backend: str = "auto",
) -> dict[str, int]:
    """Swaps, in place, `model`'s RMSNorms, rotary application, SwiGLU MLPs and loss (a `*ForCausalLM`'s) for ours.

    `model`: a transformers LlamaForCausalLM / LlamaModel, or the Mistral or Qwen2 equivalent (anything else raises
    UnsupportedModelError). `backend` ("auto" | "triton" | "torch") is that of our kernels (kernels/utils.py): "auto"
    runs Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1), plain torch elsewhere. Parameters stay the same
    objects, so the state dict and an existing optimizer are unaffected. Calling it again swaps only what is left.
    Returns how many modules each swap touched, e.g. {"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}.
    """
    check_backend("engine.hf.apply_kernels", backend)
    modeling, prefix = _architecture(model)
    config = model.config
    if swiglu and getattr(config, "hidden_act", None) not in SILU_ACTS:
        raise UnsupportedModelError(
            f"apply_kernels: {type(model).__name__} has hidden_act={config.hidden_act!r}, not SwiGLU's silu; "
            "pass swiglu=False"
        )
    done = {"rms_norm": 0, "rope": 0, "swiglu": 0, "loss": 0}
    if rms_norm:
        done["rms_norm"] = _replace_modules(model, getattr(modeling, f"{prefix}RMSNorm"),
                                            lambda old: HFRMSNorm(old, backend))  # fmt: skip
    if swiglu:
        done["swiglu"] = _replace_modules(model, getattr(modeling, f"{prefix}MLP"), lambda old: SwiGLUMLP(old, backend))
    if rope:
        install_rope_dispatch(modeling)
        attention_cls = getattr(modeling, f"{prefix}Attention")
        done["rope"] = sum(patch_attention(m, backend) for m in model.modules() if isinstance(m, attention_cls))
    if loss and type(model).__name__.endswith("ForCausalLM") and not hasattr(model, LOSS_MARK):
        if model.lm_head.bias is not None:
            raise UnsupportedModelError(f"apply_kernels: {type(model).__name__}'s lm_head has a bias; pass loss=False")
        model.forward = types.MethodType(fused_loss_forward(type(model).forward, backend), model)
        setattr(model, LOSS_MARK, backend)
        done["loss"] = 1
    return done
