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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.model.shared_cast import autocast_dtype
from engine.parallel.saved_tensors import SavedSource, SavedTensorScope


class _Recomputed(SavedSource):
    """An output saved as the inputs it is computed from (the payload)."""

    __slots__ = ("fn", "autocast")

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 autocast: tuple[str, torch.dtype] | None):  # fmt: skip
        super().__init__(inputs)
        self.fn, self.autocast = fn, autocast

    def build(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(self.autocast[0], self.autocast[1]) if self.autocast else contextlib.nullcontext()
        with torch.no_grad(), cast:
            return self.fn(*inputs)


def _autocast_state(x: torch.Tensor) -> tuple[str, torch.dtype] | None:
    dtype = autocast_dtype(x)
    return (x.device.type, dtype) if dtype is not None else None


class RecomputedOutput:
    """Hooks that save `producer`'s output, where `consumer` saves it, as the producer's inputs (module docstring)."""

    def __init__(self, producer: nn.Module, consumer: nn.Module):
        self.producer = producer
        self._last: _Recomputed | None = None
        self._output: torch.Tensor | None = None
        self._scopes: list[SavedTensorScope | None] = []
        producer.register_forward_hook(self.produced)
        consumer.register_forward_pre_hook(self.enter)
        consumer.register_forward_hook(self.exit, always_call=True)

    def produced(self, module: nn.Module, args: tuple, output: Any) -> None:
        tensors = isinstance(output, torch.Tensor) and args and all(isinstance(a, torch.Tensor) for a in args)
        if not torch.is_grad_enabled() or not tensors:
            self._last = self._output = None
            return
        inputs = tuple(a.detach() for a in args)
        self._last, self._output = _Recomputed(self.producer.forward, inputs, _autocast_state(args[0])), output

    def enter(self, module: nn.Module, args: tuple) -> None:
        scope = None
        if torch.is_grad_enabled() and self._last is not None:
            scope = SavedTensorScope()
            scope.add(self._output, self._last)
            scope.__enter__()
        self._last = self._output = None  # one consumer call per producer call
        self._scopes.append(scope)

    def exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        scope = self._scopes.pop()
        if scope is not None:
            scope.__exit__(None, None, None)


def recompute_output(producer: nn.Module, consumer: nn.Module) -> RecomputedOutput:
    """Where `consumer` saves `producer`'s output for backward, saves the producer's inputs instead and recomputes
    the output from them (`producer` elementwise and deterministic, its inputs kept for its own backward anyway)."""
    return RecomputedOutput(producer, consumer)
