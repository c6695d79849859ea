"""Objective transforms vs the trainer's consumption: can the loader keep up with a training step?

    python -m benchmarks.bench_objectives [--tokenizers bpe,byte] [--samples 400] [--repeats 3]
                                          [--trainer-steps 8] [--smoke] [--json PATH]

Method:
1. Real packed samples of the embedded corpus (`data.path embedded`, train split) are read with the trainer's
   `SampleStream` (seed 1234) for each tokenizer (`bpe`: the default config's 4096-id BPE, trained into
   $ENGINE_CACHE once, ~10 s, outside the timing; `byte`) at the sequence lengths of the two configs compared:
   128 (examples/configs/tiny.toml) and 1024 (examples/configs/gpt2_125m.toml).
2. Each transform runs over the first `--samples` samples, already read into memory, one sample at a time on one
   core, as the trainer's collate calls it (`SampleObjective(name, seed, tokenizer, ...)(tokens, index)`, on a
   generator seeded by (seed, index)): clm, fim at fim_rate 0.5 and 1.0 (spm_rate 0.5, context level), mlm (15%),
   and T5 span corruption (span_corruption.py: `random_spans_noise_mask` + `span_corrupt`, density 0.15, mean span
   3) on raw samples of `t5_lengths(seq_len)[0]` tokens (a stream of that length minus one, so a sample holds
   exactly that many). Today's tokenizers reserve 8 spare ids, fewer than the spans of a long window, so span
   corruption takes stand-in sentinel ids above the vocabulary (T5's extra ids sit at its top; the cost does not
   depend on their values). Best of `--repeats`. For the trainer's objectives the whole `collate` (dataset read,
   transform, stacking into tensors) is timed on micro-batches of 16 samples too.
3. Consumption, the samples/s a training step takes:
   - tiny: measured, `engine.train.train` on examples/configs/tiny.toml for `--trainer-steps` steps on this CPU
     (no eval, no checkpoints; the loop's tokens/s, the mean over the steps after the first) / seq_len. With
     `--trainer-steps 0` (and in `--smoke`) the figure of benchmarks/RESULTS.md is used instead (bench_train,
     2026-11-29: 6,426 tokens/s), and the output says so.
   - 125M: computed for one H100 from `engine.model.gpt.flops_per_token` of examples/configs/gpt2_125m.toml at an
     ASSUMED 40% MFU of 989 TFLOP/s (dense bf16 peak): tokens/s = 0.4 x 989e12 / FLOPs per token, / seq_len.
4. Margin = transform samples/s (one core) / consumption. The loader runs in the training process of each rank, so
   its time adds to the step: a margin of m costs about 1/m of the step; "the loader must never be the bottleneck"
   wants m well above 1.

`--smoke`: byte tokenizer, 24 samples, 1 repeat, no trainer run (seconds). Tables are printed last; `--json PATH`
writes every row and the consumption figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_data import _table
from engine.config import load_config
from engine.data._files import cache_root
from engine.model.gpt import flops_per_token
from engine.objectives.sample_objective import SampleObjective
from engine.objectives.span_corruption import random_spans_noise_mask, span_corrupt, t5_lengths
from engine.training.samples import SampleStream, SequenceLayout, collate, load_data_sources

SEED = 1234
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
ASSUMED_MFU = 0.40
RESULTS_TINY_TOKENS_PER_S = 6426.0  # benchmarks/RESULTS.md, "Training loop vs a plain PyTorch loop", 2026-11-29
CONFIGS = {"tiny": "examples/configs/tiny.toml", "gpt2_125m": "examples/configs/gpt2_125m.toml"}
MICRO_BATCH = 16
# name -> (train.objective, fim_rate); span is timed separately (not a trainer objective yet)
TRANSFORMS = {"clm": ("clm", 0.5), "fim0.5": ("fim", 0.5), "fim1.0": ("fim", 1.0), "mlm": ("mlm", 0.5)}


def _config(name: str, *flags: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(["--config", os.path.join(root, CONFIGS[name]), *flags])


def _best(repeats: int, fn, *args) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def tiny_consumption(steps: int) -> dict:
    """Samples/s a training step of the tiny config consumes: measured over `steps` steps, or RESULTS.md's figure."""
    cfg = _config("tiny")
    seq = cfg.model.seq_len
    if steps <= 0:
        tps, source = RESULTS_TINY_TOKENS_PER_S, "benchmarks/RESULTS.md (bench_train 2026-11-29, 6,426 tok/s, CPU)"
    else:
        from engine.train import train

        with tempfile.TemporaryDirectory() as tmp:
            flags = ["--train.steps", str(steps), "--eval.every", "0", "--checkpoint.every", "0", "--run.dir", tmp,
                     "--run.progress", "false", "--run.tensorboard", "false", "--resume", "never"]  # fmt: skip
            result = train(_config("tiny", *flags))
        tps = result.tokens_per_s
        source = f"measured: engine.train.train, {steps} steps on this CPU ({torch.get_num_threads()} threads)"
    return {"config": "tiny", "seq_len": seq, "tokens_per_s": tps, "samples_per_s": tps / seq, "source": source}


def h100_consumption() -> dict:
    """Samples/s one H100 consumes at the 125M config, at the assumed MFU (computed, not measured)."""
    cfg = _config("gpt2_125m")
    fpt = flops_per_token(cfg.model)
    tps = ASSUMED_MFU * H100_BF16_PEAK / fpt
    return {"config": "gpt2_125m", "seq_len": cfg.model.seq_len, "flops_per_token": fpt, "tokens_per_s": tps,
            "samples_per_s": tps / cfg.model.seq_len,
            "source": f"computed: ASSUMED {ASSUMED_MFU:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 "
                      "(one H100) / flops_per_token"}  # fmt: skip


def _read(stream: SampleStream, n: int) -> None:
    for k in range(n):
        stream[k]


def _transform(objective: SampleObjective, samples: list[np.ndarray]) -> None:
    for k, tokens in enumerate(samples):
        objective(tokens, k)


def _collate(stream: SampleStream, batches: list[list[int]], layout: SequenceLayout | None) -> None:
    for indices in batches:
        collate(stream, indices, torch.device("cpu"), layout)


def _span(tokenizer, raw: list[np.ndarray]) -> None:
    """T5 span corruption of each raw sample, on the per-sample generator the trainer's objectives use."""
    sentinels = tokenizer.vocab_size + np.arange(len(raw[0]))  # stand-ins above the vocabulary (see the docstring)
    for k, tokens in enumerate(raw):
        mask = random_spans_noise_mask(len(tokens), 0.15, 3.0, np.random.default_rng([SEED, k]))
        span_corrupt(tokens, mask, sentinels, tokenizer.eod_id)


def bench_tokenizer(tok_name: str, seq_lens: dict[str, int], n: int, repeats: int) -> list[dict]:
    cfg = load_config(["--data.tokenizer", tok_name])
    t = time.perf_counter()
    data = load_data_sources(cfg)  # trains/tokenises into $ENGINE_CACHE on first use
    prep_s = time.perf_counter() - t
    tok = data.tokenizer
    index_cache = os.path.join(cache_root(cfg.data.cache_dir or None), "indices")  # where the trainer keeps them
    rows = []
    for config, seq in seq_lens.items():
        stream = SampleStream(data.train_prefix, seq, SEED, tok.vocab_size, index_cache)
        samples = [np.asarray(stream[k]["tokens"], dtype=np.int64) for k in range(n)]
        read_s = _best(repeats, _read, stream, n)
        base = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "config": config, "seq_len": seq,
                "samples": n, "tokenizer_prep_s": prep_s, "read_samples_per_s": n / read_s}  # fmt: skip
        for name, (objective, fim_rate) in TRANSFORMS.items():
            obj = SampleObjective(objective, SEED, tok, fim_rate=fim_rate)
            s = _best(repeats, _transform, obj, samples)
            layout = None if objective == "clm" else SequenceLayout(objective=obj)  # as from_config makes them
            batches = [list(range(i, min(i + MICRO_BATCH, n))) for i in range(0, n, MICRO_BATCH)]
            c = _best(repeats, _collate, stream, batches, layout)
            rows.append({**base, "transform": name, "samples_per_s": n / s, "collate_samples_per_s": n / c})
        raw_len = t5_lengths(seq)[0]
        raw_stream = SampleStream(data.train_prefix, raw_len - 1, SEED, tok.vocab_size, index_cache)
        raw = [np.asarray(raw_stream[k]["tokens"], dtype=np.int64) for k in range(n)]
        assert len(raw[0]) == raw_len
        s = _best(repeats, _span, tok, raw)
        rows.append({**base, "transform": "span", "raw_len": raw_len, "samples_per_s": n / s,
                     "collate_samples_per_s": None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", default="bpe,byte")
    p.add_argument("--samples", type=int, default=400, help="samples per transform and sequence length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=8, help="tiny-config steps to time; 0: RESULTS.md's figure")
    p.add_argument("--smoke", action="store_true", help="byte tokenizer, 24 samples, 1 repeat, no trainer run")
    p.add_argument("--json", default="", help="write the rows and consumption figures here")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokenizers, args.samples, args.repeats, args.trainer_steps = "byte", 24, 1, 0
    if args.samples < 1 or args.repeats < 1:
        raise SystemExit("--samples and --repeats must be >= 1")

    seq_lens = {name: _config(name).model.seq_len for name in CONFIGS}
    rows = []
    for tok_name in args.tokenizers.split(","):
        rows += bench_tokenizer(tok_name, seq_lens, args.samples, args.repeats)
    consumption = {"tiny": tiny_consumption(args.trainer_steps), "gpt2_125m": h100_consumption()}
    for r in rows:
        need = consumption[r["config"]]["samples_per_s"]
        r["consumption_samples_per_s"] = need
        r["margin"] = r["samples_per_s"] / need
        r["collate_margin"] = r["collate_samples_per_s"] / need if r["collate_samples_per_s"] else None

    report = {"date": datetime.date.today().isoformat(), "device": f"CPU, {os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__, "smoke": args.smoke,
              "samples": args.samples, "repeats": args.repeats, "consumption": consumption, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    _table("consumption (samples/s a training step takes)", ["config", "seq_len", "tokens/s", "samples/s", "source"],
           [[c["config"], c["seq_len"], f"{c['tokens_per_s']:,.0f}", f"{c['samples_per_s']:,.1f}", c["source"]]
            for c in consumption.values()])  # fmt: skip
    fmt = lambda x: "-" if x is None else f"{x:,.0f}"
    _table(
        f"transforms, one core, best of {args.repeats} over {args.samples} samples (margin = samples/s / consumption)",
        ["tokenizer", "config", "seq_len", "transform", "samples/s", "tokens/s", "margin", "collate samples/s",
         "collate margin"],
        [[r["tokenizer"], r["config"], r["seq_len"], r["transform"], fmt(r["samples_per_s"]),
          fmt(r["samples_per_s"] * r["seq_len"]), f"{r['margin']:,.1f}x", fmt(r["collate_samples_per_s"]),
          "-" if r["collate_margin"] is None else f"{r['collate_margin']:,.1f}x"] for r in rows],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
