"""Drop-in replacements for a Llama-style transformers model's RMSNorm and SwiGLU MLP, built on our kernels.

Each takes over the parameters (or the projection submodules) of the module it replaces, the same objects, so the
state dict's keys, tied weights and an optimizer built before the swap are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.shared_cast import shared_autocast_inputs
from kernels.glu import swiglu
from kernels.norms import RMSNorm, rms_norm

# transformers' names of SiLU (`ACT2FN`); SwiGLU is silu(gate) * up (Shazeer 2020).
SILU_ACTS = ("silu", "swish")


class HFRMSNorm(RMSNorm):
    """`kernels.RMSNorm` with the rounding of transformers' Llama/Mistral/Qwen2 RMSNorm.

    Theirs: ``weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)``: normalised in fp32, rounded to x's dtype,
    then multiplied by the weight in the promoted dtype of the two. For fp32 inputs the rounding is a no-op and the
    weight multiply runs inside our kernel (one pass); for fp16/bf16 inputs the kernel normalises without a weight
    (rounding once, as theirs does) and the weight multiply is theirs, so the outputs match bit for bit up to the
    kernel's reduction order. Our kernel alone would multiply before rounding (Gemma's order), not theirs.
    """

    def __init__(self, source: nn.Module, backend: str = "auto"):
        weight = source.weight
        super().__init__(weight.shape[0], eps=float(source.variance_epsilon), device="meta", backend=backend)
        self.weight = weight  # the same Parameter object as the replaced module's

    @property
    def variance_epsilon(self) -> float:
        """transformers' name of `eps`, for code that reads it from the module."""
        return self.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32:
            return rms_norm(hidden_states, self.weight, self.eps, backend=self.backend)
        return self.weight * rms_norm(hidden_states, None, self.eps, backend=self.backend)


class SwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with our fused SwiGLU, holding the replaced MLP's projections.

    transformers computes ``act_fn(gate) * up`` as two ops in x's dtype (rounding twice for bf16); the fused kernel
    computes in fp32 and rounds once, so bf16 outputs may differ in the last bit; fp32 matches to rounding.
    """

    def __init__(self, source: nn.Module, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = source.gate_proj, source.up_proj, source.down_proj
        self.hidden_size, self.intermediate_size = self.gate_proj.in_features, self.gate_proj.out_features
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg, xu = shared_autocast_inputs(x, 2)  # one 16-bit copy of x kept for gate and up, not two
        return self.down_proj(swiglu(self.gate_proj(xg), self.up_proj(xu), backend=self.backend))

    def extra_repr(self) -> str:
        return f"swiglu, backend={self.backend!r}"
