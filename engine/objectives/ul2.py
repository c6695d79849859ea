"""Encoder-decoder denoising samples: T5 span corruption (`--train.objective span`) and UL2's mixture of denoisers
(`--train.objective ul2`; Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", arXiv 2205.05131, sec. 3.1).

A denoiser turns a window of raw tokens into an encoder input and the decoder's targets:

- span (mean span length mu, density r; span_corruption.py): T5's `random_spans_noise_mask` over `raw` tokens; the
  input keeps the other tokens with one sentinel per noise span, the targets list each sentinel and its span; both
  end with EOS. `raw` is chosen (`filled_lengths`) so that the input has exactly the encoder's length: no padding.
- sequential (S): the encoder reads the first tokens of the window (then EOS), the decoder continues the text: the
  next L tokens, then EOS, L uniform in [1, seq_len // 4] (the prefix fills the encoder, so the split point is
  drawn on the target side).

UL2 groups its denoisers by paradigm, each announced by a mode token prepended to the encoder input: R (regular:
mu 3 and 8 at r 0.15) with [NLU], X (extreme: mu 3 and 8 at r 0.5, mu 64 at r 0.15 and 0.5) with [NLG], S with
[S2S]; this is the seven-denoiser mixture of the paper's final objective as we read it. A sample's paradigm is drawn
with the rates `[objective] ul2_r_rate / ul2_x_rate / ul2_s_rate` (normalised by their sum), then one of the
paradigm's denoisers uniformly. `span` is the single denoiser (mu, r) = ([objective] span_mean_length,
span_noise_density), 3 and 0.15 by default (T5's), without a mode token.

Every sample has the same shapes whatever its denoiser: the encoder input exactly `seq_len` tokens; labels (the targets
padded with the ignore index) and decoder inputs (the targets shifted right behind the start id, padded with the pad id)
`decoder_length` tokens, the longest targets of the mixture's denoisers (rounded up to a multiple of `decoder_multiple`:
sequence parallelism splits the decoder's sequence over the tp ranks, context parallelism into 2 cp chunks); each
denoiser reads the first `raw` tokens of a window of `window_length` (the most any of them needs). The loss-bearing
tokens are the targets, EOS included. A denoiser with more spans than the tokenizer has sentinels is refused when the
mixture is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.objectives.mlm import IGNORE_INDEX
from engine.objectives.span_corruption import filled_lengths, mask_counts, random_spans_noise_mask, span_corrupt

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass(frozen=True)
class Denoiser:
    """One denoising task: paradigm "R" or "X" (span corruption with `mean_span` and `density`) or "S"."""

    paradigm: str
    mean_span: float = 0.0
    density: float = 0.0

    def __str__(self) -> str:
        if self.paradigm == "S":
            return "S"
        return f"{self.paradigm}(mean span {self.mean_span:g}, density {self.density:g})"


UL2_DENOISERS: dict[str, tuple[Denoiser, ...]] = {
    "R": (Denoiser("R", 3.0, 0.15), Denoiser("R", 8.0, 0.15)),
    "X": (Denoiser("X", 3.0, 0.5), Denoiser("X", 8.0, 0.5), Denoiser("X", 64.0, 0.15), Denoiser("X", 64.0, 0.5)),
    "S": (Denoiser("S"),),
}


def ul2_weights(r_rate: float, x_rate: float, s_rate: float) -> list[tuple[Denoiser, float]]:
    """UL2's denoisers with their sampling probabilities: each paradigm's rate (normalised by the rates' sum) split
    evenly over its denoisers."""
    rates = {"R": r_rate, "X": x_rate, "S": s_rate}
    for name, rate in rates.items():
        if not 0.0 <= rate <= 1.0:  # also rejects NaN
            raise ValueError(f"objective.ul2_{name.lower()}_rate {rate} is outside [0, 1]")
    total = sum(rates.values())
    if total <= 0:
        raise ValueError("objective.ul2_r_rate, ul2_x_rate and ul2_s_rate are all 0: give one paradigm a rate")
    return [(d, rates[p] / total / len(ds)) for p, ds in UL2_DENOISERS.items() for d in ds]


class DenoiserMixture:
    """Fixed-shape encoder-decoder samples from windows of raw tokens (see the module docstring).

    `denoisers`: (denoiser, probability) pairs (probabilities summing to 1; those of probability 0 never drawn and
    not sized for); `mode_ids`: the mode token of each paradigm (UL2), or None for none (span)."""

    def __init__(
        self,
        seq_len: int,
        denoisers: Sequence[tuple[Denoiser, float]],
        sentinel_ids: Sequence[int],
        eos_id: int,
        start_id: int,
        pad_id: int,
        mode_ids: dict[str, int] | None = None,
        decoder_multiple: int = 1,
    ) -> None:
        active = [(d, p) for d, p in denoisers if p > 0]
        if not active or not np.isclose(sum(p for _, p in active), 1.0):
            raise ValueError(f"denoiser probabilities must be >= 0 and sum to 1, got {[p for _, p in denoisers]}")
        self.denoisers, self.probs = [d for d, _ in active], np.array([p for _, p in active])
        self.seq_len, self.mode_ids = seq_len, mode_ids
        self.sentinels = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id, self.start_id, self.pad_id = eos_id, start_id, pad_id
        body = seq_len - (mode_ids is not None)  # the encoder's tokens after the mode token
        self.max_continuation = max(1, seq_len // 4)  # S: the most tokens the decoder continues with
        self.raw, targets = [], []
        for d in self.denoisers:
            if d.paradigm == "S":
                if body < 2:
                    raise ValueError(f"model.seq_len {seq_len} is too short for the S denoiser")
                self.raw.append(body - 1 + self.max_continuation)
                targets.append(self.max_continuation + 1)
                continue
            try:
                raw, n_targets = filled_lengths(body, d.density, d.mean_span)
            except ValueError as e:
                raise ValueError(f"denoiser {d} with model.seq_len {seq_len}: {e}") from None
            spans = mask_counts(raw, d.density, d.mean_span)[1]
            if spans > len(self.sentinels):
                raise ValueError(
                    f"denoiser {d} makes {spans} spans of model.seq_len {seq_len} tokens, more than the tokenizer's "
                    f"{len(self.sentinels)} sentinel ids: shorten model.seq_len or lengthen the spans"
                )
            self.raw.append(raw)
            targets.append(n_targets)
        # Padding past the longest targets changes no loss: the decoder is causal and the labels there are ignored.
        self.window_length = max(self.raw)
        self.decoder_length = -(-max(targets) // decoder_multiple) * decoder_multiple

    def draw(self, rng: np.random.Generator) -> int:
        """The index (into `self.denoisers`) of a sample's denoiser."""
        return int(rng.choice(len(self.denoisers), p=self.probs)) if len(self.denoisers) > 1 else 0

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(encoder inputs (seq_len,), labels (decoder_length,), decoder inputs (decoder_length,)) of a window of at
        least `window_length` tokens; the denoiser and its mask are drawn from `rng`."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) < self.window_length:
            raise ValueError(f"a denoising window needs {self.window_length} tokens, got shape {tokens.shape}")
        k = self.draw(rng)
        d, raw = self.denoisers[k], self.raw[k]
        if d.paradigm == "S":
            prefix = raw - self.max_continuation
            n = int(rng.integers(1, self.max_continuation + 1))
            inputs = np.append(tokens[:prefix], self.eos_id)
            targets = np.append(tokens[prefix : prefix + n], self.eos_id)
        else:
            mask = random_spans_noise_mask(raw, d.density, d.mean_span, rng)
            inputs, targets = span_corrupt(tokens[:raw], mask, self.sentinels, self.eos_id)
        if self.mode_ids is not None:
            inputs = np.concatenate(([self.mode_ids[d.paradigm]], inputs))
        labels = np.full(self.decoder_length, IGNORE_INDEX, dtype=np.int64)
        labels[: len(targets)] = targets
        decoder_inputs = np.full(self.decoder_length, self.pad_id, dtype=np.int64)
        decoder_inputs[0] = self.start_id
        decoder_inputs[1 : len(targets)] = targets[:-1]
        return inputs, labels, decoder_inputs
