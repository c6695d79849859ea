"""Tokenise text into a Megatron indexed dataset: `python -m engine.data.preprocess --input ... --output-prefix P`.

Inputs: JSON-lines files (`.jsonl`, `.json`, `.ndjson`, optionally `.gz`; one document per line, text under
`--json-key`), plain text files (one document per file, `.gz` allowed), globs of either (quoted, `**` allowed), or
`embedded` (the corpus that ships with Python). Documents are read in the order given (globs sorted), sent to a
pool of worker processes in chunks, and written back in the same order, so the output is byte-identical for any
`--workers`. The builder writes under temporary names and renames at the end: an interrupted run leaves no
PREFIX.idx behind.
"""

import argparse
import glob
import gzip
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.data.indexed_dataset import IndexedDatasetBuilder
from engine.data.tokenizer import Tokenizer, load_tokenizer

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PreprocessError(ValueError):
    """Bad preprocessing input (the message names the file and the problem)."""


@dataclass(frozen=True)
class PreprocessStats:
    prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    seconds: float
    workers: int
    dtype: str

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.prefix}: {self.documents} docs, {self.tokens} tokens ({self.dtype}), "
            f"{self.skipped_empty} empty skipped, {self.seconds:.2f} s: {self.documents / s:.1f} docs/s, "
            f"{self.tokens / s:.0f} tokens/s ({self.tokens / s / self.workers:.0f} tokens/s per worker, "
            f"{self.workers} workers)"
        )


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Expands globs (sorted) and checks every file exists; 'embedded' passes through. One error lists all misses."""
    if not inputs:
        raise PreprocessError("no --input given")
    files, missing = [], []
    for item in inputs:
        if item == "embedded":
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                missing.append(f"{item} (glob matched no files)")
            files += matches
        elif os.path.isdir(item):
            raise PreprocessError(f"{item}: is a directory (pass files or a quoted glob such as '{item}/*.jsonl')")
        elif not os.path.isfile(item):
            missing.append(item)
        else:
            files.append(item)
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_json(path: str) -> bool:
    return path.removesuffix(".gz").endswith(JSON_SUFFIXES)


def iter_documents(files: Sequence[str], json_key: str = "text", split: str = "all") -> Iterator[str]:
    """Yields document texts from resolved inputs, in order."""
    for path in files:
        if path == "embedded":
            from engine.data.corpus import documents

            yield from (d.text for d in documents(split))
            continue
        try:
            with _open_text(path) as f:
                if not _is_json(path):
                    yield f.read()
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PreprocessError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise PreprocessError(f"{path}:{lineno}: no key {json_key!r} (set --json-key)")
                    text = obj[json_key]
                    if not isinstance(text, str):
                        raise PreprocessError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
                    yield text
        except UnicodeDecodeError as e:
            raise PreprocessError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:  # e.g. a corrupt .gz
            raise PreprocessError(f"{path}: cannot read ({e})") from None


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Worker side: one tokenizer per process, set by the pool initializer (module state local to each worker).
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    # Ctrl-C reaches the whole process group: the parent alone handles it (terminates the pool, removes its
    # temporary files), so the workers' tracebacks do not bury its one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker process: the pool is the parallelism (no oversubscription of `tokenizers` threads).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenises a chunk; returns (all ids concatenated, per-document lengths, empty documents skipped).
    Flat int32 arrays pickle far faster than lists of lists on the way back to the writer."""
    tok = tokenizer or _worker_tokenizer
    texts_kept = [t for t in texts if t]
    ids = tok.encode_batch(texts_kept) if texts_kept else []
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    return flat, lengths, len(texts) - len(texts_kept)


def check_output_prefix(output_prefix: str, files: Sequence[str], force: bool = True) -> None:
    """One-line PreprocessError for an output prefix that names no file (ends in a separator), whose PREFIX.bin or
    PREFIX.idx is one of the inputs (tokenising would overwrite what it reads), or, without `force`, exists."""
    if not os.path.basename(output_prefix):
        raise PreprocessError(f"--output-prefix {output_prefix!r} names a directory; give a file prefix like DIR/train")
    inputs = {os.path.realpath(f) for f in files if f != "embedded"}
    for out in (output_prefix + ".bin", output_prefix + ".idx"):
        if os.path.realpath(out) in inputs:
            raise PreprocessError(f"--output-prefix {output_prefix} would overwrite the input {out}")
        if not force and os.path.exists(out):
            raise PreprocessError(f"{out} exists; pass --force to replace it, or choose another --output-prefix")


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str | Tokenizer = "byte",
    *,
    json_key: str = "text",
    workers: int = 1,
    chunk_docs: int = 64,
    append_eod: bool = True,
    split: str = "all",
    progress: bool | None = None,
    cache_dir: str | None = None,
    bpe_vocab: int = 4096,
) -> PreprocessStats:
    """Tokenises the inputs into OUTPUT_PREFIX.bin/.idx (one sequence per document, EOD-terminated by default)."""
    from tqdm import tqdm

    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    if chunk_docs < 1:  # 0 would silently send the whole corpus to one worker in one task
        raise PreprocessError(f"--chunk-docs must be at least 1, got {chunk_docs}")
    files = resolve_inputs(inputs)
    check_output_prefix(output_prefix, files)
    tok = load_tokenizer(tokenizer, cache_dir, bpe_vocab)
    t0 = time.perf_counter()
    chunks = _chunks(iter_documents(files, json_key, split), chunk_docs)
    docs = skipped = 0
    # `progress=None`: a bar when stderr is a terminal (tqdm's own rule), none in logs and tests.
    bar = tqdm(desc="tokenising", unit=" docs", file=sys.stderr, disable=None if progress is None else not progress)
    pool = None
    try:
        with IndexedDatasetBuilder(output_prefix, vocab_size=tok.vocab_size) as builder:
            if workers == 1:
                results = (_encode_chunk(c, tok) for c in chunks)
            else:
                # spawn: the caller may hold threads (torch, tokenizers) that make fork unsafe.
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok,))
                results = pool.imap(_encode_chunk, chunks)  # ordered: output independent of scheduling
            for flat, lengths, n_empty in results:
                skipped += n_empty
                for doc in np.split(flat, np.cumsum(lengths[:-1])) if len(lengths) else []:
                    builder.add_document(np.append(doc, tok.eod_id) if append_eod else doc)
                docs += len(lengths)
                bar.update(len(lengths) + n_empty)
                bar.set_postfix(tokens=builder.num_tokens, refresh=False)
            if docs == 0:
                what = "all documents are empty" if skipped else "no documents"
                raise PreprocessError(f"empty corpus: {what} in {', '.join(files)}")
            n_tokens = builder.num_tokens
            dtype = builder.dtype.name
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return PreprocessStats(output_prefix, docs, n_tokens, skipped, time.perf_counter() - t0, workers, dtype)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.data.preprocess",
        description="Tokenise text into a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx, MMIDIDX v1).",
        epilog="Example: python -m engine.data.preprocess --input 'data/*.jsonl' --tokenizer bpe "
        "--output-prefix data/train --workers 2",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE|GLOB|embedded",
        help="JSON-lines files (.jsonl/.json/.ndjson[.gz], one document per line), plain text files (one document "
        "per file), quoted globs (** allowed), or 'embedded' for the corpus shipped with Python",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (see --force)")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        help="'byte', 'bpe' (byte-level BPE trained on the embedded corpus, cached), or a tokenizer.json path "
        "(default: bpe)",
    )
    p.add_argument("--bpe-vocab", type=int, default=4096, help="vocabulary size of --tokenizer bpe (default: 4096)")
    p.add_argument("--json-key", default="text", help="key holding the text in JSON lines (default: text)")
    p.add_argument(
        "--split",
        choices=("all", "train", "valid"),
        default="all",
        help="with --input embedded: which split of the embedded corpus (default: all)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default: 1); output is identical")
    p.add_argument("--chunk-docs", type=int, default=64, help="documents per task sent to a worker (default: 64)")
    p.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not end each document with the EOD token (appended by default, so documents stay separated "
        "when samples span them)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )
    p.add_argument("--cache-dir", default=None, help="cache for the BPE tokenizer (default: $ENGINE_CACHE or ~/.cache)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_prefix(args.output_prefix, resolve_inputs(args.input), force=args.force)
        stats = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            chunk_docs=args.chunk_docs,
            append_eod=args.append_eod,
            split=args.split,
            progress=args.progress,
            cache_dir=args.cache_dir,
            bpe_vocab=args.bpe_vocab,
        )
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.output_prefix}.idx was not written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stats.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
