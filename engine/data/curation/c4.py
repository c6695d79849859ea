"""C4's clean-up heuristics (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR, §2.2), line by line as datatrove's `C4QualityFilter` applies them.

Lines are dropped from the text (too long a word, fewer than 3 words, 'javascript', cookie/terms-of-use lines, and,
when `filter_no_terminal_punct`, lines not ending in terminal punctuation); the document is removed if it contains
'lorem ipsum' or a curly bracket, or keeps fewer than 5 sentences. Wikipedia-style citations ([1], [edit],
[citation needed]) are removed from the kept lines.

The terminal-punctuation rule is off by default here: FineWeb runs `C4QualityFilter(filter_no_terminal_punct=False)`
and replaces it by its own, milder line-punctuation rule (fineweb.py). datatrove's class default, and C4 itself,
have it on: set `filter_no_terminal_punct = true` for the original C4 behaviour. The C4 bad-words list is not
included (it is a separate filter in datatrove and needs a downloaded word list).
"""

import re
from dataclasses import dataclass

from engine.data.curation.steps import DocumentStep, register_step
from engine.data.curation.words import split_sentences

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@register_step
@dataclass
class C4QualityFilter(DocumentStep):
    """C4's line filters and page rules; -1 switches a count rule off (datatrove's convention)."""

    name = "c4"
    filter_no_terminal_punct: bool = False
    remove_citations: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def process(self, text: str) -> tuple[str, str | None]:
        kept, sentences = [], 0
        for raw in text.splitlines():
            line = raw.strip()
            words = line.split()
            # the rules in datatrove's order: a page rule sees only lines that passed the line rules before it
            if self.max_word_length != -1 and max(map(len, words), default=0) > self.max_word_length:
                continue
            if self.remove_citations:
                line = CITATION_RE.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return text, "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return text, "curly_bracket"
            if self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            sentences += len(split_sentences(line))
            kept.append(line)
        if self.min_num_sentences != -1 and sentences < self.min_num_sentences:
            return text, "too_few_sentences"
        return "\n".join(kept).strip(), None
