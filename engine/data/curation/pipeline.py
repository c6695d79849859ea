"""A curation pipeline: its steps in order and the key that holds the text, built in Python, from step names, or from a
TOML file:

    text_key = "text"          # optional

    [[steps]]
    name = "gopher_quality"
    min_doc_words = 50         # any field of the step; the rest keep their defaults

    [[steps]]
    name = "minhash_dedup"
    bands = 14
    rows = 8

Steps act in the order given: a document removed by one step is not seen by later ones (and takes no part in a later
dedup), a dedup step sees the text as the steps before it left it.
"""

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# the step modules register their steps on import
from engine.data.curation import (  # noqa: F401
    c4,
    exact_dedup,
    fineweb,
    gopher,
    language_id,
    minhash,
    pii,
    substring_dedup,
)
from engine.data.curation.steps import CurationError, DedupStep, DocumentStep, Step, make_step

# FineWeb's order (Penedo et al. 2024): quality filters, then MinHash dedup, then PII redaction
FINEWEB_STEPS = ("gopher_repetition", "gopher_quality", "c4", "fineweb", "minhash_dedup", "pii")


@dataclass
class Pipeline:
    """Steps in order and the document key holding the text."""

    steps: list[Step]
    text_key: str = "text"

    def __post_init__(self) -> None:
        if not self.steps:
            raise CurationError("a pipeline needs at least one step")
        for step in self.steps:
            if not isinstance(step, DocumentStep | DedupStep):
                raise CurationError(f"{step!r} is not a DocumentStep or DedupStep")
        for step in self.steps[:-1]:
            if getattr(step, "cuts_spans", False):  # it cuts the final text in stage 3 (substring_dedup.py)
                raise CurationError(f"step {step.name!r} cuts spans from the final text: it must be the last step")
        if not isinstance(self.text_key, str) or not self.text_key:
            raise CurationError(f"text_key must be a non-empty string, got {self.text_key!r}")

    def describe(self) -> list[dict[str, Any]]:
        """[{'name': ..., 'params': {...}}] per step: what the run's manifest and report record."""
        return [{"name": s.name, "params": dataclasses.asdict(s)} for s in self.steps]

    @classmethod
    def from_names(cls, names: Sequence[str], text_key: str = "text") -> "Pipeline":
        """Steps with their default parameters, by name ('exact_dedup', 'minhash_dedup', 'gopher_quality', ...)."""
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise CurationError("no steps given")
        return cls([make_step(n) for n in names], text_key)

    @classmethod
    def from_toml(cls, path: str, text_key: str | None = None) -> "Pipeline":
        """Reads a pipeline file (format in the module docstring); `text_key`, when given, overrides the file's."""
        try:
            with open(path, "rb") as f:
                spec = tomllib.load(f)
        except OSError as e:
            raise CurationError(f"{path}: cannot read ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise CurationError(f"{path}: invalid TOML ({e})") from None
        unknown = sorted(set(spec) - {"text_key", "steps"})
        if unknown:
            raise CurationError(f"{path}: unknown key {unknown[0]!r} (expected 'text_key' and [[steps]] tables)")
        tables = spec.get("steps")
        if not isinstance(tables, list) or not tables:
            raise CurationError(f"{path}: no [[steps]] tables")
        steps = []
        for i, table in enumerate(tables, 1):
            params = dict(table)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise CurationError(f"{path}: [[steps]] table {i} has no name")
            steps.append(make_step(name, params))
        return cls(steps, text_key or spec.get("text_key", "text"))
