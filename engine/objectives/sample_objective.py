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
    span  T5 span corruption for the encoder-decoder (`--model.arch t5`; ul2.py): inputs are the encoder's seq_len
          tokens, labels the decoder's targets; the transform returns a third item, the per-sample model keyword
          `decoder_inputs` (the targets shifted right behind the start id), which the trainer stacks per batch
    ul2   UL2's mixture of denoisers (ul2.py), the same shapes and keyword as span

span and ul2 read longer windows than seq_len + 1 tokens: `window_length` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from engine.objectives.fim import fim_packed
from engine.objectives.mlm import IGNORE_INDEX, mask_tokens
from engine.objectives.prefix_lm import draw_prefix_length, prefix_lm_example
from engine.objectives.ul2 import MODE_TOKENS, Denoiser, DenoiserMixture, ul2_weights

OBJECTIVES = ("clm", "fim", "mlm", "mtp", "prefix", "span", "ul2")
ENCODER_DECODER_OBJECTIVES = ("span", "ul2")  # the objectives of model.arch t5, and only they


@dataclass(frozen=True)
class SampleObjective:
    """A per-sample transform `(tokens, index) -> (inputs, labels)` (span, ul2: `(inputs, labels, per-sample model
    keywords)`) and the model keywords the objective needs."""

    name: str
    seed: int
    tokenizer: Any = field(repr=False)
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    mlm_mask_rate: float = 0.15
    prefix_min_frac: float = 0.0
    prefix_max_frac: float = 1.0
    seq_len: int = 0  # span, ul2: the encoder's input length (model.seq_len)
    span_noise_density: float = 0.15
    span_mean_length: float = 3.0
    ul2_r_rate: float = 0.4
    ul2_x_rate: float = 0.4
    ul2_s_rate: float = 0.2
    decoder_multiple: int = 1  # span, ul2: the decoder length's multiple (samples.decoder_multiple: tp under sp, 2 cp)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"train.objective {self.name!r} is not one of {'|'.join(OBJECTIVES)}")
        for key in ("fim_rate", "fim_spm_rate", "mlm_mask_rate", "prefix_min_frac", "prefix_max_frac",
                    "span_noise_density"):  # fmt: skip
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"objective.{key} {getattr(self, key)} is outside [0, 1]")
        if self.prefix_min_frac > self.prefix_max_frac:
            raise ValueError(
                f"objective.prefix_min_frac {self.prefix_min_frac} exceeds prefix_max_frac {self.prefix_max_frac}"
            )
        if self.name in ENCODER_DECODER_OBJECTIVES:
            self.mixture  # noqa: B018  (built now: its bad input fails at setup, not in the first batch)

    @cached_property
    def mixture(self) -> DenoiserMixture | None:
        """span, ul2: the denoiser(s) and the fixed sample shapes (ul2.py); None for the other objectives."""
        if self.name not in ENCODER_DECODER_OBJECTIVES:
            return None
        tok = self.tokenizer
        sentinels, modes = getattr(tok, "sentinel_ids", ()), getattr(tok, "mode_ids", {})
        if not sentinels or (self.name == "ul2" and not modes):
            raise ValueError(f"train.objective {self.name} needs a tokenizer with sentinel ids (T5's extra ids) and "
                             f"UL2's mode tokens; {tok!r} has none: use data.tokenizer byte, bpe or a tokenizer.json")
        if self.name == "span":
            if not 0.0 < self.span_noise_density < 1.0 or not self.span_mean_length >= 1.0:
                raise ValueError(f"objective.span_noise_density {self.span_noise_density} must be in (0, 1) and "
                                 f"objective.span_mean_length {self.span_mean_length} >= 1")
            denoisers = [(Denoiser("R", self.span_mean_length, self.span_noise_density), 1.0)]
        else:
            denoisers = ul2_weights(self.ul2_r_rate, self.ul2_x_rate, self.ul2_s_rate)
        mode_ids = None if self.name == "span" else {p: modes[t] for p, t in MODE_TOKENS.items()}
        return DenoiserMixture(self.seq_len, denoisers, sentinels, tok.eod_id, tok.bos_id, tok.pad_id, mode_ids,
                               self.decoder_multiple)  # fmt: skip

    @property
    def window_length(self) -> int:
        """Tokens each sample of the stream must hold: seq_len + 1 (clm-like objectives), or the denoisers' window."""
        return self.seq_len + 1 if self.mixture is None else self.mixture.window_length

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

    def __call__(self, tokens: np.ndarray, index: int) -> tuple:
        """(inputs, labels) of sample `index`; span and ul2 add a third item, {"decoder_inputs": array}."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.name in ("clm", "mtp"):  # mtp: next-token samples; its extra targets are the labels shifted
            return tokens[:-1], tokens[1:]
        if self.name == "prefix":
            return prefix_lm_example(tokens, self.prefix_length(len(tokens) - 1, index))
        rng = np.random.default_rng([self.seed, index])
        if self.mixture is not None:
            inputs, labels, decoder_inputs = self.mixture(tokens, rng)
            return inputs, labels, {"decoder_inputs": decoder_inputs}
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
