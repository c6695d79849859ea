"""Text splitting shared by the quality filters: words, lines, paragraphs, sentences, punctuation.

datatrove's filters split words with NLTK's `word_tokenize` and sentences with punkt; this module uses dependency-free
regular expressions instead: a word is a run of letters/digits (inner apostrophes and hyphens kept, so "don't" and
"well-known" are one word) and every other visible character is a token of its own, as NLTK makes most punctuation.
Counts can differ from NLTK's on unusual text (contractions, URLs), never on plain prose by more than a few tokens.
"""

import re

WORD_RE = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
HAS_LETTER_OR_DIGIT_RE = re.compile(r"[^\W_]")

# Characters that end a sentence: datatrove's TERMINAL_PUNCTUATION restricted to the common scripts (Latin, CJK full
# width, Devanagari, Arabic, Ethiopic, Armenian, Myanmar), which is what FineWeb's line-punctuation rule looks at.
TERMINAL_PUNCTUATION = (
    ".", "!", "?", "．", "！", "？", "。", "｡", "‼", "⁇", "⁈", "⁉", "‽", "।", "॥", "؟", "۔", "።", "፧", "։", "။",
)  # fmt: skip


def split_words(text: str) -> list[str]:
    """Word and punctuation tokens of `text`, in order (see the module docstring)."""
    return WORD_RE.findall(text)


def is_symbol_token(token: str) -> bool:
    """True for a token with no letter or digit (punctuation, symbols): Gopher counts words without these."""
    return HAS_LETTER_OR_DIGIT_RE.search(token) is None


def split_sentences(text: str) -> list[str]:
    """Sentences of one line of text: split after . ! ? (and closing quotes/brackets) followed by whitespace."""
    return [s for s in SENTENCE_END_RE.split(text.strip()) if s.strip()]
