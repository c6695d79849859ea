"""Gopher's quality and repetition filters (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
from Training Gopher", arXiv:2112.11446, App. A, Table A1), as datatrove implements them and FineWeb runs them.

Every threshold is a field; `None` switches a rule off. A rule removes a document when its statistic is strictly
beyond the threshold (datatrove's comparisons), so a document exactly at a threshold is kept.
"""

import re
from dataclasses import dataclass, field

import numpy as np

from engine.data.curation.steps import DocumentStep, register_step
from engine.data.curation.words import is_symbol_token, split_words

PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile(r"\n+")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, their characters): the first occurrence is not a duplicate."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class WordGrams:
    """Word n-grams of one text as integer ids (equal ids: equal n-grams) and the character length of every n-gram
    from prefix sums of word lengths; replaces string joins in the scans below. The ids of n-grams are built from
    those of (n-1)-grams and the next word, one 1-D np.unique per n."""

    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        self.word_ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, count=len(words))
        self.vocab_size = max(len(vocab), 1)
        self.chars = np.concatenate([[0], np.cumsum([len(w) for w in words])]).astype(np.int64)
        self._ids = {1: self.word_ids}

    def __len__(self) -> int:
        return len(self.word_ids)

    def ids(self, n: int) -> np.ndarray:
        """The id of the n-gram at each position, ids dense from 0."""
        if n not in self._ids:
            previous = self.ids(n - 1)[:-1]  # dense ids below len(words), so the key below fits in int64
            key = previous * self.vocab_size + self.word_ids[n - 1 :]
            self._ids[n] = np.unique(key, return_inverse=True)[1].reshape(-1)
        return self._ids[n]

    def joined_length(self, start: int, n: int) -> int:
        """Characters of words[start:start+n] joined without separators."""
        return int(self.chars[start + n] - self.chars[start])


def top_ngram_chars(words: list[str] | WordGrams, n: int) -> int:
    """Characters covered by the most frequent word n-gram: len(' '.join(ngram)) x its count; among equally frequent
    n-grams the one that occurs first (Counter.most_common's choice in datatrove)."""
    grams = words if isinstance(words, WordGrams) else WordGrams(words)
    if len(grams) < n:
        return 0
    ids = grams.ids(n)
    counts = np.bincount(ids)
    start = int(np.flatnonzero(counts[ids] == counts.max())[0])
    return (grams.joined_length(start, n) + n - 1) * int(counts.max())


def duplicated_ngram_chars(words: list[str] | WordGrams, n: int) -> int:
    """Characters in word n-grams that repeat an earlier n-gram, scanning left to right and jumping past a repeat so
    overlapping repeats are not counted twice (datatrove's `find_all_duplicate`; an n-gram's characters counted
    without spaces). An n-gram jumped over is not recorded as seen."""
    grams = words if isinstance(words, WordGrams) else WordGrams(words)
    if len(grams) < n:
        return 0
    ids = grams.ids(n)
    if np.bincount(ids).max() < 2:
        return 0  # no n-gram occurs twice: nothing to scan for (most prose)
    seen: set[int] = set()
    chars = i = 0
    ids = ids.tolist()
    while i < len(ids):
        if ids[i] in seen:
            chars += grams.joined_length(i, n)
            i += n
        else:
            seen.add(ids[i])
            i += 1
    return chars


@register_step
@dataclass
class GopherRepetitionFilter(DocumentStep):
    """Removes documents with repeated lines, paragraphs or n-grams (Gopher Table A1 thresholds)."""

    name = "gopher_repetition"
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    def __post_init__(self) -> None:
        # TOML table keys are strings: {"2" = 0.2} -> {2: 0.2}
        self.top_n_grams = {int(k): float(v) for k, v in self.top_n_grams.items()}
        self.dup_n_grams = {int(k): float(v) for k, v in self.dup_n_grams.items()}

    def process(self, text: str) -> tuple[str, str | None]:
        if not text.strip():
            return text, "empty"
        paragraphs = PARAGRAPH_RE.split(text.strip())
        n_dup, dup_chars = duplicates(paragraphs)
        if self.dup_para_frac is not None and n_dup / len(paragraphs) > self.dup_para_frac:
            return text, "dup_para_frac"
        if self.dup_para_char_frac is not None and dup_chars / len(text) > self.dup_para_char_frac:
            return text, "dup_para_char_frac"
        lines = LINES_RE.split(text)
        n_dup, dup_chars = duplicates(lines)
        if self.dup_line_frac is not None and n_dup / len(lines) > self.dup_line_frac:
            return text, "dup_line_frac"
        if self.dup_line_char_frac is not None and dup_chars / len(text) > self.dup_line_char_frac:
            return text, "dup_line_char_frac"
        words = WordGrams(split_words(text))
        for n, frac in sorted(self.top_n_grams.items()):
            if top_ngram_chars(words, n) / len(text) > frac:
                return text, f"top_{n}_gram"
        for n, frac in sorted(self.dup_n_grams.items()):
            if duplicated_ngram_chars(words, n) / len(text) > frac:
                return text, f"duplicated_{n}_n_grams"
        return text, None


@register_step
@dataclass
class GopherQualityFilter(DocumentStep):
    """Removes documents that do not look like prose: length, word length, symbols, bullets, ellipses, alphabetic
    words and stop words (Gopher App. A; datatrove `GopherQualityFilter` defaults). Word counts exclude tokens made
    only of punctuation; the stop-word check is case-sensitive, as in datatrove."""

    name = "gopher_quality"
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))

    def process(self, text: str) -> tuple[str, str | None]:
        words = split_words(text)
        real_words = [w for w in words if not is_symbol_token(w)]
        n = len(real_words)
        if self.min_doc_words is not None and n < self.min_doc_words:
            return text, "gopher_short_doc"
        if n == 0:
            return text, "gopher_short_doc"
        if self.max_doc_words is not None and n > self.max_doc_words:
            return text, "gopher_long_doc"
        mean_len = sum(len(w) for w in real_words) / n
        if self.min_avg_word_length is not None and mean_len < self.min_avg_word_length:
            return text, "gopher_below_avg_threshold"
        if self.max_avg_word_length is not None and mean_len > self.max_avg_word_length:
            return text, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio is not None:
            if text.count("#") / len(words) > self.max_symbol_word_ratio:
                return text, "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / len(words) > self.max_symbol_word_ratio:
                return text, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
        if self.max_bullet_lines_ratio is not None and bullets / len(lines) > self.max_bullet_lines_ratio:
            return text, "gopher_too_many_bullets"
        ellipses = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if self.max_ellipsis_lines_ratio is not None and ellipses / len(lines) > self.max_ellipsis_lines_ratio:
            return text, "gopher_too_many_end_ellipsis"
        alpha = sum(w.isalpha() or any(c.isalpha() for c in w) for w in words)  # isalpha(): the common case, fast
        if self.min_alpha_words_ratio is not None and alpha / len(words) < self.min_alpha_words_ratio:
            return text, "gopher_below_alpha_threshold"
        if self.min_stop_words is not None and len(set(self.stop_words) & set(words)) < self.min_stop_words:
            return text, "gopher_enough_stop_words"
        return text, None
