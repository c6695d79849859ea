"""The objective of a run (`--train.objective`): how a packed sample of seq_len + 1 tokens becomes the model's inputs
and labels. Each sample is transformed on its own generator, seeded by (train.seed, the sample's index), so the
batches of a step do not depend on the layout (contract 1) and a resumed run sees what a straight one would.

    clm   next-token prediction: inputs t[:-1], labels t[1:]
    fim   fill-in-the-middle (fim.py) on each document of the packed sample (context level), then next-token
          prediction; the padding a shortened sample ends with is not a label
    mlm   masked LM (mlm.py) over t[:-1]: labels at the selected positions only, and the model runs bidirectionally
          (`causal=False`, the model keyword this objective adds)
    mtp   multi-token prediction (engine/model/mtp.py): next-token samples; the model's extra modules take their
          targets from the labels shifted k positions
    prefix prefix LM (prefix_lm.py): a prefix length P per sample, attended bidirectionally (the model keyword
          `prefix_lengths`, one per row of the batch: `batch_kwargs`), labels only after the prefix

Span corruption and UL2 need model variants and are not objectives of the trainer yet; `span_corruption.py` holds
the T5 transform they will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.objectives.fim import fim_packed
from engine.objectives.mlm import IGNORE_INDEX, mask_tokens
from engine.objectives.prefix_lm import draw_prefix_length, prefix_lm_example

OBJECTIVES = ("clm", "fim", "mlm", "mtp", "prefix")


@dataclass(frozen=True)
class SampleObjective:
    """A per-sample transform `(tokens, index) -> (inputs, labels)` and the model keywords the objective needs."""

    name: str
    seed: int
    tokenizer: Any = field(repr=False)
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    mlm_mask_rate: float = 0.15
    prefix_min_frac: float = 0.0
    prefix_max_frac: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"train.objective {self.name!r} is not one of {'|'.join(OBJECTIVES)}")
        for key in ("fim_rate", "fim_spm_rate", "mlm_mask_rate", "prefix_min_frac", "prefix_max_frac"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"objective.{key} {getattr(self, key)} is outside [0, 1]")
        if self.prefix_min_frac > self.prefix_max_frac:
            raise ValueError(
                f"objective.prefix_min_frac {self.prefix_min_frac} exceeds prefix_max_frac {self.prefix_max_frac}"
            )

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"causal": False} if self.name == "mlm" else {}

    def prefix_length(self, n: int, index: int) -> int:
        """Sample `index`'s prefix length for n inputs (prefix), from its own generator as `__call__`'s."""
        rng = np.random.default_rng([self.seed, index])
        return draw_prefix_length(n, rng, self.prefix_min_frac, self.prefix_max_frac)

    def batch_kwargs(self, indices: list[int], n: int) -> dict[str, np.ndarray]:
        """The per-row model keywords of a batch of these samples with n inputs each (prefix: `prefix_lengths`)."""
        if self.name != "prefix":
            return {}
        return {"prefix_lengths": np.array([self.prefix_length(n, k) for k in indices], dtype=np.int64)}

    def __call__(self, tokens: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.name in ("clm", "mtp"):  # mtp: next-token samples; its extra targets are the labels shifted
            return tokens[:-1], tokens[1:]
        if self.name == "prefix":
            return prefix_lm_example(tokens, self.prefix_length(len(tokens) - 1, index))
        rng = np.random.default_rng([self.seed, index])
        tok = self.tokenizer
        if self.name == "fim":
            pad = tok.fim_pad_id
            out = fim_packed(tokens, tok.eod_id, tok.decode, tok.encode, rng, self.fim_rate, self.fim_spm_rate,
                             tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, pad)  # fmt: skip
            labels = out[1:].copy()
            labels[labels == pad] = IGNORE_INDEX
            return out[:-1], labels
        special = tok.all_special_ids
        return mask_tokens(tokens[:-1], rng, tok.mask_id, tok.vocab_size, special, mask_rate=self.mlm_mask_rate)
