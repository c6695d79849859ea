"""Gopher quality and repetition rules at their thresholds (kept) and just past them (removed, with the reason).
Each rule is checked alone (the others switched off) on text built to hit the threshold exactly."""

import random
from collections import Counter

import pytest

from engine.data.curation.gopher import (
    GopherQualityFilter,
    GopherRepetitionFilter,
    duplicated_ngram_chars,
    top_ngram_chars,
)

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


def words(n: int, stop: bool = True) -> list[str]:
    """n distinct-ish five-letter-average words, the first two of them stop words."""
    out = ["the", "and"] if stop else []
    i = 0
    while len(out) < n:
        out.append(WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else chr(97 + i // len(WORDS) % 26)))
        i += 1
    return out[:n]


def only(**rules) -> GopherQualityFilter:
    off = dict.fromkeys(
        (
            "min_doc_words max_doc_words min_avg_word_length max_avg_word_length max_symbol_word_ratio "
            "max_bullet_lines_ratio max_ellipsis_lines_ratio min_alpha_words_ratio min_stop_words"
        ).split()
    )
    return GopherQualityFilter(**{**off, **rules})


def reason(step, text):
    return step.process(text)[1]


def test_default_quality_keeps_prose_and_names_the_rule():
    prose = " ".join(words(60)) + "."
    assert reason(GopherQualityFilter(), prose) is None
    assert reason(GopherQualityFilter(), " ".join(words(49))) == "gopher_short_doc"


@pytest.mark.parametrize("n,expected", [(49, "gopher_short_doc"), (50, None), (51, None)])
def test_min_words(n, expected):
    assert reason(only(min_doc_words=50), " ".join(words(n)) + " .") == expected  # '.' is not a word


def test_max_words():
    step = only(max_doc_words=100_000)
    assert reason(step, "word " * 100_000) is None
    assert reason(step, "word " * 100_001) == "gopher_long_doc"


@pytest.mark.parametrize(
    "lengths,expected",
    [
        ([3] * 10, None),  # mean 3.0: at the minimum
        ([3] * 9 + [2], "gopher_below_avg_threshold"),  # 2.9
        ([10] * 10, None),  # mean 10.0: at the maximum
        ([10] * 9 + [11], "gopher_above_avg_threshold"),  # 10.1
    ],
)
def test_mean_word_length(lengths, expected):
    text = " ".join("x" * n for n in lengths)
    assert reason(only(min_avg_word_length=3, max_avg_word_length=10), text) == expected


@pytest.mark.parametrize("hashes,expected", [(10, None), (11, "gopher_too_many_hashes")])
def test_hash_ratio(hashes, expected):
    # every '#' is a token of its own: ratio = hashes / (90 words + hashes); 10/100 = 0.1 is the threshold
    text = " ".join(words(90)) + " #" * hashes
    assert reason(only(max_symbol_word_ratio=0.1), text) == expected


@pytest.mark.parametrize("ellipses,expected", [(10, None), (11, "gopher_too_many_ellipsis")])
def test_ellipsis_ratio(ellipses, expected):
    # an ellipsis '...' is three '.' tokens: ratio = e / (70 words + 3e), exactly 10/100 at e = 10
    text = " ".join(words(70)) + " ..." * ellipses
    assert reason(only(max_symbol_word_ratio=0.1), text) == expected


@pytest.mark.parametrize("bullets,expected", [(9, None), (10, "gopher_too_many_bullets")])
def test_bullet_lines(bullets, expected):
    lines = ["- " + " ".join(words(5)) for _ in range(bullets)] + [" ".join(words(5))] * (10 - bullets)
    assert reason(only(max_bullet_lines_ratio=0.9), "\n".join(lines)) == expected  # 0.9 kept, 1.0 removed


@pytest.mark.parametrize("ending,expected", [(3, None), (4, "gopher_too_many_end_ellipsis")])
def test_ellipsis_lines(ending, expected):
    lines = [" ".join(words(5)) + "…" for _ in range(ending)] + [" ".join(words(5))] * (10 - ending)
    assert reason(only(max_ellipsis_lines_ratio=0.3), "\n".join(lines)) == expected


@pytest.mark.parametrize("numbers,expected", [(20, None), (21, "gopher_below_alpha_threshold")])
def test_alphabetic_words(numbers, expected):
    text = " ".join(words(100 - numbers) + ["1234"] * numbers)  # 80/100 alphabetic is the threshold
    assert reason(only(min_alpha_words_ratio=0.8), text) == expected


@pytest.mark.parametrize("stop,expected", [(["the"], "gopher_enough_stop_words"), (["the", "of"], None)])
def test_stop_words(stop, expected):
    text = " ".join(words(20, stop=False) + stop + stop)
    assert reason(only(min_stop_words=2), text) == expected


def rep_only(**rules) -> GopherRepetitionFilter:
    off = dict.fromkeys(("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"))
    return GopherRepetitionFilter(**{**off, "top_n_grams": {}, "dup_n_grams": {}, **rules})


def unique_line(i: int, n: int = 6) -> str:
    return " ".join(f"{w}{i}" for w in WORDS[:n])


@pytest.mark.parametrize("dups,expected", [(3, None), (4, "dup_line_frac")])
def test_duplicate_line_fraction(dups, expected):
    lines = [unique_line(i) for i in range(6)] + ["same line"] * (dups + 1)  # 3/10 = 0.3 kept, 4/11 removed
    assert reason(rep_only(dup_line_frac=0.3), "\n".join(lines)) == expected


def exact_length(prefix: str, total: int) -> str:
    """`prefix` plus one filler word bringing the text to exactly `total` characters."""
    pad = total - len(prefix) - 1
    assert pad >= 1
    return prefix + " " + "q" * pad


@pytest.mark.parametrize("dup_chars,expected", [(40, None), (41, "dup_line_char_frac")])
def test_duplicate_line_char_fraction(dup_chars, expected):
    line = "d" * dup_chars
    text = exact_length(f"{unique_line(0)}\n{line}\n{line}\n", 200)  # 40 / 200 = 0.2 is the threshold
    assert reason(rep_only(dup_line_char_frac=0.2), text) == expected


@pytest.mark.parametrize("dups,expected", [(3, None), (4, "dup_para_frac")])
def test_duplicate_paragraph_fraction(dups, expected):
    paras = [unique_line(i) for i in range(6)] + ["same"] * (dups + 1)  # 3/10 = 0.3 kept, 4/11 removed
    assert reason(rep_only(dup_para_frac=0.3), "\n\n".join(paras)) == expected


@pytest.mark.parametrize("dup_chars,expected", [(40, None), (41, "dup_para_char_frac")])
def test_duplicate_paragraph_char_fraction(dup_chars, expected):
    para = "p" * dup_chars
    text = exact_length(f"{unique_line(0)}\n\n{para}\n\n{para}\n\n", 200)
    assert reason(rep_only(dup_para_char_frac=0.2), text) == expected


@pytest.mark.parametrize("total,expected", [(200, None), (199, "top_2_gram")])
def test_top_2_gram(total, expected):
    # "ab cd" (5 chars) 8 times = 40 chars: 40/200 = 0.20 is the threshold (kept), 40/199 is past it
    text = exact_length(" ".join(f"ab cd u{i}" for i in range(8)), total)
    assert reason(rep_only(top_n_grams={2: 0.2}), text) == expected


@pytest.mark.parametrize("total,expected", [(200, None), (199, "duplicated_5_n_grams")])
def test_duplicated_5_grams(total, expected):
    # the repeated 5-gram covers 30 characters (words joined without spaces): 30/200 = 0.15 is the threshold
    gram = "aaaaaa bbbbbb cccccc dddddd eeeeee"
    text = exact_length(f"{gram} {unique_line(0)} {gram}", total)
    assert reason(rep_only(dup_n_grams={5: 0.15}), text) == expected


def test_default_repetition_keeps_prose_and_removes_a_repeated_page():
    prose = "\n".join(unique_line(i, 12) + "." for i in range(10))
    assert reason(GopherRepetitionFilter(), prose) is None
    assert reason(GopherRepetitionFilter(), "\n".join([unique_line(0)] * 5)) == "dup_line_frac"
    assert reason(GopherRepetitionFilter(), "") == "empty"


def test_ngram_character_counts():
    words = "ab cd ef gh ij kl ab cd ef gh ij kl".split()
    # the repeat starting at the 7th word is counted once (10 chars) and the scan jumps past it; the n-gram starting
    # at 'kl' (a repeat too, had the scan moved one word) is not reached
    assert duplicated_ngram_chars(words, 5) == 10
    assert duplicated_ngram_chars("ab cd ab cd ab cd".split(), 2) == 8  # 'abcd' twice after its first occurrence
    assert top_ngram_chars("ab cd ab cd ef".split(), 2) == len("ab cd") * 2
    assert top_ngram_chars(["one"], 2) == 0
    assert top_ngram_chars("aaaa b c d".split(), 2) == len("aaaa b")  # a tie goes to the first n-gram
    assert duplicated_ngram_chars("a b c d e f a b c d".split(), 5) == 0


def test_ngram_counts_match_string_reference():
    """The integer-id n-gram scans equal datatrove's string-based definitions on random repetitive word lists."""

    def top_reference(ws, n):
        grams = Counter(" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1))
        return len(grams.most_common(1)[0][0]) * grams.most_common(1)[0][1] if grams else 0

    def duplicated_reference(ws, n):
        seen, chars, i = set(), 0, 0
        while i < len(ws) - n + 1:
            if tuple(ws[i : i + n]) in seen:
                chars, i = chars + len("".join(ws[i : i + n])), i + n
            else:
                seen.add(tuple(ws[i : i + n]))
                i += 1
        return chars

    rng = random.Random(0)
    for _ in range(300):
        vocab = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 6))]
        ws = rng.choices(vocab, k=rng.randint(0, 40))
        assert [top_ngram_chars(ws, n) for n in (2, 3, 4)] == [top_reference(ws, n) for n in (2, 3, 4)]
        assert [duplicated_ngram_chars(ws, n) for n in range(5, 11)] == [
            duplicated_reference(ws, n) for n in range(5, 11)
        ]
