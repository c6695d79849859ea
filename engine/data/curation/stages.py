"""The three stages of a curation run, each a pure function of files in the run's work directory.

1. `process_shard` (per input file): reads the documents, runs the document steps in order, computes each dedup
   step's keys on the text as it reaches that step, and writes the documents that no document step removed, the
   keys, and per-document bookkeeping (line, where it was removed and why, its size after each step).
2. `cluster_all` (once): for each dedup step in order, clusters the keys of the documents still present at that step
   over the whole corpus and records which documents it removes and which document each duplicates.
3. `write_shard` (per input file): writes the documents that survived both, in input order.

Every stage writes its files under temporary names renamed into place and then a marker (also renamed into place),
so a shard with a marker is complete and one without is redone from scratch: killing a run at any point and running it
again gives the same output as an uninterrupted run.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.data._files import atomic_write, remove_stale_temps
from engine.data.curation.documents import document_writer, read_documents
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.steps import CurationError, DedupStep
from engine.data.curation.substring_dedup import apply_cuts

SAMPLES_PER_REASON = 3
SAMPLE_CHARS = 300
KEY_BATCH_DOCS = 256  # dedup keys are computed this many documents at a time (bounds memory)
NOT_REMOVED = -1
METADATA_KEY = "metadata"  # where a step's labels go (language ID's), as in datatrove's and FineWeb's documents


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files: outputs and report.json in `output`, stage files under `output/.curation`."""

    output: str

    @property
    def work(self) -> str:
        return os.path.join(self.output, ".curation")

    def manifest(self) -> str:
        return os.path.join(self.work, "manifest.json")

    def processed(self, shard: int, what: str) -> str:
        """what: 'npz' (bookkeeping and keys), 'docs' (surviving documents) or 'done' (the marker, with metadata)."""
        name = {"npz": f"{shard:05d}.npz", "docs": f"{shard:05d}.docs.jsonl.gz", "done": f"{shard:05d}.done"}[what]
        return os.path.join(self.work, "process", name)

    def clusters(self, what: str) -> str:
        return os.path.join(self.work, "dedup.npz" if what == "npz" else "dedup.done")

    def written(self, shard: int) -> str:
        return os.path.join(self.work, "write", f"{shard:05d}.done")

    def report(self) -> str:
        return os.path.join(self.output, "report.json")


def output_name(shard: int, path: str, output_format: str) -> str:
    """`00003_name.jsonl.gz` for input shard 3 `.../name.jsonl`: input order and provenance in the name."""
    stem = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".parquet", ".txt"):
        stem = stem.removesuffix(suffix)
    return f"{shard:05d}_{stem}.{output_format}"


def write_marker(path: str, meta: dict[str, Any]) -> None:
    """The marker that says a shard's stage is complete: JSON metadata, written atomically (tmp + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(meta, f)


def read_marker(path: str) -> dict[str, Any] | None:
    """A marker's metadata, or None when the stage has not completed."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _sample(step: int, reason: str, idx: int, line: int, doc: dict, trace: "DocumentTrace") -> dict[str, Any]:
    sample = {"step": step, "reason": reason, "index": idx, "line": line, "id": doc.get("id")}
    labels = {METADATA_KEY: trace.labels} if trace.labels else {}  # e.g. the language that removed it
    return {**sample, "text": trace.text[:SAMPLE_CHARS], **labels}


def with_labels(doc: dict, labels: dict[str, Any], where: str) -> dict:
    """`doc` with the steps' labels merged into its `metadata` dict (created if absent); other fields unchanged."""
    if not labels:
        return doc
    metadata = doc.get(METADATA_KEY)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise CurationError(f"{where}: {METADATA_KEY!r} is {kind}, not an object, so labels cannot be added to it")
    return {**doc, METADATA_KEY: {**metadata, **labels}}


@dataclass
class DocumentTrace:
    """What the steps did to one document in stage 1."""

    text: str  # as the last step it reached left it
    removed_at: int  # the document step that removed it, or NOT_REMOVED
    reason: str | None
    sizes: list[int]  # UTF-8 bytes before step 0, after step 0, ...; -1 after its removal
    changed: list[bool]  # per step: did the step change the text
    dedup_texts: dict[int, str]  # the text as it reached each dedup step
    labels: dict[str, Any]  # what the steps it reached recorded for its metadata (DocumentStep.label)


def trace_document(steps: list, text: str) -> DocumentTrace:
    """Runs the document steps on `text` in order up to the first that removes it, noting the text at dedup steps."""
    sizes = [len(text.encode("utf-8"))] + [-1] * len(steps)
    changed = [False] * len(steps)
    dedup_texts = {}
    labels: dict[str, Any] = {}
    for j, step in enumerate(steps):
        if isinstance(step, DedupStep):
            dedup_texts[j] = text
            sizes[j + 1] = sizes[j]
            continue
        new_text, reason, step_labels = step.label(text)
        labels.update(step_labels)
        if reason is not None:
            return DocumentTrace(text, j, reason, sizes, changed, dedup_texts, labels)
        changed[j] = new_text != text
        text = new_text
        sizes[j + 1] = len(text.encode("utf-8")) if changed[j] else sizes[j]
    return DocumentTrace(text, NOT_REMOVED, None, sizes, changed, dedup_texts, labels)


def process_shard(shard: int, path: str, pipeline: Pipeline, paths: RunPaths) -> dict[str, Any]:
    """Stage 1 for one input file; returns (and writes as the marker) its metadata."""
    steps = pipeline.steps
    dedup_at = [j for j, s in enumerate(steps) if isinstance(s, DedupStep)]
    lines: list[int] = []
    removed_at: list[int] = []
    reason_code: list[int] = []
    sizes: list[list[int]] = []
    changed: list[list[bool]] = []
    reasons: list[str] = []  # reason names, in order of first use; documents record an index
    samples: list[dict[str, Any]] = []
    sampled: dict[tuple[int, str], int] = {}
    pending: dict[int, list[str]] = {j: [] for j in dedup_at}  # texts whose keys are not computed yet
    keys: dict[int, list[np.ndarray]] = {j: [] for j in dedup_at}
    key_idx: dict[int, list[int]] = {j: [] for j in dedup_at}
    span_bytes: dict[int, list[np.ndarray]] = {j: [] for j in dedup_at if _cuts_spans(steps[j])}  # texts, for stage 2
    bad_lines: list[str] = []

    def compute_keys(at_least: int) -> None:
        for j in dedup_at:
            if pending[j] and len(pending[j]) >= at_least:
                keys[j].append(steps[j].keys(pending[j]))
                if j in span_bytes:
                    span_bytes[j].append(steps[j].text_bytes(pending[j]))
                pending[j] = []

    os.makedirs(os.path.dirname(paths.processed(shard, "docs")), exist_ok=True)
    for what in ("npz", "docs", "done"):
        remove_stale_temps(paths.processed(shard, what))  # left by a run killed while writing this shard
    with document_writer(paths.processed(shard, "docs"), compresslevel=1) as write:
        for idx, (line, doc) in enumerate(read_documents(path, pipeline.text_key, bad_lines)):
            trace = trace_document(steps, doc[pipeline.text_key])
            for j, text in trace.dedup_texts.items():
                pending[j].append(text)
                key_idx[j].append(idx)
            if trace.reason is None:
                write(with_labels({**doc, pipeline.text_key: trace.text}, trace.labels, f"{path}:{line}"))
            else:
                if trace.reason not in reasons:
                    reasons.append(trace.reason)
                slot = (trace.removed_at, trace.reason)
                if sampled.get(slot, 0) < SAMPLES_PER_REASON:
                    sampled[slot] = sampled.get(slot, 0) + 1
                    samples.append(_sample(*slot, idx, line, doc, trace))
            lines.append(line)  # the trace's small fields only: its text is not kept in memory
            removed_at.append(trace.removed_at)
            reason_code.append(-1 if trace.reason is None else reasons.index(trace.reason))
            sizes.append(trace.sizes)
            changed.append(trace.changed)
            compute_keys(at_least=KEY_BATCH_DOCS)
        compute_keys(at_least=1)
    n = len(lines)
    arrays = {
        "lines": np.asarray(lines, dtype=np.int64),
        "removed_at": np.asarray(removed_at, dtype=np.int32),
        "reason_code": np.asarray(reason_code, dtype=np.int32),
        "sizes": np.asarray(sizes, dtype=np.int64).reshape(n, len(steps) + 1),
        "changed": np.asarray(changed, dtype=bool).reshape(n, len(steps)),
        "kept": np.flatnonzero(np.asarray(removed_at) == NOT_REMOVED).astype(np.int64),
    }
    for j in dedup_at:
        arrays[f"keys_{j}"] = np.concatenate(keys[j]) if keys[j] else steps[j].keys([])
        arrays[f"key_idx_{j}"] = np.asarray(key_idx[j], dtype=np.int64)
        if j in span_bytes:
            arrays[f"text_{j}"] = np.concatenate(span_bytes[j]) if span_bytes[j] else np.zeros(0, dtype=np.uint8)
    with atomic_write(paths.processed(shard, "npz"), "wb") as f:
        np.savez(f, **arrays)
    meta = {"path": path, "documents": n, "reasons": reasons, "samples": samples, "bad_lines": bad_lines}
    write_marker(paths.processed(shard, "done"), meta)
    return meta


def _cuts_spans(step) -> bool:
    """A dedup step that cuts byte ranges out of documents (substring_dedup) rather than clustering documents."""
    return getattr(step, "cuts_spans", False)


def load_processed(paths: RunPaths, shard: int) -> dict[str, np.ndarray]:
    with np.load(paths.processed(shard, "npz")) as z:
        return {k: z[k] for k in z.files}


def cluster_all(pipeline: Pipeline, paths: RunPaths, n_shards: int) -> None:
    """Stage 2: `dedup_at[g]` (the dedup step that removed document g, -1 if none) and `duplicate_of[g]` (the corpus
    index of the document it duplicates) over corpus indices g (shards in input order, then line order)."""
    shards = [load_processed(paths, i) for i in range(n_shards)]
    counts = [len(s["lines"]) for s in shards]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    dedup_at = np.full(total, NOT_REMOVED, dtype=np.int32)
    duplicate_of = np.full(total, -1, dtype=np.int64)
    spans = {key: np.zeros(0, dtype=np.int64) for key in ("cut_doc", "cut_start", "cut_end")}  # substring dedup's
    for j, step in enumerate(pipeline.steps):
        if not isinstance(step, DedupStep):
            continue
        # keys exist for every document that reached step j in stage 1; those an earlier dedup removed drop out
        idx = np.concatenate([offsets[i] + s[f"key_idx_{j}"] for i, s in enumerate(shards)]).astype(np.int64)
        keys = np.concatenate([s[f"keys_{j}"] for s in shards])
        present = dedup_at[idx] == NOT_REMOVED
        if _cuts_spans(step):  # substring dedup: byte ranges to cut, and the documents left empty
            lengths = keys[:, 0].astype(np.int64)
            data = np.concatenate([s[f"text_{j}"] for s in shards])[np.repeat(present, lengths)]
            idx = idx[present]
            cuts = step.find_cuts(data, lengths[present])
            spans = {"cut_doc": idx[cuts.doc], "cut_start": cuts.start, "cut_end": cuts.end}
            dedup_at[idx[cuts.emptied]] = j
            duplicate_of[idx[cuts.emptied]] = np.where(cuts.emptied_source >= 0, idx[cuts.emptied_source], -1)
            continue
        idx, keys = idx[present], keys[present]
        first = step.cluster(keys)
        dup = np.flatnonzero(first != np.arange(len(idx)))
        dedup_at[idx[dup]] = j
        duplicate_of[idx[dup]] = idx[first[dup]]
    with atomic_write(paths.clusters("npz"), "wb") as f:
        np.savez(f, offsets=offsets, dedup_at=dedup_at, duplicate_of=duplicate_of, **spans)
    write_marker(paths.clusters("done"), {"documents": total})


def load_clusters(paths: RunPaths) -> dict[str, np.ndarray]:
    with np.load(paths.clusters("npz")) as z:
        return {k: z[k] for k in z.files}


def _cuts_of(clusters: dict[str, np.ndarray], lo: int, hi: int) -> dict[int, list[tuple[int, int]]]:
    """Corpus index -> sorted byte ranges that substring dedup cuts, for the documents lo..hi-1."""
    doc = clusters.get("cut_doc", np.zeros(0, dtype=np.int64))
    sel = np.flatnonzero((doc >= lo) & (doc < hi))
    out: dict[int, list[tuple[int, int]]] = {}
    for g, a, b in zip(doc[sel].tolist(), clusters["cut_start"][sel].tolist(), clusters["cut_end"][sel].tolist()):
        out.setdefault(g, []).append((a, b))
    return out


def write_shard(shard: int, pipeline: Pipeline, paths: RunPaths, out_path: str) -> dict[str, Any]:
    """Stage 3 for one input file: its documents that no step removed, in input order, to `out_path`."""
    clusters = load_clusters(paths)
    start = int(clusters["offsets"][shard])
    processed = load_processed(paths, shard)
    kept = processed["kept"]
    survives = clusters["dedup_at"][start + kept] == NOT_REMOVED
    remove_stale_temps(out_path)
    out_docs = 0
    docs = read_documents(paths.processed(shard, "docs"), pipeline.text_key)
    cuts = _cuts_of(clusters, start, start + len(processed["lines"]))
    with document_writer(out_path) as write:
        for (_, doc), keep, g in zip(docs, survives.tolist(), (start + kept).tolist()):
            if keep:
                if g in cuts:  # substring dedup, the last step: cut its byte ranges from the final text
                    doc = {**doc, pipeline.text_key: apply_cuts(doc[pipeline.text_key], cuts[g])}
                write(doc)
                out_docs += 1
    meta = {"output": out_path, "documents": out_docs}
    write_marker(paths.written(shard), meta)
    return meta
