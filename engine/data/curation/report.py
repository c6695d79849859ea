"""`report.json`: per step, the documents and bytes that went in and came out, the removal reasons with counts, how
many documents it changed, and a few removed samples; plus the malformed input lines.

A document's fate is the first step that removed it: a document step (recorded in stage 1) or a dedup step (stage 2).
Because a dedup step only clusters documents that reached it, the two never disagree about order, and the counts of
every step follow from the per-document sizes recorded in stage 1.
"""

import json
from collections import Counter
from typing import Any

import numpy as np

from engine.data._files import atomic_write
from engine.data.curation.documents import read_documents
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.stages import (
    NOT_REMOVED,
    SAMPLE_CHARS,
    SAMPLES_PER_REASON,
    RunPaths,
    load_clusters,
    load_processed,
    read_marker,
)
from engine.data.curation.steps import DedupStep

BAD_LINES_LISTED = 20


def build_report(pipeline: Pipeline, paths: RunPaths, inputs: list[str], seconds: float) -> dict[str, Any]:
    """The report of a completed run (all stage markers present), also written to `paths.report()`."""
    shards = [load_processed(paths, i) for i in range(len(inputs))]
    metas = [read_marker(paths.processed(i, "done")) for i in range(len(inputs))]
    written = [read_marker(paths.written(i)) for i in range(len(inputs))]
    clusters = load_clusters(paths)
    n_steps = len(pipeline.steps)
    removed_at = np.concatenate([s["removed_at"] for s in shards]).astype(np.int64)
    final = np.where(clusters["dedup_at"] != NOT_REMOVED, clusters["dedup_at"], removed_at)
    final = np.where(final == NOT_REMOVED, n_steps, final)  # n_steps: survived every step
    sizes = np.concatenate([s["sizes"] for s in shards]).reshape(-1, n_steps + 1)
    changed = np.concatenate([s["changed"] for s in shards]).reshape(-1, n_steps)
    if "cut_doc" in clusters and len(clusters["cut_doc"]):  # substring dedup (always the last step) cut these bytes
        cut = np.bincount(clusters["cut_doc"], clusters["cut_end"] - clusters["cut_start"], minlength=len(sizes))
        sizes[:, n_steps] -= cut.astype(np.int64)
        changed[:, n_steps - 1] |= cut > 0
    reason_names = np.concatenate(
        [np.asarray(m["reasons"] + [""], dtype=object)[s["reason_code"]] for s, m in zip(shards, metas)]
    ) if shards else np.zeros(0, dtype=object)  # fmt: skip
    samples = _samples(pipeline, inputs, shards, metas, final, clusters["offsets"], clusters["duplicate_of"])
    steps = []
    for j, (step, desc) in enumerate(zip(pipeline.steps, pipeline.describe())):
        went_in, came_out = final >= j, final > j
        removed = final == j
        if isinstance(step, DedupStep):
            reasons = {step.reason: int(removed.sum())} if removed.any() else {}
        else:
            reasons = dict(Counter(reason_names[removed].tolist()).most_common())
        steps.append(
            {
                **desc,
                "documents_in": int(went_in.sum()),
                "documents_out": int(came_out.sum()),
                "bytes_in": int(sizes[went_in, j].sum()),
                "bytes_out": int(sizes[came_out, j + 1].sum()),
                "documents_changed": int((changed[:, j] & came_out).sum()),
                "removed": reasons,
                "samples": samples.get(j, []),
            }
        )
    bad = [line for m in metas for line in m["bad_lines"]]
    report = {
        "inputs": inputs,
        "outputs": [w["output"] for w in written],
        "text_key": pipeline.text_key,
        "documents_in": int(len(final)),
        "documents_out": int((final == n_steps).sum()),
        "bytes_in": int(sizes[:, 0].sum()),
        "bytes_out": int(sizes[final == n_steps, n_steps].sum()),
        "malformed_lines": len(bad),
        "malformed_lines_first": bad[:BAD_LINES_LISTED],
        "seconds": round(seconds, 3),
        "steps": steps,
    }
    with atomic_write(paths.report(), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return report


def _samples(pipeline, inputs, shards, metas, final, offsets, duplicate_of) -> dict[int, list[dict[str, Any]]]:
    """Up to SAMPLES_PER_REASON removed documents per step and reason, each naming its file and line. A document
    step's samples were kept in stage 1 (dropped here if an earlier dedup removed the document); a dedup step's are
    the first documents it removed, read back from the input (as they were before any step) with the location of
    the document they duplicate."""
    out: dict[int, list[dict[str, Any]]] = {}
    taken: Counter = Counter()
    for shard, meta in enumerate(metas):
        for sample in meta["samples"]:
            g = int(offsets[shard]) + sample["index"]
            if final[g] != sample["step"] or taken[(sample["step"], sample["reason"])] >= SAMPLES_PER_REASON:
                continue
            taken[(sample["step"], sample["reason"])] += 1
            entry = {k: v for k, v in sample.items() if k not in ("step", "index")}
            out.setdefault(sample["step"], []).append({"file": inputs[shard], **entry})

    def locate(g: int) -> tuple[int, int]:
        shard = int(np.searchsorted(offsets, g, side="right")) - 1
        return shard, int(shards[shard]["lines"][g - int(offsets[shard])])

    for j, step in enumerate(pipeline.steps):
        if not isinstance(step, DedupStep):
            continue
        for g in np.flatnonzero(final == j)[:SAMPLES_PER_REASON].tolist():
            shard, line = locate(g)
            doc = next(d for n, d in read_documents(inputs[shard], pipeline.text_key) if n == line)
            of_shard, of_line = locate(int(duplicate_of[g]))
            entry = {"file": inputs[shard], "reason": step.reason, "line": line, "id": doc.get("id")}
            entry["text"] = doc[pipeline.text_key][:SAMPLE_CHARS]
            entry["duplicate_of"] = f"{inputs[of_shard]}:{of_line}"
            out.setdefault(j, []).append(entry)
    return out
