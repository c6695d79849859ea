"""Gopher's quality and repetition filters (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
from Training Gopher", arXiv:2112.11446, App. A, Table A1), as datatrove implements them and FineWeb runs them.

Every threshold is a field; `None` switches a rule off. A rule removes a document when its statistic is strictly
beyond the threshold (datatrove's comparisons), so a document exactly at a threshold is kept.
"""

import re
from collections import Counter
from dataclasses import dataclass, field

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


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram: len(' '.join(ngram)) x its count."""
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters in word n-grams that repeat an earlier n-gram, scanning left to right and jumping past a repeat so
    overlapping repeats are not counted twice (datatrove's `find_all_duplicate`; n-grams joined without spaces)."""
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
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
        words = split_words(text)
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
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        if self.min_alpha_words_ratio is not None and alpha / len(words) < self.min_alpha_words_ratio:
            return text, "gopher_below_alpha_threshold"
        if self.min_stop_words is not None and len(set(self.stop_words) & set(words)) < self.min_stop_words:
            return text, "gopher_enough_stop_words"
        return text, None
