"""C4 and FineWeb rules at their thresholds (kept) and just past them (removed, with the reason)."""

import pytest

from engine.data.curation.c4 import C4QualityFilter
from engine.data.curation.fineweb import FineWebQualityFilter

SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_c4_sentence_count():
    assert C4QualityFilter().process("\n".join([SENTENCE] * 5)) == ("\n".join([SENTENCE] * 5), None)
    assert C4QualityFilter().process("\n".join([SENTENCE] * 4))[1] == "too_few_sentences"
    assert C4QualityFilter().process(" ".join([SENTENCE] * 5))[1] is None  # sentences within a line count


def test_c4_line_rules_drop_lines():
    kept = [SENTENCE] * 5
    text = "\n".join(
        kept[:2]
        + ["Two words", "Enable JavaScript to see this page.", "This site uses cookies for ads."]
        + ["Three words here", "x" * 1001 + " is long."]
        + kept[2:]
    )
    out, why = C4QualityFilter().process(text)
    assert why is None
    assert out.split("\n") == kept[:2] + ["Three words here"] + kept[2:]  # 3 words is the minimum
    assert C4QualityFilter().process("x" * 1000 + " is fine.\n" + "\n".join(kept))[0].startswith("x" * 1000)


def test_c4_page_rules_and_citations():
    body = "\n".join([SENTENCE] * 5)
    assert C4QualityFilter().process(body + "\nLorem ipsum dolor sit amet.")[1] == "lorem_ipsum"
    assert C4QualityFilter().process(body + "\nvar x = {a: 1} here.")[1] == "curly_bracket"
    out, _ = C4QualityFilter().process("It was shown [1] twice [citation needed] here.\n" + body)
    assert out.split("\n")[0] == "It was shown  twice  here."


def test_c4_terminal_punctuation_is_off_by_default_as_in_fineweb():
    text = "\n".join([SENTENCE] * 5 + ["A line without an end", "A line that trails off..."])
    assert C4QualityFilter().process(text)[0].count("\n") == 6
    out, why = C4QualityFilter(filter_no_terminal_punct=True).process(text)
    assert why is None and out == "\n".join([SENTENCE] * 5)


def fw_only(**rules) -> FineWebQualityFilter:
    off = {"line_punct_thr": 0.0, "short_line_thr": 1.0, "char_duplicates_ratio": 1.0, "new_line_ratio": 1e9}
    return FineWebQualityFilter(**{**off, **rules})


@pytest.mark.parametrize("ending,expected", [(3, None), (2, "line_punct_ratio")])
def test_fineweb_line_punctuation(ending, expected):
    lines = [f"line number {i} ends here." for i in range(ending)] + [f"line number {i}" for i in range(25 - ending)]
    assert fw_only(line_punct_thr=0.12).process("\n".join(lines))[1] == expected  # 3/25 = 0.12 kept


def test_fineweb_line_punctuation_zero_exclusion():
    text = "\n".join(f"line {i}" for i in range(10))
    assert fw_only(line_punct_thr=0.12).process(text)[1] == "line_punct_ratio"
    assert fw_only(line_punct_thr=0.12, line_punct_exclude_zero=True).process(text)[1] is None


@pytest.mark.parametrize("short,expected", [(67, None), (68, "short_line_ratio")])
def test_fineweb_short_lines(short, expected):
    lines = [f"{i:03d}" + "s" * 27 for i in range(short)]  # exactly 30 characters: short
    lines += [f"{i:03d}" + "l" * 28 for i in range(100 - short)]  # 31 characters: not short
    assert fw_only(short_line_thr=0.67).process("\n".join(lines))[1] == expected


@pytest.mark.parametrize("dup,expected", [(10, None), (11, "char_dup_ratio")])
def test_fineweb_duplicated_line_chars(dup, expected):
    line = "d" * dup
    lines, rest = divmod(1000 - 2 * dup, 5)
    filler = [f"{i:03d}uu" for i in range(lines)] + ["v" * rest] * bool(rest)
    text = "\n".join([*filler, line, line])  # 1000 characters outside the newlines, which do not count
    assert len(text.replace("\n", "")) == 1000 and text.count("\n") > 190
    assert fw_only(char_duplicates_ratio=0.01).process(text)[1] == expected  # dup / 1000 vs 0.01


def test_fineweb_char_duplicates_can_be_set_to_the_papers_value():
    text = "u" * 900 + "\n" + "d" * 50 + "\n" + "d" * 50  # 5% of characters in a repeated line
    assert FineWebQualityFilter().char_duplicates_ratio == 0.01
    assert fw_only(char_duplicates_ratio=0.01).process(text)[1] == "char_dup_ratio"
    assert fw_only(char_duplicates_ratio=0.1).process(text)[1] is None


@pytest.mark.parametrize("newlines,expected", [(3, None), (4, "list_ratio")])
def test_fineweb_newline_ratio(newlines, expected):
    words = [f"w{i}" for i in range(10)]
    text = "\n".join(" ".join(words[i :: newlines + 1]) for i in range(newlines + 1))  # 10 words
    assert fw_only(new_line_ratio=0.3).process(text)[1] == expected  # 3/10 = 0.3 kept


def test_fineweb_defaults_keep_prose_and_drop_empty():
    prose = "\n".join(f"This is sentence number {i} of a perfectly ordinary paragraph of text." for i in range(8))
    assert FineWebQualityFilter().process(prose)[1] is None
    assert FineWebQualityFilter().process(" \n\n ")[1] == "empty"
