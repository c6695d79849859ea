"""Document readers and writers. A document is a dict; its text sits under a configurable key and every other field
(id, url, metadata) travels with it unchanged to the output.

Inputs by suffix: `.jsonl`/`.json`/`.ndjson` (optionally `.gz`): one JSON object per line; `.parquet` (needs the
optional `pyarrow`): one row per document; `.txt` (optionally `.gz`): the whole file is one document, with
`id` = the file name. A malformed JSON line is skipped and reported (file and line) and the rest of the file is read;
a missing text key, a non-string text or an unreadable file stops the run with a CurationError naming it.
"""

import contextlib
import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from engine.data._files import atomic_write
from engine.data.curation.steps import CurationError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)
SUPPORTED = "'.jsonl', '.json', '.ndjson', '.txt' (each optionally '.gz') and '.parquet'"


def input_format(path: str) -> str:
    """'jsonl', 'parquet' or 'text', from the file name; anything else is a CurationError."""
    base = path.removesuffix(".gz")
    if base.endswith(JSON_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if base.endswith(TEXT_SUFFIXES):
        return "text"
    raise CurationError(f"{path}: unknown input format (supported: {SUPPORTED})")


def _text_of(doc: Any, text_key: str, where: str) -> str:
    if text_key not in doc:
        keys = ", ".join(sorted(map(str, doc))[:8]) or "none"
        raise CurationError(f"{where}: no text key {text_key!r} (keys: {keys}); set --text-key")
    text = doc[text_key]
    if not isinstance(text, str):
        raise CurationError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
    return text


def _read_jsonl(path: str, text_key: str, bad_lines: list[str]) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                bad_lines.append(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(doc, dict):
                bad_lines.append(f"{path}:{lineno}: malformed JSON (a {type(doc).__name__}, not an object)")
                continue
            _text_of(doc, text_key, f"{path}:{lineno}")
            yield lineno, doc


def _read_parquet(path: str, text_key: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq  # optional dependency, only for parquet inputs
    except ImportError:
        raise CurationError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for doc in batch.to_pylist():
            row += 1
            _text_of(doc, text_key, f"{path}: row {row}")
            yield row, doc


def _read_text(path: str, text_key: str) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    yield 1, {"id": os.path.basename(path), text_key: text}


def read_documents(path: str, text_key: str = "text", bad_lines: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yields (line or row number, document) of one input file in order; malformed lines go to `bad_lines`."""
    fmt = input_format(path)
    bad_lines = [] if bad_lines is None else bad_lines
    try:
        if fmt == "jsonl":
            yield from _read_jsonl(path, text_key, bad_lines)
        elif fmt == "parquet":
            yield from _read_parquet(path, text_key)
        else:
            yield from _read_text(path, text_key)
    except UnicodeDecodeError as e:
        raise CurationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # missing, unreadable, or a corrupt .gz
        raise CurationError(f"{path}: cannot read ({e.strerror or e})") from None


@contextlib.contextmanager
def document_writer(path: str, compresslevel: int = 6) -> Iterator:
    """A `write(doc)` function writing JSON lines to `path` (gzip when it ends in .gz), under a temporary name
    renamed into place when the block ends without error."""
    with atomic_write(path, "wb") as raw:
        stream = raw
        if path.endswith(".gz"):
            # the header's name is the final file's (the temporary's otherwise: gzip reads it from `raw`)
            name = os.path.basename(path)[: -len(".gz")]
            stream = gzip.GzipFile(name, mode="wb", compresslevel=compresslevel, fileobj=raw, mtime=0)
        out = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")

        def write(doc: dict) -> None:
            # default=str: values JSON has no type for (a parquet timestamp, bytes) are written as their str()
            out.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")

        yield write
        out.flush()
        out.detach()  # leaves `raw` open for atomic_write to fsync and rename
        if stream is not raw:
            stream.close()  # writes the gzip trailer
