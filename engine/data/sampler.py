"""Layout-independent, resumable sampling: which sample ids each data-parallel rank reads at each micro-step.

The training stream is the dataset read in order 0, 1, 2, ... (the dataset's own shuffle index already randomises
it), so the whole data position is one integer, `consumed_samples`. Optimizer step s with global batch G reads
samples [c, c + G) where c = consumed_samples before the step. Data-parallel rank r of dp takes the contiguous slice
[c + r*G/dp, c + (r+1)*G/dp) (as Megatron's `MegatronPretrainingSampler`) and splits it into micro-batches in order.
Concatenating every rank's micro-batches in rank order gives back [c, c + G) exactly, whatever dp and the micro-batch
size are, so a step sees the same samples in any layout, and a run resumed from a checkpoint's consumed_samples (in
the same or another layout) reads the same next batch as the uninterrupted run.
"""

from collections.abc import Iterator


class SamplerError(ValueError):
    """Batch sizes or ranks that do not fit together (one-line message naming the setting)."""


def _check(consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
    if consumed_samples < 0:
        raise SamplerError(f"consumed_samples must be >= 0, got {consumed_samples}")
    if global_batch < 1 or micro_batch < 1 or dp_size < 1:
        raise SamplerError(
            f"global_batch, micro_batch and dp size must be >= 1, got {global_batch}, {micro_batch}, {dp_size}"
        )
    if global_batch % (micro_batch * dp_size):
        raise SamplerError(
            f"train.global_batch {global_batch} is not divisible by train.micro_batch {micro_batch} x "
            f"data-parallel size {dp_size}; pick a global batch that is a multiple of {micro_batch * dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise SamplerError(f"dp_rank {dp_rank} out of range for data-parallel size {dp_size}")


def num_micro_batches(global_batch: int, micro_batch: int, dp_size: int) -> int:
    """Gradient-accumulation steps per optimizer step on each rank."""
    _check(0, global_batch, micro_batch, 0, dp_size)
    return global_batch // (micro_batch * dp_size)


def micro_batch_indices(
    consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Sample ids for this rank's micro-steps of the optimizer step that starts at `consumed_samples`.

    Returns `global_batch // (micro_batch * dp_size)` lists of `micro_batch` ids each.
    """
    _check(consumed_samples, global_batch, micro_batch, dp_rank, dp_size)
    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    return [list(range(s, s + micro_batch)) for s in range(start, start + per_rank, micro_batch)]


class ResumableSampler:
    """Iterates this rank's micro-batch ids step by step; `consumed_samples` is the whole resumable state.

    Each iteration yields one optimizer step: a list of micro-batches (lists of sample ids). `consumed_samples`
    advances by `global_batch` as the step is handed out, so a checkpoint written after that step has been trained
    on records the position of the next one. With `total_samples`, iteration stops before a step that would read
    past it (no partial global batches).
    """

    def __init__(
        self,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        total_samples: int | None = None,
    ) -> None:
        _check(consumed_samples, global_batch, micro_batch, dp_rank, dp_size)
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples

    def __iter__(self) -> Iterator[list[list[int]]]:
        while self.total_samples is None or self.consumed_samples + self.global_batch <= self.total_samples:
            step = micro_batch_indices(
                self.consumed_samples, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size
            )
            self.consumed_samples += self.global_batch
            yield step

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        _check(consumed, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size)
        self.consumed_samples = consumed
