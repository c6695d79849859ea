"""Curation throughput and agreement against datatrove (the library FineWeb was built with), on the same documents
in the same run: documents/s on one core for MinHash dedup and for the Gopher repetition + quality, C4 and FineWeb
filters, the agreement of the duplicate pairs each MinHash finds, and of the filters' keep/remove decisions.

    python -m benchmarks.bench_curation --docs 4000 --json curation.json

Input: the embedded corpus (Python's pydoc topics and standard-library sources, engine/data/corpus.py) cut into
documents of a few KB, plus planted near-duplicates (a copy with a few words replaced) and exact copies. Both sides
run in this process, one document at a time for the filters (`process(text)` against datatrove's `filter(doc)`).

datatrove splits words with NLTK's `word_tokenize`, which needs the punkt sentence model, a separate download that is
not available offline. datatrove takes any `WordTokenizer`, so it gets `NLTKWordsOurSentences`: NLTK's Treebank word
tokenizer (the part of `word_tokenize` that needs no download) applied per sentence, with sentences split by our rule.
The duplicate pairs are compared as sets of unordered document pairs in the same cluster (precision, recall and F1 of
ours against datatrove's; which document a cluster keeps is not compared).
"""

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np

from engine.data.corpus import documents
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.suffix_array import cpp_available
from engine.data.curation.union_find import first_of_components
from engine.data.curation.words import SENTENCE_END_RE

FILTERS = {  # our step -> datatrove class name in datatrove.pipeline.filters, and its arguments
    "gopher_repetition": ("GopherRepetitionFilter", {}),
    "gopher_quality": ("GopherQualityFilter", {}),
    "c4": ("C4QualityFilter", {"filter_no_terminal_punct": False}),  # FineWeb's setting, our default
    "fineweb": ("FineWebQualityFilter", {}),
}


def prose_like(rng: random.Random, vocabulary: list[str]) -> str:
    """A document of 10-40 lines of sentences over real words around stop words: text the quality filters keep."""
    lines = []
    for _ in range(rng.randint(10, 40)):
        w = rng.choices(vocabulary, k=8)
        lines.append(f"The {w[0]} of {w[1]} and {w[2]} {w[3]} with {w[4]} {w[5]} to {w[6]} {w[7]}.")
    return "\n".join(lines)


def make_corpus(
    n_docs: int, dup_fraction: float = 0.1, edit_rate: float = 0.005, seed: int = 0
) -> tuple[list[str], list[tuple[int, int]]]:
    """(texts, planted pairs). Two thirds are embedded-corpus documents (pydoc prose and Python sources) cut at line
    boundaries into pieces of 1-4 KB, one third `prose_like` documents over the corpus's words; then for a
    `dup_fraction` of them a near-duplicate (`edit_rate` of the words replaced, shingle Jaccard about 1 - 10 x
    edit_rate, where the 14 x 8 S-curve is near 1) or, one time in four, an exact copy, at a random later position."""
    rng = random.Random(seed)
    pieces: list[str] = []
    vocabulary: set[str] = set()
    for doc in documents():
        if doc.name.startswith("prose/"):
            vocabulary.update(w for w in doc.text.split() if w.isalpha() and w.islower())
        lines, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            lines.append(line)
            size += len(line)
            if size >= rng.randint(1000, 4000):
                pieces.append("".join(lines))
                lines, size = [], 0
        if size > 200:
            pieces.append("".join(lines))
    words = sorted(vocabulary)
    n_base = n_docs - int(n_docs * dup_fraction)
    n_real = min(len(pieces), n_base - n_base // 3)
    texts = rng.sample(pieces, n_real) + [prose_like(rng, words) for _ in range(n_base - n_real)]
    rng.shuffle(texts)
    planted: list[tuple[int, int]] = []
    while len(texts) < n_docs:
        src = rng.randrange(len(texts))
        tokens = texts[src].split(" ")
        if rng.random() >= 0.25:
            for k in rng.sample(range(len(tokens)), max(1, round(len(tokens) * edit_rate))):
                tokens[k] = rng.choice(words)
        pos = rng.randint(src + 1, len(texts))
        texts.insert(pos, " ".join(tokens))
        planted = [(a + (a >= pos), b + (b >= pos)) for a, b in planted] + [(src, pos)]
    return texts, planted


def cluster_pairs(roots: np.ndarray) -> set[tuple[int, int]]:
    """All unordered pairs (i < j) of documents with the same cluster root."""
    pairs: set[tuple[int, int]] = set()
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, []).append(i)
    for members in groups.values():
        pairs.update(itertools.combinations(members, 2))
    return pairs


def pair_agreement(ours: set, theirs: set) -> dict[str, float]:
    """Precision, recall and F1 of our pairs against theirs, and the Jaccard index of the two sets."""
    both = len(ours & theirs)
    precision = both / len(ours) if ours else 1.0
    recall = both / len(theirs) if theirs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    union = len(ours | theirs)
    return {"precision": precision, "recall": recall, "f1": f1, "jaccard": both / union if union else 1.0}


def timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def ours_minhash(texts: list[str]) -> np.ndarray:
    step = Pipeline.from_names(["minhash_dedup"]).steps[0]
    return step.cluster(step.keys(texts))


def datatrove_tokenizer():
    """A datatrove WordTokenizer: NLTK's Treebank words per sentence, sentences by our rule (no punkt download)."""
    from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings
    from nltk.tokenize.destructive import NLTKWordTokenizer

    class NLTKWordsOurSentences(WordTokenizer):
        def __init__(self):
            super().__init__("en")
            self._words = NLTKWordTokenizer()

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, start = [], 0
            for m in SENTENCE_END_RE.finditer(text):
                spans.append((start, m.start()))
                start = m.end()
            return spans + [(start, len(text))]

        def sent_tokenize(self, text: str) -> list[str]:
            return strip_strings([text[a:b] for a, b in self.span_tokenize(text)])

        def word_tokenize(self, text: str) -> list[str]:
            return strip_strings([w for a, b in self.span_tokenize(text) for w in self._words.tokenize(text[a:b])])

    return NLTKWordsOurSentences()


def datatrove_minhash(texts: list[str], tokenizer, workdir: str) -> np.ndarray:
    """datatrove's three MinHash stages (signatures, buckets, clusters) on local disk with FineWeb's config; the
    returned roots come from the duplicate pairs of the bucket stage, joined by union-find."""
    import struct

    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )

    config = MinhashConfig()  # 5-grams, 14 x 8, seed 1: the same as minhash_dedup's defaults
    sigs, dups, clusters = (os.path.join(workdir, d) for d in ("sigs", "dups", "clusters"))
    MinhashDedupSignature(sigs, config=config, language=tokenizer).run(
        (Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=0, world_size=1
    )
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(sigs, dups, config=config).run(rank=bucket, world_size=config.num_buckets)
    MinhashDedupCluster(dups, clusters, config=config).run()
    lefts, rights = [], []
    for name in sorted(os.listdir(dups)):
        with open(os.path.join(dups, name), "rb") as f:
            for _, a, _, b in struct.iter_unpack("<4I", f.read()):
                lefts.append(a)
                rights.append(b)
    return first_of_components(len(texts), np.asarray(lefts, dtype=np.int64), np.asarray(rights, dtype=np.int64))


def run_filters(texts: list[str], tokenizer) -> list[dict[str, Any]]:
    rows = []
    for name, (dt_name, dt_args) in FILTERS.items():
        step = Pipeline.from_names([name]).steps[0]
        ours, t_ours = timed(lambda fn: [fn(t) for t in texts], step.process)
        row: dict[str, Any] = {"stage": name, "docs": len(texts), "ours_docs_per_s": len(texts) / t_ours}
        row["ours_removed"] = sum(r is not None for _, r in ours)
        if tokenizer is not None:
            import datatrove.pipeline.filters as dt_filters
            from datatrove.data import Document

            flt = getattr(dt_filters, dt_name)(language=tokenizer, **dt_args)
            docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
            theirs, t_theirs = timed(lambda fn, items: [fn(d) for d in items], flt.filter, docs)
            kept_theirs = [r is True or (isinstance(r, tuple) and r[0]) for r in theirs]
            kept_ours = [r is None for _, r in ours]
            same = [a == b for a, b in zip(kept_ours, kept_theirs)]
            both_kept = [i for i, (a, b) in enumerate(zip(kept_ours, kept_theirs)) if a and b]
            row.update(
                datatrove_docs_per_s=len(texts) / t_theirs,
                speed_ratio=t_theirs / t_ours,
                datatrove_removed=len(texts) - sum(kept_theirs),
                decision_agreement=sum(same) / len(texts),
                kept_text_equal=sum(ours[i][0] == docs[i].text for i in both_kept) / max(1, len(both_kept)),
                disagreements=dict(  # (our reason, theirs) -> documents, "keep" for a kept document
                    Counter(
                        f"{ours[i][1] or 'keep'} / {theirs[i][1] if isinstance(theirs[i], tuple) else 'keep'}"
                        for i, ok in enumerate(same)
                        if not ok
                    ).most_common()
                ),
            )
        rows.append(row)
    return rows


def run_minhash(texts: list[str], planted: list[tuple[int, int]], tokenizer) -> dict[str, Any]:
    roots, t_ours = timed(ours_minhash, texts)
    ours = cluster_pairs(roots)
    truth = set(planted)
    row: dict[str, Any] = {"stage": "minhash_dedup", "docs": len(texts), "ours_docs_per_s": len(texts) / t_ours}
    row.update(ours_pairs=len(ours), planted_pairs=len(truth), ours_planted_recall=len(ours & truth) / len(truth))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as workdir:
            their_roots, t_theirs = timed(datatrove_minhash, texts, tokenizer, workdir)
        theirs = cluster_pairs(their_roots)
        row.update(datatrove_docs_per_s=len(texts) / t_theirs, speed_ratio=t_theirs / t_ours)
        row.update(datatrove_pairs=len(theirs), datatrove_planted_recall=len(theirs & truth) / len(truth))
        row.update({f"pairs_{k}": v for k, v in pair_agreement(ours, theirs).items()})
    return row


def run_substring_dedup(texts: list[str]) -> dict[str, Any]:
    """Ours only (datatrove's exact-substring dedup runs Lee et al.'s external Rust tool): stage 2's suffix-array pass
    over the whole input, C++ and NumPy."""
    step = Pipeline.from_names(["substring_dedup"]).steps[0]
    data, lengths = step.text_bytes(texts), step.keys(texts)[:, 0]
    row: dict[str, Any] = {"stage": "substring_dedup", "docs": len(texts), "bytes": len(data)}
    for impl in ("cpp", "numpy") if cpp_available() else ("numpy",):
        step.impl = impl
        cuts, seconds = timed(step.find_cuts, data, lengths)
        row[f"{impl}_docs_per_s"] = len(texts) / seconds
        row[f"{impl}_mb_per_s"] = len(data) / seconds / 1e6
    row["ours_docs_per_s"] = row.get("cpp_docs_per_s", row["numpy_docs_per_s"])
    row["bytes_cut_fraction"] = int((cuts.end - cuts.start).sum()) / max(1, len(data))
    row["documents_emptied"] = len(cuts.emptied)
    return row


def datatrove_available() -> bool:
    try:
        import datatrove.pipeline.filters  # noqa: F401
        import nltk.tokenize.destructive  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["stage", "docs", "ours_docs_per_s", "datatrove_docs_per_s", "speed_ratio", "agreement"]
    print(" | ".join(f"{c:>20}" for c in cols))
    for row in rows:
        agreement = row.get("decision_agreement", row.get("pairs_f1"))
        cells = [row["stage"], row["docs"], row["ours_docs_per_s"], row.get("datatrove_docs_per_s"),
                 row.get("speed_ratio"), agreement]  # fmt: skip
        print(" | ".join(f"{c:>20.3f}" if isinstance(c, float) else f"{'-' if c is None else c:>20}" for c in cells))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=4000, help="documents, planted duplicates included")
    p.add_argument("--dup-fraction", type=float, default=0.1)
    p.add_argument("--edit-rate", type=float, default=0.005, help="fraction of words replaced in a near-duplicate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-datatrove", action="store_true", help="time ours only")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if args.docs < 10 or not 0 <= args.dup_fraction < 1:
        p.error("--docs must be >= 10 and --dup-fraction in [0, 1)")
    use_datatrove = not args.no_datatrove and datatrove_available()
    if use_datatrove:
        from loguru import logger  # datatrove logs every stage at INFO

        logger.remove()
    tokenizer = datatrove_tokenizer() if use_datatrove else None
    texts, planted = make_corpus(args.docs, args.dup_fraction, args.edit_rate, args.seed)
    rows = [run_minhash(texts, planted, tokenizer)] + run_filters(texts, tokenizer) + [run_substring_dedup(texts)]
    meta = {"cpus_available": len(os.sched_getaffinity(0)), "processes": 1, "datatrove": use_datatrove}
    rows = [{**row, **meta} for row in rows]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
