"""Exact-substring dedup (Lee et al. 2022, ExactSubstr): cut from each document the byte spans that repeat, with at
least `min_length` bytes, text that occurs earlier in the corpus (corpus order: inputs in the order given, then line
order), keeping the first occurrence. Spans are removed, not documents; a document left with no text is removed.

Units are UTF-8 bytes: `min_length = 50` bytes is about 10 English words. Lee et al. use 50 GPT-2 tokens, about
200 bytes of English text (~4 bytes per token), so `min_length = 200` approximates their setting.

The step runs in the three stages (stages.py) like a dedup step: stage 1 stores the text as it reaches the step;
stage 2 (`find_cuts`) builds the suffix array over the corpus, in chunks of whole documents that fit
`memory_budget_mb`; stage 3 (`apply_cuts`) cuts the spans. Because stage 3 cuts the text that the last step left, the
step must be the last of its pipeline.
"""

from dataclasses import dataclass

import numpy as np

from engine.data.curation.steps import DedupStep, register_step
from engine.data.curation.suffix_array import CPP_BYTES_PER_INPUT_BYTE, chunks, repeated_mask

ENCODING_ERRORS = "surrogatepass"  # JSON may hold lone surrogates; keep them byte for byte


@dataclass
class Cuts:
    """Stage 2's result for the documents of one call: cut [start, end) byte ranges (document index, start, end),
    the documents left empty, and for each of those the earlier document that its first bytes repeat."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    emptied: np.ndarray
    emptied_source: np.ndarray


@register_step
@dataclass
class SubstringDedup(DedupStep):
    """Suffix-array exact-substring dedup over UTF-8 bytes. `memory_budget_mb` bounds the suffix-array work memory
    (32 bytes per input byte); larger inputs are split into chunks of whole documents in corpus order and a
    repeat whose two occurrences fall in different chunks is not found."""

    name = "substring_dedup"
    reason = "substring_duplicate"
    cuts_spans = True  # stages.py: stage 1 keeps the text, stage 2 calls find_cuts, stage 3 apply_cuts
    min_length: int = 50
    memory_budget_mb: int = 4096
    impl: str = "auto"

    def __post_init__(self) -> None:
        for key in ("min_length", "memory_budget_mb"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.impl not in ("auto", "cpp", "numpy"):
            raise ValueError(f"impl must be auto, cpp or numpy, got {self.impl!r}")

    def keys(self, texts: list[str]) -> np.ndarray:
        """Each text's UTF-8 length (stage 1 stores the bytes themselves with `text_bytes`)."""
        return np.asarray([len(t.encode("utf-8", ENCODING_ERRORS)) for t in texts], dtype=np.uint64).reshape(-1, 1)

    @staticmethod
    def text_bytes(texts: list[str]) -> np.ndarray:
        return np.frombuffer("".join(texts).encode("utf-8", ENCODING_ERRORS), dtype=np.uint8)

    def chunk_bytes(self) -> int:
        return max(1, self.memory_budget_mb * 2**20 // CPP_BYTES_PER_INPUT_BYTE)

    def find_cuts(self, data: np.ndarray, lengths: np.ndarray) -> Cuts:
        """The spans to cut from documents of `lengths` whose bytes lie end to end in `data`, chunk by chunk."""
        lengths = np.asarray(lengths, dtype=np.int64).ravel()
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        docs, starts, ends, first_source = [], [], [], np.full(len(lengths), -1, dtype=np.int64)
        for lo, hi in chunks(lengths, self.chunk_bytes()):
            mask, first = repeated_mask(data[offsets[lo] : offsets[hi]], lengths[lo:hi], self.min_length, self.impl)
            first_source[lo:hi] = np.where(first >= 0, first + lo, -1)
            edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
            run_start = np.flatnonzero(edges == 1) + offsets[lo]
            run_end = np.flatnonzero(edges == -1) + offsets[lo]
            # a run of cut bytes can continue from the end of one document into the start of the next: split it
            doc = np.searchsorted(offsets, run_start, side="right") - 1
            doc_end = np.searchsorted(offsets, run_end - 1, side="right") - 1
            for d, s, e, d2 in zip(doc.tolist(), run_start.tolist(), run_end.tolist(), doc_end.tolist()):
                for k in range(d, d2 + 1):
                    a, b = max(s, offsets[k]) - offsets[k], min(e, offsets[k + 1]) - offsets[k]
                    if b > a:
                        docs.append(k)
                        starts.append(a)
                        ends.append(b)
        doc = np.asarray(docs, dtype=np.int64)
        start, end = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        cut = np.bincount(doc, weights=end - start, minlength=len(lengths)).astype(np.int64)
        emptied = np.flatnonzero((cut == lengths) & (lengths > 0))
        return Cuts(doc, start, end, emptied, first_source[emptied])


def apply_cuts(text: str, ranges: list[tuple[int, int]]) -> str:
    """`text` without the UTF-8 byte ranges [start, end) (sorted, disjoint, on character boundaries)."""
    raw = text.encode("utf-8", ENCODING_ERRORS)
    kept, at = [], 0
    for start, end in ranges:
        kept.append(raw[at:start])
        at = end
    kept.append(raw[at:])
    return b"".join(kept).decode("utf-8", ENCODING_ERRORS)
