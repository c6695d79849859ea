"""Language identification with a fastText classifier the user provides, as FineWeb's pipeline does with datatrove's
`LanguageFilter` (Penedo et al. 2024, arXiv:2406.17557: English documents, threshold 0.65).

The model is a fastText supervised classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification", EACL) in fastText's binary format, such as the 176-language `lid.176.bin` (or its quantised
`lid.176.ftz`) published with fastText. Nothing is downloaded here: without a model file the step refuses to start
and says so. Each document's text, newlines turned into spaces (fastText classifies one line), gets the probability
of every label; the most probable one and its probability are recorded in the document's `metadata` as `language`
and `language_score` (datatrove's keys). A document is kept when one of `languages` has a probability of at least
`min_score` (with `languages` empty: when the most probable language has); `label_only` keeps every document.
datatrove keeps only scores strictly above the threshold; a score exactly at it is kept here, as with every filter
of this package.

Removal reasons: `language_not_kept` when the most probable language is not one of `languages`,
`language_low_score` when it is (or any language is kept) but its probability is under `min_score`.
"""

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from engine.data.curation.steps import CurationError, DocumentStep, register_step

LABEL_PREFIX = "__label__"  # fastText's default label prefix, the one lid.176 uses
MODEL_NEEDED = (
    "language_id needs a fastText language-ID model file and downloads nothing: download one yourself "
    "(lid.176.bin or lid.176.ftz, from fastText's language identification page) and pass its path as model_path"
)


@functools.lru_cache(maxsize=4)
def load_model(path: str, mtime_ns: int) -> Any:
    """The fastText model at `path`, loaded once per process (`mtime_ns` in the key: a replaced file is reloaded)."""
    try:
        from fasttext.FastText import _FastText  # optional dependency, only for this step
    except ImportError:
        raise CurationError("language_id needs the fasttext package: pip install -e '.[curation]'") from None
    try:
        # _FastText rather than fasttext.load_model, which prints a deprecation warning on every load (as datatrove)
        model = _FastText(model_path=path)
    except ValueError as e:  # fastText's C++ loader: "... has wrong file format!" and the like
        raise CurationError(f"{path}: not a fastText model ({e})") from None
    kind = model.f.getArgs().model.name
    if kind != "supervised":
        raise CurationError(f"{path}: a fastText {kind} model (word vectors), not a classifier such as lid.176")
    return model


def predict(model: Any, text: str) -> list[tuple[str, float]]:
    """(language, probability) for every label of `model`, most probable first."""
    # The binding's own predict, not `model.predict`: the wrapper's ends with np.array(probs, copy=False) (0.9.2 and
    # fastText's source since), which NumPy 2 refuses ("Unable to avoid copy"); `f.predict` returns plain
    # (probability, label) pairs. It reads one line, so the text's newlines become spaces and one ends it.
    pairs = model.f.predict(text.replace("\n", " ") + "\n", -1, 0.0, "replace")
    return [(label.removeprefix(LABEL_PREFIX), float(prob)) for prob, label in pairs]


@register_step
@dataclass
class LanguageID(DocumentStep):
    """Labels each document with its language and score, and removes those not in `languages` (empty: any
    language) at `min_score` or more; `model_path` is a fastText language-ID model the user downloaded."""

    name = "language_id"
    model_path: str = ""
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.65
    label_only: bool = False

    def __post_init__(self) -> None:
        if not self.model_path:
            raise CurationError(MODEL_NEEDED)
        if not os.path.isfile(self.model_path):
            raise CurationError(f"model file {self.model_path} not found; {MODEL_NEEDED}")
        if isinstance(self.languages, str) or not all(isinstance(x, str) for x in self.languages):
            raise CurationError(f"languages must be a list of language codes such as ['en'], got {self.languages!r}")
        if not 0.0 <= self.min_score <= 1.0:
            raise CurationError(f"min_score must be in [0, 1], got {self.min_score}")
        self.model()  # a missing package or a file that is not a model fails now, not in a worker

    def model(self) -> Any:
        path = os.path.abspath(self.model_path)
        return load_model(path, os.stat(path).st_mtime_ns)

    def label(self, text: str) -> tuple[str, str | None, dict[str, Any]]:
        scores = predict(self.model(), text)
        language, score = scores[0]
        labels = {"language": language, "language_score": score}
        if self.label_only:
            return text, None, labels
        if self.languages:
            by_language = dict(scores)
            if any(by_language.get(lang, 0.0) >= self.min_score for lang in self.languages):
                return text, None, labels
            return text, "language_not_kept" if language not in self.languages else "language_low_score", labels
        return text, None if score >= self.min_score else "language_low_score", labels

    def process(self, text: str) -> tuple[str, str | None]:
        text, reason, _ = self.label(text)
        return text, reason
