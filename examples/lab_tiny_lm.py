"""Lab: train a ~10M-parameter GPT end to end and write a report: `python examples/lab_tiny_lm.py [--wikitext PATH]`.

Data: WikiText-103 when you have it locally (`--wikitext PATH`: a folder or file holding the raw text files
`wiki.train.raw` / `wiki.valid.raw`, or the Hugging Face parquet files `train-*.parquet` / `validation-*.parquet`,
which need pyarrow; nothing is downloaded), split into articles at their ` = Title = ` lines; otherwise the embedded
corpus (engine/data/embedded.py). Both are tokenised with the engine's 4096-token BPE (`--tokenizer byte`: bytes).

Model (the default): Llama-style, 12 layers, d_model 256, 4 heads, SwiGLU 704, seq_len 256, tied embeddings, the
BPE's 4096 ids (already a multiple of 64: no padding): 10,688,768 parameters (9,640,192 non-embedding). It trains
through the engine's trainer (`engine.train.train`, the same config keys as `python -m engine.train`), then samples
text from the final checkpoint (examples/generate.py) and writes RUN_DIR/report.md (validation perplexity, the
exact parameter count, time, a sample) and RUN_DIR/loss_curve.png (when matplotlib is installed; the report says
when it is not). The default budget (480 steps of 4 x 256 tokens, 491,520 tokens) is sized to run in under 10
minutes on 2 CPU cores; `--tiny` (a 2-layer d_model 32 model) and `--steps N` make smoke runs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests): find generate.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from generate import TokenizerIds, load_model

from engine.checkpoint.checkpointer import CheckpointError, complete_checkpoints
from engine.config import ConfigError, load_config
from engine.data.embedded import tokenize_to_dataset
from engine.data.tokenizer import load_tokenizer
from engine.metrics import read_metrics
from engine.model.generate import generate
from engine.model.gpt import count_params
from engine.train import TrainError, train

MODEL = {"arch": "llama", "n_layers": 12, "d_model": 256, "n_heads": 4, "seq_len": 256}
TINY_MODEL = {"arch": "llama", "n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 32}
ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # a top-level heading: WikiText's article boundary


class LabError(ValueError):
    """Bad input to the lab (a missing WikiText path, an existing run); printed as one line."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/lab_tiny_lm", help="a new run directory (default runs/lab_tiny_lm)")
    p.add_argument("--wikitext", help="local WikiText-103: raw text files or parquet (a folder or one file)")
    p.add_argument("--max-train-mb", type=float, default=32.0, help="WikiText training text read, in MB (default 32)")
    p.add_argument("--tokenizer", default="bpe", choices=("bpe", "byte"))
    p.add_argument("--steps", type=int, help="optimizer steps (default 480; --tiny: 20)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d_model 32 model on small batches: a smoke run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: every core)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def wikitext_files(path: str) -> tuple[list[Path], list[Path]]:
    """(train files, valid files) of a local WikiText copy: raw text or parquet."""
    p = Path(path)
    if not p.exists():
        raise LabError(f"--wikitext {p} does not exist (nothing is downloaded: give a local WikiText-103 copy)")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for train_pat, valid_pat in ((r"wiki\.train\.(raw|tokens)$", r"wiki\.valid\.(raw|tokens)$"),
                                 (r"train-.*\.parquet$", r"validation-.*\.parquet$")):  # fmt: skip
        train_files = [f for f in files if re.search(train_pat, f.name)]
        valid_files = [f for f in files if re.search(valid_pat, f.name)]
        if train_files and valid_files:
            return train_files, valid_files
    raise LabError(f"--wikitext {p} holds neither wiki.train.raw + wiki.valid.raw nor train-*.parquet + "
                   "validation-*.parquet")  # fmt: skip


def _lines(f: Path) -> list[str]:
    if f.suffix != ".parquet":
        return f.read_text(encoding="utf-8").splitlines(keepends=True)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LabError(f"reading {f} needs pyarrow (pip install pyarrow), or give the raw text files") from None
    table = pq.read_table(f, columns=["text"])
    return [str(t) for t in table.column("text").to_pylist()]


def articles(files: list[Path], max_chars: float = math.inf) -> list[str]:
    """WikiText's articles (split before each top-level ` = Title = ` line), up to about `max_chars` of text."""
    docs, current, total = [], [], 0
    for f in files:
        for line in _lines(f):
            if ARTICLE_TITLE.match(line.rstrip("\n")) and current:
                docs.append("".join(current))
                current = []
                if total >= max_chars:
                    return docs
            current.append(line)
            total += len(line)
    if current:
        docs.append("".join(current))
    return docs


def prepare_wikitext(path: str, out_dir: Path, tokenizer: str, max_chars: float) -> dict[str, str]:
    """Tokenises the local WikiText into out_dir/{train,valid}.bin/.idx; returns the data.* flags."""
    train_files, valid_files = wikitext_files(path)
    splits = {}
    for split, files, cap in (("train", train_files, max_chars), ("valid", valid_files, math.inf)):
        splits[split] = articles(files, cap)
        if not any(d.strip() for d in splits[split]):
            raise LabError(f"--wikitext: the {split} files {', '.join(map(str, files))} hold no text")
    tok = load_tokenizer(tokenizer)  # the tokenizer the trainer loads for the same data.tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        tokenize_to_dataset(docs, tok, str(out_dir / split))
    return {"data.path": str(out_dir / "train"), "data.valid_path": str(out_dir / "valid")}


def train_flags(args: argparse.Namespace, data: dict[str, str]) -> list[str]:
    """The trainer's flags for this lab run."""
    steps = args.steps if args.steps is not None else (20 if args.tiny else 480)
    model = TINY_MODEL if args.tiny else MODEL
    flags = {f"model.{k}": v for k, v in model.items()}
    flags.update({
        "train.steps": steps, "train.global_batch": 4, "train.seed": args.seed,
        "train.threads": args.threads, "train.device": "auto",
        "optim.lr": 3e-3 if args.tiny else 1e-3, "optim.warmup": max(1, min(30, steps // 10)),
        "eval.every": max(1, steps // 3), "eval.batches": 2 if args.tiny else 4,
        "checkpoint.every": 0, "data.tokenizer": args.tokenizer, "data.path": "embedded",
        "run.dir": args.run_dir, "run.progress": "false", "run.tensorboard": "false",
    })  # fmt: skip
    flags.update(data)
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def loss_curve_png(records: list[dict], path: Path) -> bool:
    """Training loss per step and validation loss where measured; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def sample_text(run_dir: str, prompt: str, max_new: int, seed: int) -> str:
    """A temperature-0.8, top-k-40 continuation of `prompt` from the run's final checkpoint."""
    model, tokenizer, _ = load_model(run_dir)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    out = generate(TokenizerIds(model, tokenizer.vocab_size), ids, max_new, temperature=0.8, top_k=40,
                   eos_id=tokenizer.eod_id, generator=gen)  # fmt: skip
    return tokenizer.decode(out[0].tolist())


def write_report(run_dir: Path, cfg, source: str, result, records: list[dict], png: bool, sample: str) -> dict:
    """RUN_DIR/report.md; returns the figures it states."""
    m = cfg.model
    final = [r for r in records if r.get("val_loss") is not None][-1]
    n, n_body = count_params(m), count_params(m, non_embedding=True)
    tokens = result.end_step * cfg.train.global_batch * m.seq_len
    figures = {"val_loss": final["val_loss"], "val_ppl": math.exp(final["val_loss"]), "step": final["step"],
               "parameters": n, "wall_s": result.wall_s}  # fmt: skip
    curve = ("![loss curve](loss_curve.png)" if png else
             "matplotlib is not installed, so no loss curve was drawn (pip install matplotlib).")  # fmt: skip
    fence = "~~~~"  # the sample may hold backticks
    stopped = (f"- stopped early (SIGTERM) at step {result.end_step} of {cfg.train.steps}: the perplexity below is "
               f"from the last validation, at step {final['step']}\n" if result.preempted else "")  # fmt: skip
    text = f"""# Lab: a tiny LM

- data: {source}; tokenizer {cfg.data.tokenizer} ({m.vocab_size} ids after padding)
- model: {m.arch}, {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, ffn {m.ffn_hidden}, seq_len \
{m.seq_len}, tied embeddings {str(m.tie_embeddings).lower()}: **{n:,} parameters** ({n_body:,} non-embedding)
- training: {result.end_step} steps x {cfg.train.global_batch} sequences x {m.seq_len} tokens = {tokens:,} tokens, \
lr {cfg.optim.lr} ({cfg.optim.schedule}, warmup {cfg.optim.warmup}), {result.wall_s:.1f} s wall \
({result.tokens_per_s:,.0f} tokens/s, {torch.get_num_threads()} threads)
{stopped}- validation perplexity: **{figures["val_ppl"]:.6f}** (loss {final["val_loss"]:.6f} nats per token, step \
{final["step"]}, {cfg.eval.batches} batches x {cfg.train.global_batch} held-out sequences); per token of this \
tokenizer, so not comparable with word-level WikiText perplexities

## Loss curve

{curve}

## Sample (temperature 0.8, top-k 40)

{fence}
{sample}
{fence}
"""
    (run_dir / "report.md").write_text(text, encoding="utf-8")
    return figures


def run_lab(args: argparse.Namespace) -> dict:
    """Prepares the data, trains, samples and writes the report; returns the report's figures."""
    run_dir = Path(args.run_dir)
    if args.steps is not None and args.steps < 1:
        raise LabError(f"--steps must be >= 1, got {args.steps}")
    if complete_checkpoints(run_dir / "checkpoints"):
        raise LabError(f"{run_dir} already holds a run; give a new --run-dir")
    t0 = time.perf_counter()
    data, source = {}, "the embedded corpus (Python's standard library and help topics)"
    if args.wikitext:
        data = prepare_wikitext(args.wikitext, run_dir / "data", args.tokenizer, args.max_train_mb * 1e6)
        source = f"WikiText-103 from {args.wikitext} (at most {args.max_train_mb:g} MB of training text)"
    cfg = load_config(train_flags(args, data))
    result = train(cfg)
    cfg = load_config(["--config", str(run_dir / "config.toml")])  # resolved: vocabulary, ffn width
    records = read_metrics(run_dir / "metrics.jsonl")
    png = loss_curve_png(records, run_dir / "loss_curve.png")
    prompt = "The " if args.wikitext else "def "
    sample = sample_text(str(run_dir), prompt, 24 if args.tiny else 100, args.seed)  # no KV cache: keep it short
    figures = write_report(run_dir, cfg, source, result, records, png, sample)
    figures["total_s"] = time.perf_counter() - t0
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        figures = run_lab(args)
    except (LabError, ConfigError, TrainError, CheckpointError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"validation perplexity {figures['val_ppl']:.4f} at step {figures['step']} ({figures['parameters']:,} "
          f"parameters, {figures['total_s']:.0f} s); report: {Path(args.run_dir) / 'report.md'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
