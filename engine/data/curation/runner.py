"""`curate`: runs a pipeline over input files into an output directory, resumably (see stages.py for the stages and
the marker rule), and writes `report.json`."""

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.data.curation.documents import input_format
from engine.data.curation.executor import LocalExecutor, ShardExecutor
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.report import build_report
from engine.data.curation.stages import (
    RunPaths,
    cluster_all,
    output_name,
    process_shard,
    read_marker,
    write_marker,
    write_shard,
)
from engine.data.curation.steps import CurationError
from engine.data.preprocess import resolve_inputs

OUTPUT_FORMATS = ("jsonl", "jsonl.gz")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_manifest(paths: RunPaths, manifest: dict[str, Any]) -> None:
    """A directory resumes only the run it was started for: same inputs, steps, parameters and output format."""
    found = read_marker(paths.manifest())
    if found is None:
        write_marker(paths.manifest(), manifest)
    elif found != json.loads(json.dumps(manifest)):
        raise CurationError(
            f"{paths.output} holds a curation run with other inputs or steps; use a new --output or remove it"
        )


def curate(
    inputs: Sequence[str],
    output: str,
    pipeline: Pipeline,
    workers: int = 1,
    output_format: str = "jsonl.gz",
    progress: bool = True,
    executor: ShardExecutor | None = None,
    warn: Callable[[str], None] = _warn,
) -> dict[str, Any]:
    """Curates `inputs` (files or quoted globs, in order) into `output`/NNNNN_name.<output_format>, one output per
    input, and returns the report. Re-running after a crash redoes only the unfinished shards of the unfinished
    stages."""
    start = time.perf_counter()
    if workers < 1:
        raise CurationError(f"workers must be >= 1, got {workers}")
    if output_format not in OUTPUT_FORMATS:
        raise CurationError(f"unknown output format {output_format!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    files = resolve_inputs(inputs)
    if "embedded" in files:
        raise CurationError("'embedded' is not a curation input; pass files")
    files = [os.path.abspath(p) for p in files]
    for path in files:
        input_format(path)
    if os.path.exists(output) and not os.path.isdir(output):
        raise CurationError(f"{output}: exists and is not a directory")
    paths = RunPaths(os.path.abspath(output))
    others = set(os.listdir(output)) - {".curation"} if os.path.isdir(output) else set()
    if others and not os.path.isfile(paths.manifest()):
        raise CurationError(f"{output}: a non-empty directory that holds no curation run (its files would be "
                            "overwritten); use a new --output")  # fmt: skip
    os.makedirs(paths.work, exist_ok=True)
    manifest = {
        "inputs": files,
        "text_key": pipeline.text_key,
        "output_format": output_format,
        "steps": pipeline.describe(),
    }
    _check_manifest(paths, manifest)
    executor = executor or LocalExecutor(workers, progress)

    todo = [(i, p, pipeline, paths) for i, p in enumerate(files) if read_marker(paths.processed(i, "done")) is None]
    for meta in executor.run(process_shard, todo, "filter+keys"):
        for line in meta["bad_lines"]:
            warn(line)
    if read_marker(paths.clusters("done")) is None:
        cluster_all(pipeline, paths, len(files))
    outputs = [os.path.join(paths.output, output_name(i, p, output_format)) for i, p in enumerate(files)]
    todo = [(i, pipeline, paths, outputs[i]) for i in range(len(files)) if read_marker(paths.written(i)) is None]
    for _ in executor.run(write_shard, todo, "write"):
        pass
    return build_report(pipeline, paths, files, time.perf_counter() - start)
