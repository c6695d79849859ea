"""Triton kernels, each with its autograd Function and a plain-PyTorch reference.

Names load on first use, so `import kernels` imports neither triton nor touches a GPU.
"""

import importlib

_EXPORTS = {
    "rms_norm": "kernels.norms",
    "layer_norm": "kernels.norms",
    "RMSNorm": "kernels.norms",
    "LayerNorm": "kernels.norms",
    "apply_rope": "kernels.rope",
    "swiglu": "kernels.swiglu",
    "geglu": "kernels.swiglu",
    "cross_entropy": "kernels.cross_entropy",
    "CrossEntropyLoss": "kernels.cross_entropy",
    "fused_linear_cross_entropy": "kernels.fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss": "kernels.fused_linear_cross_entropy",
    "vocab_parallel_fused_linear_cross_entropy": "kernels.fused_linear_cross_entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
