"""`python -m engine.evaluation RUN_DIR [--data PREFIX] [--batches N] [--tasks FILE.jsonl ...] [--shots K] [--json]`

Loads the run's config and newest complete checkpoint (any layout), then reports the validation loss and perplexity
on held-out data (the run's data.valid_path, or --data) and, for each --tasks file, zero/few-shot multiple-choice
accuracy (acc, acc_norm) by log-likelihood. Errors are one line on stderr and exit status 2 (ENGINE_DEBUG=1: a
traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.checkpointer import CheckpointError
from engine.config import ConfigError
from engine.training.precision import autocast, resolve_dtype


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the engine's other errors, instead of usage + error
        raise ConfigError(f"{self.prog}: {message}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m engine.evaluation", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run directory, its checkpoints folder or one step directory")
    p.add_argument("--data", help="held-out dataset prefix (PREFIX.bin/.idx) or blend \"w1 prefix1 w2 prefix2\"; "
                   "default: the run's data.valid_path")
    p.add_argument("--batches", type=int, help="global batches of held-out samples; default: the run's eval.batches")
    p.add_argument("--no-perplexity", action="store_true", help="skip the validation loss")
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE.jsonl", help="multiple-choice task files")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each item (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws (default 1234, as lm-eval)")
    p.add_argument("--delimiter", default=" ", help="between context and choice (default one space, as lm-eval)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.evaluation.loading import load_run
    from engine.evaluation.multiple_choice import read_task, score_task
    from engine.evaluation.perplexity import validation_perplexity

    if args.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {args.shots}")
    tasks = {path: read_task(path) for path in args.tasks}  # a bad task line fails before the model is loaded
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    run = load_run(args.run_dir, device, verify=not args.no_verify)
    out: dict[str, Any] = {"checkpoint": str(run.checkpoint), "step": run.step}
    if not args.no_perplexity:
        out["validation"] = asdict(validation_perplexity(run, args.data, args.batches))
    dtype = resolve_dtype(run.cfg, run.device)
    out["tasks"] = {}
    for path, items in tasks.items():
        res = score_task(run.model, run.tokenizer, items, args.shots, args.seed, args.delimiter, run.device,
                         lambda: autocast(dtype, run.device), name=Path(path).stem)  # fmt: skip
        out["tasks"][path] = {k: v for k, v in asdict(res).items() if k != "loglikelihoods"}
    return out


def _print(out: dict[str, Any]) -> None:
    print(f"checkpoint: {out['checkpoint']} (step {out['step']})")
    v = out.get("validation")
    if v:
        print(f"validation: loss {v['loss']:.6f}  perplexity {v['perplexity']:.4f}  ({v['samples']} samples of "
              f"{v['data']})")  # fmt: skip
        for name, loss in v.get("components", {}).items():
            print(f"  {name}: loss {loss:.6f}  perplexity {math.exp(min(loss, 50.0)):.4f}")
    for path, r in out["tasks"].items():
        err = f" (+- {r['acc_stderr']:.4f})" if r["acc_stderr"] is not None else ""
        print(f"{r['task']}: acc {r['acc']:.4f}{err}  acc_norm {r['acc_norm']:.4f}  "
              f"({r['n']} items, {r['shots']}-shot, {path})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI entry: the exit status; bad input prints one line on stderr and returns 2."""
    try:
        args = _parse(argv)
        out = evaluate_run(args)
    except (CheckpointError, ValueError, OSError) as e:
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(out, indent=1)) if args.json else _print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
