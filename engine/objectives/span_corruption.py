"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", section 3.1.4): pure NumPy functions on one window of token ids.

A random mask marks about `noise_density` of the tokens as noise, in spans of mean length `mean_noise_span_length`.
The encoder input keeps the other tokens and puts one sentinel id in place of each noise span; the target lists each
sentinel followed by the span it replaced:

    tokens   a b c d e f g h          (noise: c d, g h)
    inputs   a b <s0> e f <s1> EOS
    targets  <s0> c d <s1> g h EOS

- `random_spans_noise_mask` is T5's algorithm (`random_spans_noise_mask` in T5's `t5/data/preprocessors.py`): the
  numbers of noise tokens and of spans are fixed by the length, and every mask with those counts whose spans
  alternate non-noise, noise, ..., starting with non-noise, is equally likely. So the mask always ends in noise.
- `t5_lengths` is T5's `random_spans_helper` bookkeeping: how many raw tokens to take so that the corrupted encoder
  input is exactly `inputs_length` long, with no padding (512 -> 568 raw tokens and 114 targets at the defaults).
  `filled_lengths` is the same bookkeeping with the mask's clipped counts and without T5's density-0.5 adjustment,
  so that the input is exactly `inputs_length` at every rate (what the trainer's objectives use).
- `span_corrupt` builds the two sequences from any mask; `restore_spans` inverts it (tests and debugging).

Outputs are int64, the engine's token dtype. The sentinels are ids the tokenizer reserves (T5's extra ids); the
tokens must not contain them, or the inputs could not be told apart from the text.
"""

from collections.abc import Sequence

import numpy as np


def _check_rates(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_noise_span_length >= 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")


def _counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's unclipped (noise tokens, noise spans) for `length` raw tokens; Python's round, half to even, as T5's."""
    num_noise = int(round(length * noise_density))
    return num_noise, int(round(num_noise / mean_noise_span_length))


def _fit(inputs_length: int, noise_density: float, mean_noise_span_length: float, counts) -> tuple[int, int, int]:
    """(raw length, its inputs length, its targets length), both with EOS, for the largest raw length n >=
    inputs_length - 1 whose inputs (non-noise tokens + spans + EOS, with `counts(n, ...)` -> (noise, spans)) fit in
    `inputs_length`. The inputs length grows by 0 or 1 per raw token, so the bisection finds it."""
    _check_rates(noise_density, mean_noise_span_length)

    def lengths(n: int) -> tuple[int, int]:
        noise, spans = counts(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1

    lo = inputs_length - 1  # T5's loop starts here: its inputs length is at most inputs_length (spans <= noise)
    if lo < 2:
        raise ValueError(f"inputs_length must be >= 3, got {inputs_length}")
    # Inputs length >= n * (1 - density) + 1/2, so past `hi` it exceeds inputs_length: the answer is in [lo, hi).
    hi = int(np.ceil(inputs_length / (1.0 - noise_density))) + 2
    while hi - lo > 1:  # invariant: lengths(lo) fits, lengths(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if lengths(mid)[0] <= inputs_length else (lo, mid)
    return (lo, *lengths(lo))


def t5_lengths(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens, targets length) such that corrupting that many raw tokens gives an encoder input of exactly
    `inputs_length` tokens; both lengths include the EOS. T5's `random_spans_helper` with one sentinel per span on
    each side: the largest raw length whose inputs (non-noise tokens + spans + EOS) fit in `inputs_length`.

    The inputs length grows by 0 or 1 per raw token, so that largest raw length is found by bisection and gives
    exactly `inputs_length`. As T5 does, at noise_density 0.5 a raw length whose targets would come out longer
    than its inputs is shortened by one token and the targets length by one; the encoder input and the targets may
    then each come out one token short of the two lengths (T5 pads them).
    """
    raw_length, inputs, targets = _fit(inputs_length, noise_density, mean_noise_span_length, _counts)
    if noise_density == 0.5 and targets > inputs:  # T5's adjustment: targets no longer than inputs
        raw_length, targets = raw_length - 1, targets - 1
    noise, spans = _counts(raw_length, noise_density, mean_noise_span_length)
    if not 1 <= spans <= raw_length - noise:  # else the mask's clipped counts would differ from these
        raise ValueError(
            f"inputs_length {inputs_length} is too short for noise_density {noise_density} and "
            f"mean_noise_span_length {mean_noise_span_length}: {raw_length} raw tokens give {noise} noise tokens "
            f"in {spans} spans"
        )
    return raw_length, targets


def mask_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of `random_spans_noise_mask(length, ...)`: T5's counts clipped as the mask clips
    them (noise in [1, length - 1], spans in [1, non-noise tokens]). They depend on the length alone."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return num_noise, min(max(int(round(num_noise / mean_noise_span_length)), 1), length - num_noise)


def filled_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(raw tokens, targets length incl. EOS) whose corrupted input (with EOS) is exactly `inputs_length` tokens
    under the mask's own counts (`mask_counts`), so an encoder input never needs padding. Equal to `t5_lengths`
    wherever T5's counts need no clipping and no density-0.5 adjustment (512 -> 568 raw tokens, 114 targets);
    without that adjustment the targets may be one token longer than the inputs. Raises ValueError where no raw
    length fills the input exactly (spans clipped to the non-noise tokens: densities near 1 with short spans)."""
    raw_length, inputs, targets = _fit(inputs_length, noise_density, mean_noise_span_length, mask_counts)
    if inputs != inputs_length:
        raise ValueError(
            f"no raw length corrupts to exactly {inputs_length} inputs at noise_density {noise_density} and "
            f"mean_noise_span_length {mean_noise_span_length}"
        )
    return raw_length, targets


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (each >= 1, summing to `num_items`) of a uniformly random split into `num_segments` segments: the
    segment boundaries are `num_segments - 1` distinct cut points among the `num_items - 1` gaps."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of `length` with round(length * noise_density) noise tokens (clipped to [1, length - 1]) in
    max(1, round(noise / mean_noise_span_length)) spans, alternating with as many non-noise spans, non-noise first;
    uniform over such masks (T5's `random_spans_noise_mask`). Deterministic given `rng`'s state.

    Where T5's algorithm is undefined, more spans than non-noise tokens (densities near 1 with short spans), the
    span count is lowered to the number of non-noise tokens.
    """
    _check_rates(noise_density, mean_noise_span_length)
    if length < 2:
        raise ValueError(f"length must be >= 2 (one noise and one non-noise token), got {length}")
    num_noise, num_spans = mask_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # non-noise, noise, non-noise, ...
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, interleaved)


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for `tokens` under `noise_mask`: inputs are the non-noise tokens with the i-th noise span
    replaced by `sentinel_ids[i]`; targets are each span's sentinel followed by the span. Both end with `eos_id`
    unless it is None. Spans are maximal runs of True; the mask need not come from `random_spans_noise_mask`."""
    tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask)
    if tokens.ndim != 1 or noise_mask.shape != tokens.shape or noise_mask.dtype != np.bool_:
        raise ValueError(
            f"need 1-D tokens and a bool mask of the same shape, got {tokens.shape} and {noise_mask.dtype} "
            f"{noise_mask.shape}"
        )
    sentinels = np.asarray(sentinel_ids, dtype=np.int64).reshape(-1)
    starts = noise_mask & ~np.concatenate(([False], noise_mask[:-1]))  # first token of each noise span
    num_spans = int(starts.sum())
    if num_spans > len(sentinels):
        raise ValueError(f"{num_spans} noise spans but only {len(sentinels)} sentinel ids")
    if np.isin(tokens, sentinels).any():
        raise ValueError("tokens contain sentinel ids, so the corrupted inputs would be ambiguous")
    ids = tokens.astype(np.int64)
    inputs = ids.copy()
    inputs[starts] = sentinels[:num_spans]
    inputs = inputs[~noise_mask | starts]
    targets = np.insert(ids[noise_mask], np.flatnonzero(starts[noise_mask]), sentinels[:num_spans])
    if eos_id is not None:
        inputs, targets = np.append(inputs, eos_id), np.append(targets, eos_id)
    return inputs, targets


def restore_spans(
    inputs: np.ndarray, targets: np.ndarray, sentinel_ids: Sequence[int], eos_id: int | None
) -> np.ndarray:
    """The original tokens from `span_corrupt`'s (inputs, targets): each sentinel in the inputs replaced by the
    tokens that follow it in the targets. Both must end with `eos_id` unless it is None (it is dropped)."""
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if eos_id is not None:
        if not (len(inputs) and len(targets) and inputs[-1] == eos_id and targets[-1] == eos_id):
            raise ValueError(f"inputs and targets must both end with eos_id {eos_id}")
        inputs, targets = inputs[:-1], targets[:-1]
    sentinels = np.asarray(sentinel_ids, dtype=np.int64).reshape(-1)
    t_pos = np.flatnonzero(np.isin(targets, sentinels))
    if len(targets) and (len(t_pos) == 0 or t_pos[0] != 0):
        raise ValueError("targets must start with a sentinel id")
    spans = {int(part[0]): part[1:] for part in np.split(targets, t_pos[1:])} if len(targets) else {}
    pieces = np.split(inputs, np.flatnonzero(np.isin(inputs, sentinels)))
    out = [pieces[0]]
    for piece in pieces[1:]:  # each starts with a sentinel
        span = spans.pop(int(piece[0]), None)
        if span is None:
            raise ValueError(f"sentinel {int(piece[0])} in the inputs is missing from the targets or repeated")
        out += [span, piece[1:]]
    if spans:
        raise ValueError(f"sentinels {sorted(spans)} in the targets are missing from the inputs")
    return np.concatenate(out)
