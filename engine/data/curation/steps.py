"""The two kinds of pipeline step and the registry that names them.

A `DocumentStep` looks at one document's text at a time (a filter, a redactor): it runs in the per-file stage, in
worker processes. A `DedupStep` needs every document: each document's key (a content hash, a MinHash signature) is
computed in the per-file stage and the clustering runs once over all keys in the global stage. Steps are dataclasses,
so their fields are their parameters (settable from TOML) and they pickle to worker processes.
"""

import importlib
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np


class CurationError(ValueError):
    """Bad curation input or configuration; the message names the file, line, step or key."""


@dataclass
class Step:
    """A pipeline step; subclasses set `name` (what `--steps` and TOML call it)."""

    name: ClassVar[str] = ""


@dataclass
class DocumentStep(Step):
    """A per-document step: `process(text)` returns (new text, None) to keep the document, possibly changed, or
    (text, reason) to remove it, `reason` a short name such as 'gopher_short_doc' counted in the report."""

    def process(self, text: str) -> tuple[str, str | None]:
        raise NotImplementedError

    def label(self, text: str) -> tuple[str, str | None, dict[str, Any]]:
        """`process`, plus fields the step records under the document's `metadata` key (language ID's language and
        score, as datatrove does); most steps record none. The pipeline calls this one."""
        text, reason = self.process(text)
        return text, reason, {}


@dataclass
class DedupStep(Step):
    """A dedup step: per-document keys (uint64 rows) computed in the per-file stage; `cluster` maps the keys of all
    participating documents, in corpus order, to each one's kept representative."""

    reason: ClassVar[str] = "duplicate"

    def keys(self, texts: list[str]) -> np.ndarray:
        """A (len(texts), width) uint64 array of keys, one row per text."""
        raise NotImplementedError

    def cluster(self, keys: np.ndarray) -> np.ndarray:
        """For rows in corpus order, the index of the row each is a duplicate of (the first of its cluster), or its
        own index when it is kept."""
        raise NotImplementedError


STEP_TYPES: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: makes a step available by its `name` to `--steps` and pipeline TOML files."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no step name")
    STEP_TYPES[cls.name] = cls
    return cls


BUILTIN_STEP_MODULES = ("c4", "exact_dedup", "fineweb", "gopher", "language_id", "minhash", "pii", "substring_dedup")


def make_step(name: str, params: dict[str, Any] | None = None) -> Step:
    """The step called `name` with `params` over its defaults; an unknown name or parameter is a CurationError."""
    if name not in STEP_TYPES:  # the built-in steps register on import: a caller need not import them first
        for module in BUILTIN_STEP_MODULES:
            importlib.import_module(f"engine.data.curation.{module}")
    cls = STEP_TYPES.get(name)
    if cls is None:
        raise CurationError(f"unknown step {name!r}; known steps: {', '.join(sorted(STEP_TYPES))}")
    params = dict(params or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CurationError(f"step {name!r}: unknown parameter {unknown[0]!r}; parameters: {', '.join(sorted(known))}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise CurationError(f"step {name!r}: {e}") from None
