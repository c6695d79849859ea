"""Curate, tokenise, mix and train: `python examples/curate_embedded.py [--temperature 2] [--steps 20] [--doremi 5]`.

The embedded corpus (engine/data/corpus.py: Python's standard library as code, its help topics as prose) is written
as one JSON-lines file per domain, curated per domain (engine.data.curation), tokenised into indexed datasets
(engine.data.preprocess), mixed by temperature sampling into a `--data.path` blend (engine.data.curation.mixing), and
a tiny GPT trains on that blend through the engine's trainer. The printed summary gives, per domain, documents
in and out (and what removed them), tokens, the blend weight and the share of the training samples drawn from it.

Steps per domain. Both domains get `exact_dedup`, `minhash_dedup` and `pii` (e-mail/IP redaction): near-duplicate
removal and PII redaction are what code corpora apply too (The Stack, Kocetkov et al. 2022, near-dedup; StarCoder,
Li et al. 2023, near-dedup and PII). Prose also gets `gopher_repetition`. Code gets no web-prose heuristics:
measured on 300 of these files, Gopher's quality rules remove all (276 for too few alphabetic words), C4's 70%
(curly brackets), FineWeb's 94% (lines without terminal punctuation), and even Gopher's repetition rules 42% (code
repeats its n-grams by nature). `gopher_quality`, `c4` and `fineweb` are left off the prose too: the help topics are
full of code samples (`gopher_quality` removes 72 of 73, 67 for too few alphabetic words).

The validation set is the corpus's held-out split (not curated): the trainer evaluates it as one dataset, and the
final checkpoint is then evaluated on each domain's part of it the same way (`domain_val_losses`), the per-domain
losses that data-mixing methods such as DoReMi (Xie et al. 2023) steer by. `--doremi ROUNDS` trains on DoReMi weights
instead (engine.data.curation.doremi: a reference and a proxy model of the same tiny shape, ROUNDS rounds of
`--doremi-steps` steps starting from the temperature weights, validated on a uniform blend of the domains' held-out
splits); the rounds go to DIR/doremi.json. `--max-docs` caps each domain's training documents for smoke runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests): find generate.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from generate import load_model

from engine.config import ConfigError, load_config
from engine.data.corpus import Document, documents
from engine.data.curation import Pipeline, curate
from engine.data.curation.doremi import DoReMiResult, run_doremi
from engine.data.curation.mixing import mix
from engine.data.preprocess import preprocess
from engine.data.tokenizer import load_tokenizer
from engine.train import TrainError, train
from engine.training.evaluate import evaluate
from engine.training.samples import SampleStream, eval_dataset

DOMAIN_STEPS = {
    "code": ["exact_dedup", "minhash_dedup", "pii"],
    "prose": ["exact_dedup", "minhash_dedup", "gopher_repetition", "pii"],
}
TINY_MODEL = {"arch": "llama", "n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 32}
GLOBAL_BATCH = 4


class ExampleError(ValueError):
    """Bad input to the example (an existing run directory, a bad count); printed as one line."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/curate_embedded", help="a new directory (default runs/curate_embedded)")
    p.add_argument("--temperature", type=float, default=2.0, help="mixing temperature T: p ∝ n^(1/T) (default 2)")
    p.add_argument("--steps", type=int, default=20, help="training steps of the tiny model (default 20)")
    p.add_argument("--max-docs", type=int, help="at most this many training documents per domain (smoke runs)")
    doremi = "train on DoReMi weights from ROUNDS proxy rounds started at the temperature weights (default 0: off)"
    p.add_argument("--doremi", type=int, default=0, metavar="ROUNDS", help=doremi)
    p.add_argument("--doremi-steps", type=int, default=10, help="proxy steps per DoReMi round (default 10)")
    p.add_argument("--tokenizer", default="byte", choices=("byte", "bpe"), help="default byte: no BPE training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: every core)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def domain_of(doc: Document) -> str:
    """The document's domain, "code" or "prose": the first component of its name in the corpus."""
    return doc.name.split("/", 1)[0]


def write_jsonl(docs: list[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.name, "text": d.text}) + "\n")


def write_domains(raw: Path, max_docs: int | None) -> dict[str, Path]:
    """raw/<domain>.jsonl for the training split (at most max_docs per domain) and raw/valid_<domain>.jsonl for the
    held-out split; returns the training files."""
    train_docs, valid_docs = documents("train"), documents("valid")
    files = {}
    for domain in DOMAIN_STEPS:
        docs = [d for d in train_docs if domain_of(d) == domain][:max_docs]
        valid = [d for d in valid_docs if domain_of(d) == domain]
        if not docs or not valid:
            raise ExampleError(f"the embedded corpus has no {domain} documents on this Python installation")
        files[domain] = raw / f"{domain}.jsonl"
        write_jsonl(docs, files[domain])
        write_jsonl(valid, raw / f"valid_{domain}.jsonl")
    return files


def curate_domains(files: dict[str, Path], out: Path) -> dict[str, dict]:
    """Each domain through its own pipeline into out/<domain>/; returns the curation reports."""
    reports = {}
    for domain, path in files.items():
        pipeline = Pipeline.from_names(DOMAIN_STEPS[domain])
        reports[domain] = curate([str(path)], str(out / domain), pipeline, output_format="jsonl", progress=False)
    return reports


def tokenize(reports: dict[str, dict], raw: Path, data: Path, tokenizer: str) -> dict[str, str]:
    """data/<domain> from each curated output, data/valid_<domain> from each domain's held-out documents and
    data/valid from all of them; returns the prefixes by those names."""
    prefixes = {}
    for domain, report in reports.items():
        prefixes[domain] = str(data / domain)
        preprocess(report["outputs"], prefixes[domain], tokenizer, progress=False)
        prefixes[f"valid_{domain}"] = str(data / f"valid_{domain}")
        preprocess([str(raw / f"valid_{domain}.jsonl")], prefixes[f"valid_{domain}"], tokenizer, progress=False)
    prefixes["valid"] = str(data / "valid")
    valid_files = [str(raw / f"valid_{domain}.jsonl") for domain in reports]
    preprocess(valid_files, prefixes["valid"], tokenizer, progress=False)
    return prefixes


def sample_shares(blend: str, samples: int, seq_len: int, seed: int, vocab_size: int) -> list[float]:
    """The fraction of the first `samples` training samples drawn from each blend component, as the trainer's
    sample stream draws them."""
    stream = SampleStream(blend, seq_len, seed, vocab_size)
    counts = [0] * len(stream.blend)
    for k in range(samples):
        counts[int(stream[k]["dataset_id"])] += 1
    return [c / samples for c in counts]


def domain_val_losses(run_dir: Path, valid: dict[str, str]) -> dict[str, float]:
    """The final checkpoint's validation loss on each prefix in `valid`, as the trainer's evaluation computes it
    (engine.training.evaluate: eval.batches global batches of fixed samples, loss per token)."""
    model, _, cfg = load_model(str(run_dir))
    m, t = cfg.model, cfg.train
    losses = {}
    for name, prefix in valid.items():
        ds = eval_dataset(prefix, cfg.eval.batches * t.global_batch, m.seq_len, t.seed, m.vocab_size)
        args = (cfg.eval.batches, t.global_batch, t.global_batch, 0, 1, torch.device("cpu"), contextlib.nullcontext)
        losses[name] = evaluate(model, ds, *args)
    return losses


def model_flags(args: argparse.Namespace, steps: int) -> dict:
    """The tiny model, batch and optimizer of every run here (the trained model, DoReMi's reference and proxy)."""
    flags = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    flags.update({
        "train.global_batch": GLOBAL_BATCH, "train.seed": args.seed, "train.threads": args.threads,
        "train.device": "auto", "optim.lr": 3e-3, "optim.warmup": max(1, steps // 10), "data.tokenizer": args.tokenizer,
        "run.progress": "false", "run.tensorboard": "false",
    })  # fmt: skip
    return flags


def _argv(flags: dict) -> list[str]:
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def train_flags(args: argparse.Namespace, blend: str, valid: str) -> list[str]:
    flags = model_flags(args, args.steps)
    flags.update({
        "train.steps": args.steps, "eval.every": args.steps, "eval.batches": 2, "checkpoint.every": 0,
        "data.path": blend, "data.valid_path": valid, "run.dir": str(Path(args.run_dir) / "train"),
    })  # fmt: skip
    return _argv(flags)


def doremi_weights(args: argparse.Namespace, prefixes: dict[str, str], baseline: dict[str, float]) -> DoReMiResult:
    """DoReMi weights over the domains, from `baseline` (the temperature weights), each run in this process; the
    record goes to RUN_DIR/doremi.json."""
    domains = {d: (prefixes[d], prefixes[f"valid_{d}"]) for d in DOMAIN_STEPS}
    flags = _argv({**model_flags(args, args.doremi * args.doremi_steps), "eval.batches": 4})
    result = run_doremi(domains, flags, Path(args.run_dir) / "doremi", args.doremi, args.doremi_steps, baseline,
                        trainer=lambda argv: train(load_config(argv)), log=lambda line: None)  # fmt: skip
    (Path(args.run_dir) / "doremi.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def run(args: argparse.Namespace) -> dict:
    """Writes, curates, tokenises, mixes and trains; returns the summary's figures."""
    run_dir = Path(args.run_dir)
    if args.steps < 1:
        raise ExampleError(f"--steps must be >= 1, got {args.steps}")
    if not args.temperature > 0:
        raise ExampleError(f"--temperature must be > 0 (1: proportional, inf: uniform), got {args.temperature}")
    if args.doremi < 0 or args.doremi_steps < 1:
        raise ExampleError(f"--doremi must be >= 0 and --doremi-steps >= 1, got {args.doremi} and {args.doremi_steps}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ExampleError(f"--max-docs must be >= 1, got {args.max_docs}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ExampleError(f"{run_dir} is not empty; give a new --run-dir")
    t0 = time.perf_counter()
    files = write_domains(run_dir / "raw", args.max_docs)
    reports = curate_domains(files, run_dir / "curated")
    prefixes = tokenize(reports, run_dir / "raw", run_dir / "data", args.tokenizer)
    domains = {d: prefixes[d] for d in DOMAIN_STEPS}
    blend, weights, tokens = mix(domains, args.temperature)
    mixing = f"at T={args.temperature:g}"
    temperature_weights, doremi = dict(weights), None
    if args.doremi:
        doremi = doremi_weights(args, prefixes, weights)
        blend, weights, mixing = doremi.blend, doremi.weights, "by DoReMi"
    vocab = load_tokenizer(args.tokenizer).vocab_size
    shares = sample_shares(blend, args.steps * GLOBAL_BATCH, TINY_MODEL["seq_len"], args.seed, vocab)
    result = train(load_config(train_flags(args, blend, prefixes["valid"])))
    val_losses = domain_val_losses(run_dir / "train", {d: prefixes[f"valid_{d}"] for d in domains})
    return {
        "blend": blend,
        "reports": reports,
        "tokens": tokens,
        "weights": weights,
        "mixing": mixing,
        "temperature_weights": temperature_weights,
        "doremi": doremi,
        "shares": dict(zip(domains, shares)),
        "train_loss": result.losses[max(result.losses)],
        "val_loss": result.val_losses[max(result.val_losses)],
        "domain_val_losses": val_losses,
        "steps": result.end_step,
        "seconds": time.perf_counter() - t0,
    }


def summary(figures: dict, temperature: float) -> str:
    """The report summary: one line per domain, the blend, and the training run's losses."""
    lines = []
    for domain, report in figures["reports"].items():
        removed = ", ".join(f"{s['name']} {s['documents_in'] - s['documents_out']}" for s in report["steps"])
        redacted = sum(s["documents_changed"] for s in report["steps"] if s["name"] == "pii")
        lines.append(
            f"{domain}: {report['documents_out']}/{report['documents_in']} documents kept (removed: {removed}; "
            f"PII redacted in {redacted}), "
            f"{figures['tokens'][domain]:,} tokens, weight {figures['weights'][domain]:.3f} {figures['mixing']}, "
            f"{figures['shares'][domain]:.3f} of the training samples, validation loss "
            f"{figures['domain_val_losses'][domain]:.3f}"
        )
    if figures["doremi"] is not None:
        res = figures["doremi"]
        start = ", ".join(f"{d} {w:.3f}" for d, w in figures["temperature_weights"].items())
        ref = ", ".join(f"{d} {v:.3f}" for d, v in res.reference_losses.items())
        lines.append(f"DoReMi: {len(res.rounds)} proxy rounds from the T={temperature:g} weights ({start}); reference "
                     f"validation losses {ref}; {res.seconds:.0f} s")  # fmt: skip
    lines.append(f"--data.path {figures['blend']}")
    lines.append(
        f"trained {figures['steps']} steps: loss {figures['train_loss']:.3f}, validation loss "
        f"{figures['val_loss']:.3f} ({figures['seconds']:.0f} s in all)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        print(summary(run(args), args.temperature))
        return 0
    except (ExampleError, ConfigError, TrainError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
