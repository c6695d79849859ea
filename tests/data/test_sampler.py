"""Resumable sampling: the same global batches in every data-parallel layout, and the same next batch on resume."""

import itertools

import numpy as np
import pytest

from engine.data.gpt_dataset import GPTDataset
from engine.data.sampler import ResumableSampler, SamplerError, micro_batch_indices, num_micro_batches

LAYOUTS = [(dp, mb) for dp in (1, 2, 4) for mb in (1, 2, 4)]  # global batch 16 divides by every dp * mb


def _gathered(consumed: int, global_batch: int, micro_batch: int, dp_size: int) -> list[int]:
    """What an all-gather over ranks (in rank order) of each rank's micro-batches (in order) sees."""
    return [
        i
        for rank in range(dp_size)
        for micro in micro_batch_indices(consumed, global_batch, micro_batch, rank, dp_size)
        for i in micro
    ]


@pytest.mark.parametrize("consumed", [0, 16, 48, 7, 1001])  # arbitrary positions, not only step boundaries
def test_global_batch_is_layout_independent(consumed):
    expected = list(range(consumed, consumed + 16))
    for dp, mb in LAYOUTS:
        assert _gathered(consumed, 16, mb, dp) == expected, (dp, mb)
        per_rank = [micro_batch_indices(consumed, 16, mb, r, dp) for r in range(dp)]
        assert all(len(m) == num_micro_batches(16, mb, dp) == 16 // (dp * mb) for m in per_rank)
        assert all(len(batch) == mb for m in per_rank for batch in m)


def test_resume_at_any_position_gives_the_same_next_batches():
    # a straight run of 12 steps, recorded in layout (dp 1, mb 1)
    straight = [sum(step, []) for step in itertools.islice(ResumableSampler(16, 1), 12)]
    for stop_after in (0, 1, 5, 11):
        for dp, mb in LAYOUTS:
            samplers = [ResumableSampler(16, mb, r, dp) for r in range(dp)]
            iters = [iter(s) for s in samplers]
            for _ in range(stop_after):
                for it in iters:
                    next(it)
            state = samplers[0].state_dict()
            assert state == {"consumed_samples": 16 * stop_after}
            # resume into another layout from the saved integer
            dp2, mb2 = LAYOUTS[(LAYOUTS.index((dp, mb)) + 4) % len(LAYOUTS)]
            resumed = [ResumableSampler(16, mb2, r, dp2) for r in range(dp2)]
            for s in resumed:
                s.load_state_dict(state)
            steps = zip(*[iter(s) for s in resumed])
            for step in range(stop_after, 12):
                gathered = [i for per_rank in next(steps) for micro in per_rank for i in micro]
                assert gathered == straight[step], (dp, mb, dp2, mb2, step)


def test_total_samples_stops_before_a_partial_batch():
    steps = list(ResumableSampler(8, 2, 1, 2, consumed_samples=4, total_samples=30))
    assert [s[0][0] for s in steps] == [8, 16, 24]  # rank 1 of 2 starts half-way into each batch of 8
    assert steps[-1] == [[24, 25], [26, 27]]


def test_bad_batch_settings():
    with pytest.raises(SamplerError, match=r"global_batch 10 is not divisible by train.micro_batch 2 x .* size 4"):
        micro_batch_indices(0, 10, 2, 0, 4)
    with pytest.raises(SamplerError, match="dp_rank 2 out of range"):
        micro_batch_indices(0, 8, 2, 2, 2)
    with pytest.raises(SamplerError, match="consumed_samples"):
        ResumableSampler(8, 2).load_state_dict({"consumed_samples": -1})


def test_tokens_of_a_step_are_layout_independent(make_dataset):
    rng = np.random.default_rng(0)
    prefix = make_dataset([rng.integers(0, 500, rng.integers(3, 30)) for _ in range(80)])
    ds = GPTDataset(prefix, 64, 6, seed=4)

    def step_tokens(consumed: int, mb: int, dp: int) -> np.ndarray:
        rows = [ds[i]["tokens"] for r in range(dp) for m in micro_batch_indices(consumed, 16, mb, r, dp) for i in m]
        return np.stack(rows)

    reference = step_tokens(37, 1, 1)
    for dp, mb in LAYOUTS:
        np.testing.assert_array_equal(step_tokens(37, mb, dp), reference)
