"""Split backward for zero-bubble schedules (Qi et al. 2023): a linear layer's backward computes only its input
gradient (the B pass, on the critical path between stages) and queues its weight gradient (the W pass), which the
schedule runs later, in time the rank would otherwise wait.

`WeightGradStore.deferring(key)` makes every deferrable linear backward inside it queue its weight gradient under
`key` (a (chunk, micro-batch) pair); `run(key)` computes and accumulates them into `.grad`. Only matmul weights are
deferred: biases, norms and embeddings are cheap and take their gradients in B. Megatron-LM and Transformer Engine
defer weight gradients the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    def __init__(self) -> None:
        self.active: list[Callable[[], None]] | None = None
        self.queues: dict[tuple[int, int], list[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def deferring(self, key: tuple[int, int]) -> Iterator[None]:
        self.active = self.queues.setdefault(key, [])
        try:
            yield
        finally:
            self.active = None

    def run(self, key: tuple[int, int]) -> int:
        """Computes the weight gradients queued under `key`; returns how many."""
        queue = self.queues.pop(key, [])
        with torch.no_grad():  # the saved inputs require grad: no graph for the weight gradient's product
            for fn in queue:
                fn()
        return len(queue)


def _accumulate(weight: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(weight.dtype)
    if weight.grad is None:
        weight.grad = grad
    else:
        weight.grad += grad


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.param, ctx.store, ctx.has_bias = weight, store, bias is not None  # the parameter, not a cast copy
        if torch.is_autocast_enabled(x.device.type):  # as F.linear under autocast: compute in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.store.active is not None:  # B pass: the weight gradient waits for the schedule's W
            param = ctx.param
            ctx.store.active.append(lambda: _accumulate(param, g2.t() @ x2))
            return grad_x, None, grad_b, None
        return grad_x, (g2.t() @ x2).to(ctx.param.dtype), grad_b, None


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      store: WeightGradStore | None) -> torch.Tensor:  # fmt: skip
    """F.linear whose weight gradient is queued in `store` while it is deferring (plain F.linear otherwise)."""
    if store is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _DeferrableLinear.apply(x, weight, bias, store)


class DeferredLinear(nn.Linear):
    """nn.Linear through `deferrable_linear`; `weight_grad_store` set by the pipeline runner for zero-bubble
    schedules (same parameters and names as the nn.Linear it replaces)."""

    weight_grad_store: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deferrable_linear(x, self.weight, self.bias, self.weight_grad_store)
