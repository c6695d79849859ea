"""Masked language modelling (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers").

Each row selects exactly round(mask_rate * n) of its n eligible (non-special) positions, uniformly without
replacement, as BERT's data generator does (a fixed number of predictions per sequence, so the loss count does not
vary between rows of the same fill). Each selected position independently becomes `mask_id` with probability
`replace_rate`, a uniformly random non-special token with probability `random_rate` (it may equal the original, as
in BERT), and is kept with the remaining probability: the mask token never appears at fine-tuning time, so the model
must keep a useful representation of every input token. Labels hold the original token at the selected positions
and the ignore index elsewhere, so the loss covers only the selected positions. `mask_id` counts as special even when
not listed, so a position already masked is never selected and random replacements never produce it.
"""

from collections.abc import Sequence

import numpy as np

# The ignore index of the engine's cross-entropy (engine.model.head.IGNORE_INDEX, the kernels' default), repeated
# here so this numpy transform does not import torch.
IGNORE_INDEX = -100


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_rate: float = 0.15,
    replace_rate: float = 0.8,
    random_rate: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for integer `tokens` of shape (seq,) or (batch, seq), each row masked on its own: inputs
    have the dtype of `tokens`, labels are int64 with IGNORE_INDEX outside the selected positions."""
    for name, rate in (("mask_rate", mask_rate), ("replace_rate", replace_rate), ("random_rate", random_rate)):
        if not 0.0 <= rate <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} {rate} is outside [0, 1]")
    if replace_rate + random_rate > 1.0:
        raise ValueError(f"replace_rate + random_rate = {replace_rate + random_rate} exceeds 1")
    tokens = np.asarray(tokens)
    if tokens.ndim not in (1, 2) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"mask_tokens takes integer tokens of shape (seq,) or (batch, seq), got {tokens.dtype} {tokens.shape}"
        )
    specials = np.unique(np.asarray([*special_ids, mask_id], dtype=np.int64))
    specials = specials[(specials >= 0) & (specials < vocab_size)]
    if not 0 <= mask_id < vocab_size or vocab_size <= len(specials):
        raise ValueError(f"mask_id {mask_id} must lie in a vocabulary ({vocab_size}) with non-special ids")

    rows = tokens if tokens.ndim == 2 else tokens[None]
    eligible = ~np.isin(rows, specials)
    counts = np.round(mask_rate * eligible.sum(axis=1))  # half to even, like Python's round
    keys = np.where(eligible, rng.random(rows.shape), np.inf)  # ineligible positions sort last
    order = np.argsort(keys, axis=1, kind="stable")
    selected = np.zeros(rows.shape, dtype=bool)
    np.put_along_axis(selected, order, np.arange(rows.shape[1])[None, :] < counts[:, None], axis=1)

    labels = np.where(selected, rows, IGNORE_INDEX).astype(np.int64)
    u = rng.random(rows.shape)
    to_mask = selected & (u < replace_rate)
    to_random = selected & (u >= replace_rate) & (u < replace_rate + random_rate)
    # A uniform rank among the non-special ids, shifted past every special id at or below it.
    rank = rng.integers(0, vocab_size - len(specials), size=int(to_random.sum()))
    random_ids = rank + np.searchsorted(specials - np.arange(len(specials)), rank, side="right")
    inputs = rows.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids
    return inputs.reshape(tokens.shape), labels.reshape(tokens.shape)
