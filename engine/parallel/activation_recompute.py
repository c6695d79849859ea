"""Selective recomputation of the MLP activation's output: the down projection's saved input rebuilt in backward.

The MLP's down projection keeps its input, the activation's output (SwiGLU's silu(gate) * up, GPT-2's GELU), for its
weight gradient: ffn_hidden wide, the size of the tensors the activation itself keeps (gate and up, or GELU's input).
Those are kept anyway, and the activation is one elementwise pass over them, so the output need not be: recomputing
it costs a read of its inputs and a write, and frees one of the MLP's largest tensors (Korthikanti et al. 2022's
selective recomputation recomputes what is large to keep and cheap to compute; Megatron-Core recomputes activations
the same way). `recompute_output(producer, consumer)` records the producer's output and inputs in a forward hook, and
for the consumer's forward enters a `SavedTensorScope` (saved_tensors.py) in which that output is saved as the inputs
and rebuilt by the producer's forward, under the autocast state of the original call, when backward asks: the same
kernel on the same inputs, so the same bits.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.model.shared_cast import autocast_dtype
from engine.parallel.saved_tensors import SavedSource, SavedTensorScope, same_storage


class _Recomputed(SavedSource):
    """An output saved as the inputs it is computed from (the payload), rebuilt under the forward's autocast state."""

    __slots__ = ("fn", "device", "autocast")

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        super().__init__(inputs)
        self.fn, self.device = fn, inputs[0].device.type
        self.autocast = autocast_dtype(inputs[0])  # None: autocast was off, and stays off for the rebuild

    def build(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.device not in ("cpu", "cuda"):
            cast = contextlib.nullcontext()
        elif self.autocast is None:
            cast = torch.autocast(self.device, enabled=False)
        else:
            cast = torch.autocast(self.device, self.autocast)
        with torch.no_grad(), cast:
            return self.fn(*inputs)


class RecomputedOutput:
    """Hooks that save `producer`'s output, where `consumer` saves it, as the producer's inputs (module docstring).
    The output is held weakly between the two calls (a producer call no consumer follows keeps nothing alive), and
    matched only if the consumer's first input is it (or a view of it), unchanged since the producer made it."""

    def __init__(self, producer: nn.Module, consumer: nn.Module):
        self.producer = producer
        self._last: tuple[weakref.ref, int, _Recomputed] | None = None  # (output, its version, its source)
        self._scopes: list[SavedTensorScope | None] = []
        producer.register_forward_hook(self.produced)
        consumer.register_forward_pre_hook(self.enter)
        consumer.register_forward_hook(self.leave, always_call=True)

    def produced(self, module: nn.Module, args: tuple, output: Any) -> None:
        tensors = isinstance(output, torch.Tensor) and args and all(isinstance(a, torch.Tensor) for a in args)
        if not torch.is_grad_enabled() or not tensors:
            self._last = None
            return
        source = _Recomputed(self.producer.forward, tuple(a.detach() for a in args))
        self._last = (weakref.ref(output), output._version, source)

    def enter(self, module: nn.Module, args: tuple) -> None:
        last, self._last = self._last, None  # one consumer call per producer call
        output = last[0]() if last is not None else None
        scope = None
        if (output is not None and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)
                and output._version == last[1] and same_storage(args[0], output)):  # fmt: skip
            scope = SavedTensorScope()
            scope.add(output, last[2])
            scope.__enter__()
        self._scopes.append(scope)

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        scope = self._scopes.pop() if self._scopes else None  # empty if an earlier pre-hook raised before ours
        if scope is not None:
            scope.__exit__(None, None, None)


def recompute_output(producer: nn.Module, consumer: nn.Module) -> RecomputedOutput:
    """Where `consumer` saves `producer`'s output for backward, saves the producer's inputs instead and recomputes
    the output from them (`producer` elementwise and deterministic, its inputs kept for its own backward anyway)."""
    return RecomputedOutput(producer, consumer)
