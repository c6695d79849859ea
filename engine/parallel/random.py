"""Initialisation and random streams that make a sharded model equal the unsharded one for the same seed.

Weights: every sharded parameter carries `partition_dim` and its `full_shape` (set by the layers in tensor.py).
`init_param_(p, fn)` runs `fn` on the full master tensor drawn from the default generator, exactly as the
unsharded model would, and keeps this rank's slice (Megatron's `_initialize_affine_weight_cpu`). Every tp rank
draws the same numbers, and the stream advances by the full size, so the parameters initialised afterwards match
too. Costs one full-size temporary per parameter at init time.

Dropout: `RNGStatesTracker` keeps named generator states (Megatron's `CudaRNGStatesTracker`). Regions whose
activations are split over tp (attention heads, sequence shards under SP) must draw different masks per tp rank:
run them inside `tracker.fork("tp")`; replicated regions use the default generator, the same on every tp rank.
Activation recomputation must replay the tracked streams too: `recompute_context_fn` (Megatron's checkpoint does the
same for its CUDA RNG tracker).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

InitFn = Callable[[torch.Tensor], object]

TP_SEED_OFFSET = 2718  # Megatron's offset for the tensor-parallel stream


def linear_weight_init(weight: torch.Tensor) -> None:
    """`torch.nn.Linear`'s default weight init (kaiming uniform, a=sqrt(5)); needs the full (out, in) tensor."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def linear_bias_init(fan_in: int) -> InitFn:
    """`torch.nn.Linear`'s default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with the full fan-in."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda b: nn.init.uniform_(b, -bound, bound)


def embedding_init(weight: torch.Tensor) -> None:
    """`torch.nn.Embedding`'s default init, N(0, 1)."""
    nn.init.normal_(weight)


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "partition_dim", None) is not None


@torch.no_grad()
def init_param_(param: torch.Tensor, init_fn: InitFn) -> torch.Tensor:
    """Initialises `param` in place with `init_fn` as if it were unsharded.

    For a sharded parameter, `init_fn` runs on the full unpadded master tensor (same device and dtype, so the same
    generator as the unsharded model); padding rows are zero. A plain parameter gets `init_fn(param)`.
    """
    if not is_sharded(param):
        init_fn(param)
        return param
    from engine.parallel.tensor import shard_full_  # tensor.py imports this module

    full = torch.empty(param.full_shape, dtype=param.dtype, device=param.device)
    init_fn(full)
    shard_full_(param, full)
    return param


class RNGStatesTracker:
    """Named CPU (and current-CUDA-device) generator states; `fork(name)` runs a block on one of them."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state()
        torch.manual_seed(seed)
        self._states[name] = _get_state()
        _set_state(saved)

    def get_states(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """For checkpoints: a copy of every tracked state."""
        return {k: (cpu.clone(), None if cuda is None else cuda.clone()) for k, (cpu, cuda) in self._states.items()}

    def set_states(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self._states = dict(states)

    @contextlib.contextmanager
    def fork(self, name: str = "tp") -> Iterator[None]:
        if name not in self._states:
            raise ValueError(f"RNG state {name!r} was never added; known: {sorted(self._states)}")
        saved = _get_state()
        _set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state()
            _set_state(saved)


def model_parallel_seed(seed: int, tp_rank: int) -> RNGStatesTracker:
    """Seeds the default generator with `seed` (equal on every tp rank) and returns a tracker whose "tp" stream
    is `seed + 2718 + tp_rank` (different per tp rank), as Megatron's `model_parallel_cuda_manual_seed`."""
    torch.manual_seed(seed)
    tracker = RNGStatesTracker()
    tracker.add("tp", seed + TP_SEED_OFFSET + tp_rank)
    return tracker


def _get_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_state(s: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(s[0])
    if s[1] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s[1])


def maybe_fork(tracker: RNGStatesTracker | None, active: bool, name: str = "tp") -> contextlib.AbstractContextManager:
    """`tracker.fork(name)` when there is a tracker and `active` (a region whose activations differ per tp rank),
    else a no-op context: the default generator."""
    return tracker.fork(name) if tracker is not None and active else contextlib.nullcontext()


def recompute_context_fn(tracker: RNGStatesTracker | None) -> Callable[[], tuple]:
    """A `context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` that makes the recomputation
    draw the same tracked random numbers as the forward did (the checkpoint itself replays only the default
    generator): the tracker's states are snapshot at the forward and swapped in for the recomputation."""

    def context_fn() -> tuple:
        if tracker is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), _replaying(tracker, tracker.get_states())

    return context_fn


@contextlib.contextmanager
def _replaying(tracker: RNGStatesTracker, saved: dict) -> Iterator[None]:
    current = tracker.get_states()
    tracker.set_states(saved)
    try:
        yield
    finally:
        tracker.set_states(current)
