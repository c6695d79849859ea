"""Curate raw documents: `python -m engine.data.curate --input FILES --output DIR [--steps a,b | --pipeline P.toml]`.

Runs quality filters, dedup and PII redaction (engine/data/curation, docs/curation.md) over JSON-lines, parquet or
text files, one output file per input in DIR, plus DIR/report.json. Running the same command again after a crash
resumes: finished files of finished stages are not redone. Bad input prints one line and exits with status 2.
`--executor ray [--ray-address ADDR]` runs the per-file stages as Ray tasks, for several machines (ray_executor.py).
`python -m engine.data.curate mix --domain NAME=PREFIX ...` prints a blend of indexed datasets (curation/mixing.py);
`python -m engine.data.curate doremi ...` prints one with DoReMi weights from a small proxy model (curation/doremi.py).
"""

import argparse
import sys
from collections.abc import Sequence

from engine.data.curation import doremi, mixing
from engine.data.curation.executor import WorkerDied
from engine.data.curation.pipeline import FINEWEB_STEPS, Pipeline
from engine.data.curation.ray_executor import RayExecutor
from engine.data.curation.runner import OUTPUT_FORMATS, curate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.data.curate", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input files or quoted globs, in order")
    p.add_argument("--output", required=True, help="output directory (resumed if it holds the same run)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pipeline", help="pipeline TOML file: [[steps]] tables with name and parameters")
    group.add_argument("--steps", help=f"comma-separated step names (default: {','.join(FINEWEB_STEPS)})")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the per-file stages (local executor)")
    p.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="local process pool, or Ray (optional extra)"
    )
    p.add_argument("--ray-address", help="Ray cluster to join (e.g. auto); default: start a local Ray instance")
    p.add_argument("--text-key", default=None, help="document key holding the text (default: text)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="jsonl.gz")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mix"]:
        return mixing.main(argv[1:])
    if argv[:1] == ["doremi"]:
        return doremi.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ray_address is not None and args.executor != "ray":
        parser.error("--ray-address needs --executor ray")
    try:
        if args.pipeline:
            pipeline = Pipeline.from_toml(args.pipeline, args.text_key)
        else:
            names = args.steps.split(",") if args.steps is not None else FINEWEB_STEPS
            pipeline = Pipeline.from_names(names, args.text_key or "text")
        executor = RayExecutor(args.ray_address, args.progress) if args.executor == "ray" else None
        report = curate(
            args.input, args.output, pipeline, args.workers, args.output_format, args.progress, executor=executor
        )
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.output}: {report['documents_out']}/{report['documents_in']} documents kept, "
        f"{report['bytes_out']}/{report['bytes_in']} bytes, {report['malformed_lines']} malformed lines skipped, "
        f"{report['seconds']:.2f} s (report.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
