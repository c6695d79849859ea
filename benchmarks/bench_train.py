"""End-to-end training throughput: `python -m benchmarks.bench_train [--config F] [--steps N] [--section.key v ...]`.

Trains the same model on the same samples twice per repeat, in this one process, alternating:
- "engine": `engine.train.train` (our loop: optimizer from `engine.optim`, metrics, eval and periodic checkpoints off;
  the final checkpoint is written after the timed steps);
- "plain": a textbook PyTorch loop (`torch.optim.AdamW` with its defaults for the device, forward, backward,
  `clip_grad_norm_`, step), reading the same samples in the same order.
Reports tokens/s of each (median over repeats; each run's figure is from its median step time, all steps but the
first, which makes it robust to other jobs on a shared machine), their ratio, and on a GPU the MFU against the
device's dense bf16 peak (engine/metrics.py). Single process only.

`--gpu-suite` runs the ~125M and ~1B configs (examples/configs) and prints their MFU; their steps are large
(262k tokens), so keep it short: `python -m benchmarks.bench_train --gpu-suite --steps 6 --repeats 1`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _engine_run(argv: list[str], run_dir: str) -> float:
    """Our loop; tokens/s from the median step time logged in metrics.jsonl (all steps but the first)."""
    from engine.config import load_config
    from engine.metrics import read_metrics
    from engine.train import train

    cfg = load_config(
        [*argv, "--run.dir", run_dir, "--resume", "never", "--eval.every", "0", "--checkpoint.every", "0"]
        + ["--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1000000"]
    )
    train(cfg)
    times = [r["step_time_s"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["step"] > 1]
    return cfg.train.global_batch * cfg.model.seq_len / statistics.median(times)


def _plain_run(argv: list[str]) -> float:
    """The same model, data and hyperparameters in a minimal loop; tokens/s from the median step time."""
    from engine.config import load_config
    from engine.model.gpt import GPT, resolve
    from engine.training.device import cpu_threads
    from engine.training.samples import SampleStream, load_data_sources

    cfg = load_config(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))  # the engine's thread policy, so both loops get the same cores
    data = load_data_sources(cfg)
    mcfg = resolve(cfg.model, tokenizer_vocab=data.tokenizer.vocab_size)
    stream = SampleStream(data.train_prefix, mcfg.seq_len, cfg.train.seed, mcfg.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = GPT(mcfg).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    bf16 = device.type == "cuda" and cfg.train.dtype in ("auto", "bf16")
    gb = cfg.train.global_batch
    mb = cfg.train.micro_batch or gb
    times = []
    for step in range(cfg.train.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(step * gb, (step + 1) * gb, mb):
            batch = np.stack([stream[k]["tokens"] for k in range(start, start + mb)])
            x = torch.from_numpy(batch).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x[:, :-1], x[:, 1:])
            (loss * mb / gb).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # synchronises, as our loop's logging does
        dt = time.perf_counter() - t0
        if step > 0:
            times.append(dt)
    return gb * mcfg.seq_len / statistics.median(times)


def compare(argv: list[str], repeats: int) -> dict:
    """Alternates plain and engine runs `repeats` times; returns medians, ratio and MFU."""
    from engine.config import load_config
    from engine.metrics import model_flops_utilization, peak_flops
    from engine.model.gpt import count_params, flops_per_token, resolve
    from engine.training.samples import load_data_sources

    ours, plain = [], []
    for _ in range(repeats):
        plain.append(_plain_run(argv))
        with tempfile.TemporaryDirectory() as d:
            ours.append(_engine_run(argv, d))
    cfg = load_config(argv)
    mcfg = resolve(cfg.model, tokenizer_vocab=load_data_sources(cfg).tokenizer.vocab_size)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    peak = peak_flops(device)
    fpt = flops_per_token(mcfg)
    o, p = statistics.median(ours), statistics.median(plain)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params_M": round(count_params(mcfg) / 1e6, 2),
        "flops_per_token": fpt,
        "engine_tokens_per_s": o,
        "plain_tokens_per_s": p,
        "ratio": o / p,
        "engine_runs": ours,
        "plain_runs": plain,
        "engine_mfu": model_flops_utilization(o, fpt, peak, 1),
        "plain_mfu": model_flops_utilization(p, fpt, peak, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--gpu-suite", action="store_true", help="~125M and ~1B configs on the GPU")
    args, rest = ap.parse_known_args(argv)
    rows = []
    if args.gpu_suite:
        suites = [
            ("gpt2_125m", ["--config", str(ROOT / "examples/configs/gpt2_125m.toml")]),
            ("llama_1b", ["--config", str(ROOT / "examples/configs/llama_1b.toml")]),
        ]
    else:
        suites = [("default", [])]
    for name, base in suites:
        flags = [*base, "--train.steps", str(args.steps), *rest]
        r = compare(flags, args.repeats)
        r["name"] = name
        rows.append(r)
    print(f"{'config':<12} {'device':<28} {'engine tok/s':>13} {'plain tok/s':>12} {'ratio':>6} {'engine MFU':>10}")
    for r in rows:
        mfu = f"{100 * r['engine_mfu']:.1f}%" if r["engine_mfu"] is not None else "n/a"
        print(
            f"{r['name']:<12} {r['device'][:28]:<28} {r['engine_tokens_per_s']:>13.0f} "
            f"{r['plain_tokens_per_s']:>12.0f} {r['ratio']:>6.3f} {mfu:>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
