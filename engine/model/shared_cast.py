"""One autocast copy of an activation for the several projections that read it.

Under autocast each nn.Linear casts its fp32 input to bf16 itself and keeps that copy for the backward pass, so q, k
and v reading one norm output keep three identical copies (gate and up, two): the largest activation term of this
engine's layers (engine.scaling.activations). `shared_autocast_inputs(x, n)` casts once and hands each consumer an
alias of that one copy through its own autograd node, whose backward casts the consumer's gradient back to x's dtype,
so autograd sums the n gradients in fp32 exactly as it summed the n casts' before: forward and backward are bit for
bit what n separate casts give, with one copy stored instead of n.
"""

from __future__ import annotations

import torch

_COPY = "_autocast_copy"  # the attribute a producer's ready cast rides on (attach_autocast_copy)


class _AliasOfCast(torch.autograd.Function):
    """Forward: `low` (x already cast, detached) as this consumer's input. Backward: the gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts `x`'s matmul inputs to on its device, or None where autocast is off."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def attach_autocast_copy(x: torch.Tensor, low: torch.Tensor) -> None:
    """Hands `shared_autocast_inputs` a cast of `x` made elsewhere (equal to `x.detach().to(low.dtype)`), so the
    producer knows the tensor the projections keep: sequence parallelism's all-gather saves it as this rank's shard
    (engine.parallel.regather)."""
    setattr(x, _COPY, low)


def shared_autocast_inputs(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n inputs for n linears reading x: x itself without autocast (or where x is already in the autocast dtype),
    else n aliases of one cast copy, each with its own gradient path back to x."""
    dtype = autocast_dtype(x)
    if dtype is None or x.dtype == dtype or not x.is_floating_point():
        return [x] * n
    low = getattr(x, _COPY, None)
    if low is None or low.dtype != dtype or low.shape != x.shape:
        low = x.detach().to(dtype)
    if not x.requires_grad:
        return [low] * n
    return [_AliasOfCast.apply(x, low) for _ in range(n)]
