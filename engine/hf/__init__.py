"""Our Triton kernels inside Hugging Face transformers models: `apply_kernels(model)` swaps a Llama/Mistral/Qwen2
model's RMSNorms, rotary application, SwiGLU MLPs and loss for ours, in place (docs/hf_kernels.md).

Importing this package imports no transformers (only a model passed to `apply_kernels` brings it in). The function is
imported eagerly: its module has its name, and a lazily loaded submodule would shadow the function on the package.
"""

from engine.hf.apply_kernels import UnsupportedModelError, apply_kernels
from engine.hf.loss import causal_lm_loss
from engine.hf.modules import HFRMSNorm, SwiGLUMLP

__all__ = ["HFRMSNorm", "SwiGLUMLP", "UnsupportedModelError", "apply_kernels", "causal_lm_loss"]
