"""Random streams that make dropout under tensor parallelism correct and replayable.

`RNGStatesTracker` keeps named generator states (Megatron-LM's `CudaRNGStatesTracker`). Regions whose activations
are split over tp (attention heads, sequence shards under sequence parallelism) must draw different dropout masks per
tp rank: they run inside `tracker.fork("tp")`; replicated regions use the default generator, the same on every tp
rank. Activation recomputation must replay the tracked streams too: `recompute_context_fn` (Megatron's checkpoint
does the same for its CUDA RNG tracker). Parameter initialisation does not use these streams at all: each parameter
has its own seeded generator (engine.model.init).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from engine.model.init import root_attribute

TP_SEED_OFFSET = 2718  # Megatron's offset for the tensor-parallel stream


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
    # Wherever CUDA exists its generator is part of the state, initialised or not: a tracker made before the first
    # CUDA call must still own a CUDA stream, or dropout on the GPU would draw from the default (shared) one.
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
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


_ATTRIBUTE = "parallel_rng_tracker"


def attach_rng_tracker(model: nn.Module, tracker: RNGStatesTracker) -> None:
    """Records the tp dropout stream on the model root (found through wrappers by `rng_tracker_of`), for checkpoints
    and recomputation."""
    object.__setattr__(model, _ATTRIBUTE, tracker)


def rng_tracker_of(model: nn.Module) -> RNGStatesTracker | None:
    """The tracker a parallelizer attached to `model` (through DDP's `.module` / torch.compile's `_orig_mod`), or
    None (no tensor parallelism: every draw is from the default generator)."""
    return root_attribute(model, _ATTRIBUTE)
