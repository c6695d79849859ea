"""Weighted blends of datasets: `--data.path "0.7 prefixA 0.3 prefixB"`.

`BlendedDataset` is Megatron-LM's (Shoeybi et al. 2019; Megatron-Core's `blended_dataset.py`): weights are
normalised (only their proportions matter, so "3 A 1 B" is "0.75 A 0.25 B") and sample i is drawn from
the dataset chosen by the deterministic greedy of `build_blending_indices`, which keeps every prefix of the stream
within about one sample per dataset of the target proportions. So any window of n samples holds each dataset
within a couple of samples of weight * n, with no randomness and nothing to resume but the sample position.
"""

import math
import os
from collections.abc import Sequence

import numpy as np

from engine.data.gpt_dataset import GPTDataset
from engine.data.helpers import build_blending_indices
from engine.data.indexed_dataset import IndexedDataset, bin_path, idx_path

# Each dataset of a blend is built with this much headroom over its expected share (Megatron uses 0.5% too).
_MARGIN = 0.005


class BlendError(ValueError):
    """A blend specification that cannot be used (bad weights, odd item count)."""


def parse_blend(spec: str, check_exists: bool = True) -> list[tuple[float, str]]:
    """Parses "w1 prefix1 w2 prefix2 ..." (or a single prefix, weight 1) into [(weight, prefix), ...].

    Weights must be finite and non-negative with a positive sum (they need not sum to 1). With `check_exists`,
    every prefix must name an existing PREFIX.idx and PREFIX.bin. Each error is one line naming the bad item.
    """
    items = spec.split()
    if not items:
        raise BlendError("data path is empty: give a dataset prefix or a blend 'w1 prefix1 w2 prefix2 ...'")
    if len(items) == 1:
        pairs = [(1.0, items[0])]
    else:
        if len(items) % 2:
            raise BlendError(
                f"blend {spec!r} has {len(items)} items; expected 'weight prefix' pairs "
                "(prefixes containing spaces are not supported)"
            )
        pairs = []
        for j in range(0, len(items), 2):
            text, prefix = items[j], items[j + 1]
            try:
                weight = float(text)
            except ValueError:
                raise BlendError(f"blend weight {text!r} (before prefix {prefix!r}) is not a number") from None
            if not math.isfinite(weight):
                raise BlendError(f"blend weight {text!r} for prefix {prefix!r} is not finite")
            if weight < 0:
                raise BlendError(f"blend weight {text!r} for prefix {prefix!r} is negative")
            pairs.append((weight, prefix))
        if sum(w for w, _ in pairs) <= 0:
            raise BlendError(f"blend {spec!r}: the weights sum to 0; at least one must be positive")
    if check_exists:
        for _, prefix in pairs:
            if not IndexedDataset.exists(prefix):
                missing = [p for p in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(p)]
                what = "blend prefix" if len(pairs) > 1 else "data prefix"
                raise FileNotFoundError(f"{what} {prefix!r}: {' and '.join(missing)} not found")
    return pairs


class BlendedDataset:
    """Sample i is `datasets[dataset_index[i]][dataset_sample_index[i]]`, plus the key "dataset_id".

    Args:
        datasets: the component datasets (anything with `len` and integer indexing returning a dict).
        weights: relative weights, one per dataset (normalised here).
        size: samples in the blend.
        impl: the `build_blending_indices` implementation ("auto", "cpp", "numpy").
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, impl: str = "auto") -> None:
        if len(datasets) != len(weights) or not datasets:
            raise BlendError(f"BlendedDataset needs one weight per dataset, got {len(datasets)} and {len(weights)}")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise BlendError(f"BlendedDataset weights must be finite, non-negative, with a positive sum: {list(w)}")
        if size < 1:
            raise BlendError(f"BlendedDataset size must be >= 1, got {size}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size, impl=impl)
        drawn = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (n, ds) in enumerate(zip(drawn, self.datasets)):
            if n > len(ds):
                raise BlendError(f"blend dataset {d} ({ds!r}) has {len(ds)} samples but the blend draws {n} from it")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.size:
            raise IndexError(f"sample {k} out of range for a BlendedDataset of {self.size} samples")
        d = int(self.dataset_index[k])
        sample = dict(self.datasets[d][int(self.dataset_sample_index[k])])
        sample["dataset_id"] = d
        return sample

    def __repr__(self) -> str:
        return f"BlendedDataset(size={self.size}, weights={[round(float(x), 6) for x in self.weights]})"


def build_dataset(
    path: str,
    num_samples: int,
    seq_len: int,
    seed: int,
    cache_dir: str | None = None,
    *,
    split: str = "train",
    vocab_size: int | None = None,
    impl: str = "auto",
) -> GPTDataset | BlendedDataset:
    """A `GPTDataset` for a single prefix, or a `BlendedDataset` of GPTDatasets for a blend spec.

    Each component of a blend gets its expected share of `num_samples` plus 0.5% and one sample of headroom, so
    the greedy blend never runs past its end. Zero-weight components are left out.
    """
    pairs = [(w, p) for w, p in parse_blend(path) if w > 0]
    if len(pairs) == 1:
        prefix = pairs[0][1]
        return GPTDataset(prefix, num_samples, seq_len, seed, cache_dir, split=split, vocab_size=vocab_size, impl=impl)
    total = sum(w for w, _ in pairs)
    datasets = [
        GPTDataset(
            prefix,
            math.ceil(w / total * num_samples * (1 + _MARGIN)) + 1,
            seq_len,
            seed,
            cache_dir,
            split=split,
            vocab_size=vocab_size,
            impl=impl,
        )
        for w, prefix in pairs
    ]
    return BlendedDataset(datasets, [w for w, _ in pairs], num_samples, impl=impl)
