"""Prefix language modelling (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", sec. 3.2.1 and Fig. 3: a decoder-only model with a "causal with prefix" mask; Dong et al.
2019, UniLM).

A packed sample of n + 1 tokens t[0..n] becomes inputs t[:-1] and next-token labels t[1:] as for clm, plus a prefix
length P in 0..n. The model attends bidirectionally over the first P input positions and causally after them: query i
sees key j iff j <= i or j < P (the mask lives with the attention, kernels/attention.py). The loss covers only the
tokens after the prefix, t[P..n]: label i (= t[i + 1]) is kept iff i + 1 >= P. Position P - 1 predicts t[P] having
seen exactly t[0..P-1], so no label is visible to the position that predicts it; a label inside the prefix would be
(position i < P - 1 sees t[i + 1]), which is why those are ignored. P = 0 is plain causal LM; P = n leaves one label.

P is drawn uniformly from the integers in [round(min_frac * n), round(max_frac * n)] (T5 splits its spans at a
uniformly random point: [0, 1] is the default range).
"""

import numpy as np

from engine.objectives.mlm import IGNORE_INDEX


def draw_prefix_length(n: int, rng: np.random.Generator, min_frac: float = 0.0, max_frac: float = 1.0) -> int:
    """A prefix length for a sample of n inputs, uniform over the integers in [round(min_frac n), round(max_frac n)]."""
    if not (0.0 <= min_frac <= max_frac <= 1.0):  # also rejects NaN
        raise ValueError(f"prefix fractions must satisfy 0 <= min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    lo, hi = round(min_frac * n), round(max_frac * n)
    return int(rng.integers(lo, hi + 1))


def prefix_lm_example(tokens: np.ndarray, prefix_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs t[:-1], labels t[1:] with IGNORE_INDEX at positions i < prefix_length - 1) of a 1-D sample t."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or len(tokens) < 2:
        raise ValueError(f"prefix LM takes integer tokens of shape (n + 1,), n >= 1, got {tokens.dtype} {tokens.shape}")
    n = len(tokens) - 1
    if not 0 <= prefix_length <= n:
        raise ValueError(f"prefix length {prefix_length} is outside [0, {n}]")
    labels = tokens[1:].astype(np.int64)
    labels[: max(prefix_length - 1, 0)] = IGNORE_INDEX
    return tokens[:-1], labels
