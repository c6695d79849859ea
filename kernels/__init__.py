"""Triton kernels, each with its autograd Function and a plain-PyTorch reference.

Names load on first use, so `import kernels` imports neither triton nor touches a GPU. No module is named like a
public function: importing a submodule sets it as a package attribute, which would shadow the function.

Every op and module takes `backend` = "auto" (default) | "triton" | "torch": "auto" runs the Triton kernel on CUDA
tensors (and on CPU under TRITON_INTERPRET=1) and the plain-torch reference elsewhere, decided at each call, so a model
built from these drop-ins runs unchanged on a CPU-only machine (kernels/utils.py, "Backends").
"""

import importlib

_EXPORTS = {
    "rms_norm": "kernels.norms",
    "layer_norm": "kernels.norms",
    "RMSNorm": "kernels.norms",
    "LayerNorm": "kernels.norms",
    "rms_norm_reference": "kernels.norms",
    "layer_norm_reference": "kernels.norms",
    "apply_rope": "kernels.rope",
    "apply_rope_": "kernels.rope",
    "apply_rope_qk_": "kernels.rope",
    "apply_rope_reference": "kernels.rope",
    "rope_cos_sin": "kernels.rope",
    "RotaryEmbedding": "kernels.rope",
    "swiglu_reference": "kernels.glu",
    "geglu_reference": "kernels.glu",
    "swiglu": "kernels.glu",
    "geglu": "kernels.glu",
    "SwiGLU": "kernels.glu",
    "GeGLU": "kernels.glu",
    "cross_entropy": "kernels.cross_entropy_loss",
    "CrossEntropyLoss": "kernels.cross_entropy_loss",
    "cross_entropy_reference": "kernels.cross_entropy_loss",
    "fused_linear_cross_entropy": "kernels.linear_cross_entropy",
    "FusedLinearCrossEntropyLoss": "kernels.linear_cross_entropy",
    "fused_linear_cross_entropy_reference": "kernels.linear_cross_entropy",
    "vocab_parallel_fused_linear_cross_entropy": "kernels.linear_cross_entropy",
    "flash_attention": "kernels.attention",
    "flash_attention_reference": "kernels.attention",
    "flash_attention_forward_reference": "kernels.attention",
    "flash_attention_backward_reference": "kernels.attention",
    "fp8_quantize": "kernels.fp8",
    "fp8_matmul": "kernels.fp8",
    "fp8_quantize_reference": "kernels.fp8",
    "fp8_matmul_reference": "kernels.fp8",
    "fp8_dequantize": "kernels.fp8",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
