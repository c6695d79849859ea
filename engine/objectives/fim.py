"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle").

With probability `fim_rate` a document's text is cut at two cut points drawn uniformly over its characters (each in
0..len(text), sorted, so the prefix, middle and suffix can each be empty) and the three pieces are encoded separately
and reordered, so a left-to-right model learns to write the middle after seeing both sides:

- PSM: `<PRE> prefix <SUF> suffix <MID> middle`
- SPM: `<PRE> <SUF> suffix <MID> prefix middle`, the paper's SPM variant (its appendix): both sentinels lead, so
  the prefix and middle follow `<MID>` contiguously and the whole document text still reads in order after it.

A transformed document uses SPM with probability `spm_rate`, else PSM. Untransformed documents are plain `encode`.
The sentinel ids are arguments (the tokenizers reserve them as the `fim_prefix/middle/suffix` roles); text never
encodes to them, so `fim_restore` finds the pieces by id without ambiguity.

Document level (`fim_document`) applies before packing. Context level (`fim_packed`) applies to a packed sample:
it is split at EOD tokens, each piece between them is decoded, transformed on its own draw, and the pieces are
rejoined with their EODs. Every transformed piece gains the three sentinels (and BPE pieces may re-encode to other
lengths), so the result is cut back to the sample's length at the end, or right-padded with `pad_id` when it came
out shorter: the paper's context-level FIM, which keeps the sample length fixed so packing is unchanged. The
window's first and last pieces are usually fragments of documents and are transformed like whole ones.
"""

from collections.abc import Callable, Sequence

import numpy as np

Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


def _check_rates(fim_rate: float, spm_rate: float) -> None:
    for name, rate in (("fim_rate", fim_rate), ("spm_rate", spm_rate)):
        if not 0.0 <= rate <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} {rate} is outside [0, 1]")


def _permute(
    text: str, encode: Encode, rng: np.random.Generator, spm_rate: float, pre_id: int, mid_id: int, suf_id: int
) -> list[int]:
    """The FIM form of `text`: two uniform character cut points, then PSM or SPM (see the module docstring)."""
    lo, hi = sorted(int(c) for c in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = (list(encode(t)) for t in (text[:lo], text[lo:hi], text[hi:]))
    if rng.random() < spm_rate:
        return [pre_id, suf_id, *suffix, mid_id, *prefix, *middle]
    return [pre_id, *prefix, suf_id, *suffix, mid_id, *middle]


def fim_document(
    text: str,
    encode: Encode,
    rng: np.random.Generator,
    fim_rate: float,
    spm_rate: float,
    pre_id: int,
    mid_id: int,
    suf_id: int,
) -> list[int]:
    """Token ids of one document, in FIM form with probability `fim_rate` (SPM with probability `spm_rate`), else
    `encode(text)`. The caller appends the EOD, as for any document."""
    _check_rates(fim_rate, spm_rate)
    if rng.random() < fim_rate:
        return _permute(text, encode, rng, spm_rate, pre_id, mid_id, suf_id)
    return list(encode(text))


def fim_packed(
    tokens: np.ndarray,
    eod_id: int,
    decode: Decode,
    encode: Encode,
    rng: np.random.Generator,
    fim_rate: float,
    spm_rate: float,
    pre_id: int,
    mid_id: int,
    suf_id: int,
    pad_id: int,
) -> np.ndarray:
    """Context-level FIM of one packed sample (1-D): each non-empty piece between EOD tokens is transformed with
    probability `fim_rate`; the result has the dtype and length of `tokens` (cut at the end, or right-padded with
    `pad_id`). A piece whose text does not survive decoding (a fragment cut inside a multi-byte character decodes
    to U+FFFD) is left as it is, so a transformed piece always holds the exact text."""
    _check_rates(fim_rate, spm_rate)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"fim_packed takes one sample of shape (seq,), got shape {tokens.shape}")
    out: list[int] = []
    start = 0
    for end in [*np.flatnonzero(tokens == eod_id).tolist(), len(tokens)]:
        piece = tokens[start:end]
        if len(piece) and rng.random() < fim_rate:
            ids = piece.tolist()
            text = decode(ids)
            if "\ufffd" in text and list(encode(text)) != ids:
                out += ids
            else:
                out += _permute(text, encode, rng, spm_rate, pre_id, mid_id, suf_id)
        else:
            out += piece.tolist()
        if end < len(tokens):
            out.append(eod_id)
        start = end + 1
    out = out[: len(tokens)] + [pad_id] * (len(tokens) - len(out))
    return np.asarray(out, dtype=tokens.dtype)


def fim_restore(tokens: Sequence[int], pre_id: int, mid_id: int, suf_id: int, decode: Decode) -> str:
    """The document text behind one document's ids (without its EOD), in PSM, SPM or plain form: the inverse of the
    transforms above, used by tests and to splice a generated middle back in (pass prompt + generated middle)."""
    ids = [int(t) for t in tokens]
    if not ids or ids[0] != pre_id:
        return decode(ids)
    try:
        suf = ids.index(suf_id, 1)
        mid = ids.index(mid_id, suf + 1)
    except ValueError:
        raise ValueError("FIM tokens start with the prefix sentinel but lack a suffix and then a middle one") from None
    if suf == 1:  # SPM (or PSM with an empty prefix, which reads the same): prefix and middle follow <MID>
        return decode(ids[mid + 1 :]) + decode(ids[2:mid])
    return decode(ids[1:suf]) + decode(ids[mid + 1 :]) + decode(ids[suf + 1 : mid])
