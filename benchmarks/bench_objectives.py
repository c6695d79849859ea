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
   mtp (next-token samples: the extra modules shift the labels in the model), prefix (prefix_lm.py, a prefix
   length per sample), and the encoder-decoder's span (T5 span corruption, density 0.15, mean span 3) and ul2 (the
   seven-denoiser mixture at rates 0.4/0.4/0.2) with the tokenizer's sentinel ids, on windows of the objective's
   `window_length` raw tokens (a stream of that length minus one, as the trainer builds it). Where the full UL2
   mixture is refused (at seq 1024 its X denoisers make more spans than the 100 sentinels) the row "ul2 R+S" times
   it at objective.ul2_x_rate 0 (the R and S denoisers) and the row's `note` keeps the refusal. Best of
   `--repeats`. The whole `collate` (dataset read, transform, the per-row keywords, stacking into tensors) is timed
   on micro-batches of 16 samples too.
3. Consumption, the samples/s a training step takes:
   - tiny: measured, `engine.train.train` on examples/configs/tiny.toml for `--trainer-steps` steps on this CPU
     (no eval, no checkpoints; the loop's tokens/s, the mean over the steps after the first) / seq_len. With
     `--trainer-steps 0` (and in `--smoke`) the figure of benchmarks/RESULTS.md is used instead (bench_train,
     2026-11-29: 6,426 tokens/s), and the output says so.
   - 125M: computed for one H100 from `engine.model.gpt.flops_per_token` of examples/configs/gpt2_125m.toml at an
     ASSUMED 40% MFU of 989 TFLOP/s (dense bf16 peak): tokens/s = 0.4 x 989e12 / FLOPs per token, / seq_len.
   The consumption is the decoder-only GPT's of each config: mtp's extra modules and the t5 encoder-decoder (span,
   ul2: encoder and decoder layers) make a step slower, so their margins are, if anything, larger than shown.
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
from engine.training.samples import SampleStream, SequenceLayout, collate, load_data_sources

SEED = 1234
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
ASSUMED_MFU = 0.40
RESULTS_TINY_TOKENS_PER_S = 6426.0  # benchmarks/RESULTS.md, "Training loop vs a plain PyTorch loop", 2026-11-29
CONFIGS = {"tiny": "examples/configs/tiny.toml", "gpt2_125m": "examples/configs/gpt2_125m.toml"}
MICRO_BATCH = 16
# name -> (train.objective, SampleObjective keywords)
TRANSFORMS = {
    "clm": ("clm", {}),
    "fim0.5": ("fim", {"fim_rate": 0.5}),
    "fim1.0": ("fim", {"fim_rate": 1.0}),
    "mlm": ("mlm", {}),
    "mtp": ("mtp", {}),
    "prefix": ("prefix", {}),
    "span": ("span", {}),
    "ul2": ("ul2", {}),
}
UL2_WITHOUT_X = ("ul2 R+S", {"ul2_x_rate": 0.0})  # where the full mixture needs more sentinels than there are


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


def _objective(name: str, objective: str, kwargs: dict, tok, seq: int) -> tuple[str, SampleObjective, str]:
    """(row name, the trainer's objective, note): ul2's full mixture, or without the X denoisers where it is
    refused at this sequence length (the note says why)."""
    try:
        return name, SampleObjective(objective, SEED, tok, seq_len=seq, **kwargs), ""
    except ValueError as e:
        if objective != "ul2":
            raise
        label, fallback = UL2_WITHOUT_X
        return label, SampleObjective(objective, SEED, tok, seq_len=seq, **fallback), f"full mixture refused: {e}"


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
        batches = [list(range(i, min(i + MICRO_BATCH, n))) for i in range(0, n, MICRO_BATCH)]
        for name, (objective, kwargs) in TRANSFORMS.items():
            label, obj, note = _objective(name, objective, kwargs, tok, seq)
            layout = None if objective == "clm" else SequenceLayout(objective=obj)  # as from_config makes them
            window = obj.window_length  # seq_len + 1, or the denoisers' window (span, ul2)
            src = stream if window == seq + 1 else SampleStream(data.train_prefix, window - 1, SEED, tok.vocab_size,
                                                                index_cache)  # fmt: skip
            own = samples if src is stream else [np.asarray(src[k]["tokens"], dtype=np.int64) for k in range(n)]
            assert len(own[0]) == window
            s = _best(repeats, _transform, obj, own)
            c = _best(repeats, _collate, src, batches, layout)
            rows.append({**base, "transform": label, "raw_len": window, "samples_per_s": n / s,
                         "collate_samples_per_s": n / c, "note": note})  # fmt: skip
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
        r["collate_margin"] = r["collate_samples_per_s"] / need

    report = {"date": datetime.date.today().isoformat(), "device": f"CPU, {os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__, "smoke": args.smoke,
              "samples": args.samples, "repeats": args.repeats, "consumption": consumption, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    _table("consumption (samples/s a training step takes)", ["config", "seq_len", "tokens/s", "samples/s", "source"],
           [[c["config"], c["seq_len"], f"{c['tokens_per_s']:,.0f}", f"{c['samples_per_s']:,.1f}", c["source"]]
            for c in consumption.values()])  # fmt: skip
    fmt = lambda x: f"{x:,.0f}"
    _table(
        f"transforms, one core, best of {args.repeats} over {args.samples} samples (margin = samples/s / consumption)",
        ["tokenizer", "config", "seq_len", "transform", "samples/s", "tokens/s", "margin", "collate samples/s",
         "collate margin"],
        [[r["tokenizer"], r["config"], r["seq_len"], r["transform"], fmt(r["samples_per_s"]),
          fmt(r["samples_per_s"] * r["seq_len"]), f"{r['margin']:,.1f}x", fmt(r["collate_samples_per_s"]),
          f"{r['collate_margin']:,.1f}x"] for r in rows],
    )  # fmt: skip
    for r in rows:
        if r["note"]:
            print(f"{r['tokenizer']} {r['config']} {r['transform']}: {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
