"""Our RoPE kernel in place of transformers' `apply_rotary_pos_emb`, for chosen attention modules only.

transformers' attention modules call their modeling module's global `apply_rotary_pos_emb(q, k, cos, sin)`, so the
function cannot be swapped per model by assignment. `install_rope_dispatch` replaces that global, once per modeling
module, by a dispatcher that runs the original unless the calling attention module was patched: `patch_attention`
registers a forward pre-hook that sets a context variable (with the backend) and a forward hook, run even when forward
raises, that resets it. A model that was not patched (e.g. the copy a test compares against) keeps transformers' code.

The conversion (RoFormer, Su et al. 2021, half-rotation layout): transformers passes q, k as (batch, heads, seq,
head_dim) and cos, sin as (batch or 1, seq, head_dim) holding ``cat(c, c)`` and ``cat(s, s)`` (every rope type of
these models builds ``emb = cat(freqs, freqs)``, times its attention scaling), already gathered at each token's
position. Our kernel takes x as (batch, seq, heads, head_dim), a strided view here (no copy), and tables of
(positions, head_dim / 2): the first halves of cos, sin, one row per token (rows b * seq + s when the batch rows
differ). It computes in fp32 and rounds once; transformers rotates in x's dtype, so bf16 results may differ in the
last bit. A call this conversion does not cover (another `unsqueeze_dim`, partial rotary dims) runs the original.
"""

from __future__ import annotations

import contextvars
import functools
from types import ModuleType

import torch
from torch import nn

from kernels.rope import apply_rope

# The backend of the patched attention module running now, or None outside one.
_ACTIVE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("engine_hf_rope_backend", default=None)
_TOKEN_ATTR = "_engine_hf_rope_tokens"
PATCH_ATTR = "_engine_hf_rope_backend"


def _rope_tables(
    cos: torch.Tensor, sin: torch.Tensor, half: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cos table, sin table, position ids or None) for the kernel, from transformers' gathered (b|1, s, d)."""
    if cos.shape[0] == 1:
        return cos[0, :, :half], sin[0, :, :half], None
    batch, seq = cos.shape[:2]
    pos = torch.arange(batch * seq, device=cos.device).view(batch, seq)
    return cos[..., :half].reshape(batch * seq, half), sin[..., :half].reshape(batch * seq, half), pos


def rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers' `apply_rotary_pos_emb` on our kernel: (q_embed, k_embed) in q's layout, or None for a call
    outside the conversion's scope (the caller then runs the original)."""
    dim = q.shape[-1]
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or cos.dim() != 3 or cos.shape[-1] != dim or dim % 2:
        return None
    c, s, pos = _rope_tables(cos, sin, dim // 2)
    if unsqueeze_dim == 1:  # (b, h, s, d) -> the kernel's (b, s, h, d), a view
        q_embed = apply_rope(q.transpose(1, 2), c, s, pos, backend=backend).transpose(1, 2)
        k_embed = apply_rope(k.transpose(1, 2), c, s, pos, backend=backend).transpose(1, 2)
        return q_embed, k_embed
    return apply_rope(q, c, s, pos, backend=backend), apply_rope(k, c, s, pos, backend=backend)


def install_rope_dispatch(modeling: ModuleType) -> None:
    """Replaces `modeling.apply_rotary_pos_emb` by the dispatcher (once; idempotent)."""
    original = modeling.apply_rotary_pos_emb
    if getattr(original, "_engine_hf_original", None) is not None:
        return

    @functools.wraps(original)
    def dispatch(q, k, cos, sin, *args, **kwargs):
        backend = _ACTIVE_BACKEND.get()
        if backend is not None:
            out = rotary_pos_emb(q, k, cos, sin, *args, **kwargs, backend=backend)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    dispatch._engine_hf_original = original
    modeling.apply_rotary_pos_emb = dispatch


def _enter(module: nn.Module, args) -> None:
    getattr(module, _TOKEN_ATTR).append(_ACTIVE_BACKEND.set(getattr(module, PATCH_ATTR)))


def _exit(module: nn.Module, args, output) -> None:
    tokens = getattr(module, _TOKEN_ATTR)
    if tokens:
        _ACTIVE_BACKEND.reset(tokens.pop())


def patch_attention(attention: nn.Module, backend: str) -> bool:
    """Makes `attention`'s calls of the dispatcher run our kernel with `backend`; False if it already did."""
    if hasattr(attention, PATCH_ATTR):
        return False
    setattr(attention, PATCH_ATTR, backend)
    setattr(attention, _TOKEN_ATTR, [])
    attention.register_forward_pre_hook(_enter)
    attention.register_forward_hook(_exit, always_call=True)
    return True
