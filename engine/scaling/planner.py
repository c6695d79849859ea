"""Compute planner: compute-optimal model and data sizes for a FLOP budget or a cluster, under each published law.

    python -m engine.scaling plan --flops 1e21
    python -m engine.scaling plan --gpus 64 --days 7 --mfu 0.45 --device h100 [--toml OUT.toml] [--json]

The budget is --flops, or gpus x days x 86400 s x the device's dense bf16 peak x MFU. For each law of
`engine.scaling.laws.LAWS` a row gives N_opt (in the law's own count: non-embedding for Kaplan, total for the
others), D_opt = C / (6 N_opt), tokens per parameter, the law's predicted loss where it has one (nats, on that
paper's data: not comparable across laws), a Llama-style model near N_opt (`model_config_near`) and how long that
model takes to train on D_opt tokens on the hardware: its real FLOPs per token (6 N_mm + attention, output projection
included: `engine.model.gpt.flops_per_token`) x D_opt / (gpus x peak x MFU). That is a little above C / (gpus x peak
x MFU), since the laws' C = 6ND leaves out attention (and, for Kaplan, the vocabulary). Without --gpus, the time is
given in GPU-days.

--toml writes the chosen law's model (--law, default chinchilla-1: Approach 1, ~20 tokens per parameter) as a config
the trainer takes (`python -m engine.train --config OUT.toml`), with train.steps = ceil(D_opt / tokens per step); an
existing OUT.toml is replaced only with --force.
Only the model shape, the batch and the step count are planned: the layout (parallel section, micro_batch), the
optimizer and the data are the trainer's defaults, to be set for the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, ModelConfig
from engine.model.gpt import count_params, flops_per_token, resolve
from engine.scaling.flops import DEVICE_PEAK_FLOPS, peak_flops_of
from engine.scaling.laws import LAWS

SECONDS_PER_DAY = 86400.0

# Target d_model / n_layers. At fixed N, Kaplan et al. 2020 (section 3.1, Figure 5) find the loss changes by only a
# few percent across a wide range of shapes, so the choice is a convention: 100 is near Chinchilla 70B (8192 / 80)
# and Llama 2 70B (8192 / 80), between GPT-2 small (768 / 12 = 64) and GPT-3 175B (12288 / 96 = 128).
ASPECT_RATIO = 100.0
SIZE_TOLERANCE = 0.05  # shapes within 5% of the requested N compete on aspect ratio
MAX_LAYERS = 256
# d_model candidates: multiples of the head width, 64 below 2048 and 128 from 2048 (to 65536)
WIDTHS = list(range(64, 2048, 64)) + list(range(2048, 65536 + 1, 128))


class PlanError(ValueError):
    """Bad planner input; the message is one line."""


@dataclass
class PlanRow:
    law: str
    n_params: float  # the law's N_opt, in the law's own count (see `n_kind`)
    n_kind: str  # "total" or "non-embedding"
    tokens: float  # D_opt = C / (6 N_opt)
    tokens_per_param: float
    loss: float | None  # the law's predicted loss at (N_opt, D_opt), nats; None where the law has no loss
    flops: float  # the budget C
    model: ModelConfig  # the Llama-style shape near N_opt
    model_params: int  # its count, in the law's own count
    model_flops_per_token: int
    gpu_days: float  # model_flops_per_token x tokens / (peak x mfu) / 86400
    days: float | None  # gpu_days / gpus, when gpus is given


def _shape(d_model: int, n_layers: int, vocab_size: int, seq_len: int, tie_embeddings: bool) -> ModelConfig:
    head_dim = 128 if d_model >= 2048 else 64
    cfg = ModelConfig(
        arch="llama", n_layers=n_layers, d_model=d_model, n_heads=d_model // head_dim, vocab_size=vocab_size,
        seq_len=seq_len, tie_embeddings=tie_embeddings,
    )  # fmt: skip
    return resolve(cfg)


def model_config_near(
    n_params: float,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    non_embedding: bool = False,
    tie_embeddings: bool = False,
) -> ModelConfig:
    """A Llama-style ModelConfig (RMSNorm, SwiGLU with ffn_hidden = 8/3 d_model rounded up to 64, rotary
    positions, no grouped-query attention, untied embeddings by default) whose `count_params(cfg, non_embedding)`
    is near `n_params`.

    Shape rule: heads are 64 wide below d_model 2048 and 128 wide from 2048 on, and d_model is a multiple of the
    head width (WIDTHS), so n_heads = d_model / head width. For each depth 1..MAX_LAYERS the widths whose counts
    bracket N are taken; among those within SIZE_TOLERANCE (5%) of N the one with d_model / n_layers nearest
    ASPECT_RATIO (100) in log terms wins, else the nearest in size. PlanError when nothing comes within 25% (N too
    small for the vocabulary, or beyond the widths searched)."""
    if not n_params > 0 or not math.isfinite(n_params):
        raise PlanError(f"the parameter count must be a positive number, got {n_params}")

    def count(d: int, layers: int) -> int:
        return count_params(_shape(d, layers, vocab_size, seq_len, tie_embeddings), non_embedding=non_embedding)

    candidates = []  # (size error, aspect error, d, layers)
    for layers in range(1, MAX_LAYERS + 1):
        lo, hi = 0, len(WIDTHS) - 1  # the count grows with the width
        if count(WIDTHS[lo], layers) >= n_params:
            hi = lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(WIDTHS[mid], layers) < n_params else (lo, mid)
        for d in {WIDTHS[lo], WIDTHS[hi]}:
            size_err = abs(math.log(count(d, layers) / n_params))
            candidates.append((size_err, abs(math.log(d / layers / ASPECT_RATIO)), d, layers))
    close = [c for c in candidates if c[0] <= math.log1p(SIZE_TOLERANCE)]
    best = min(close, key=lambda c: (c[1], c[0])) if close else min(candidates)
    if best[0] > math.log(1.25):
        kind = "non-embedding" if non_embedding else "total"
        raise PlanError(
            f"no Llama-style shape with vocab {vocab_size} comes within 25% of {n_params:.3g} {kind} parameters"
        )
    return _shape(best[2], best[3], vocab_size, seq_len, tie_embeddings)


def budget_flops(
    flops: float | None = None, gpus: int | None = None, days: float | None = None, mfu: float = 0.4,
    device: str = "h100",
) -> float:  # fmt: skip
    """The FLOP budget: `flops`, or gpus x days x 86400 x peak(device) x mfu."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    peak = _peak(device)
    if gpus is not None and gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if days is not None and not days > 0:
        raise PlanError(f"--days must be > 0, got {days}")
    if flops is not None:
        if days is not None:
            raise PlanError("give --flops or --days (with --gpus), not both")
        if not (flops > 0 and math.isfinite(flops)):
            raise PlanError(f"--flops must be a positive number, got {flops}")
        return float(flops)
    if gpus is None or days is None:
        raise PlanError("give a budget: --flops C, or --gpus G and --days T")
    return gpus * days * SECONDS_PER_DAY * peak * mfu


def _peak(device: str) -> float:
    try:
        return peak_flops_of(device)
    except ValueError as e:
        raise PlanError(str(e)) from None


def plan(
    flops: float | None = None, gpus: int | None = None, days: float | None = None, mfu: float = 0.4,
    device: str = "h100", vocab_size: int = 32000, seq_len: int = 2048,
) -> list[PlanRow]:  # fmt: skip
    """One row per law of `LAWS` for the budget `budget_flops(flops, gpus, days, mfu, device)` (see the module
    docstring for the columns). PlanError (one line) for bad input."""
    c = budget_flops(flops, gpus, days, mfu, device)
    peak = _peak(device)
    rows = []
    for law in LAWS.values():
        n, d = law.n_opt(c), law.d_opt(c)
        cfg = model_config_near(n, vocab_size, seq_len, non_embedding=not law.embedding)
        fpt = flops_per_token(cfg)
        gpu_days = fpt * d / (peak * mfu) / SECONDS_PER_DAY
        rows.append(
            PlanRow(
                law=law.name, n_params=n, n_kind="total" if law.embedding else "non-embedding", tokens=d,
                tokens_per_param=d / n, loss=law.loss_opt(c), flops=c, model=cfg,
                model_params=count_params(cfg, non_embedding=not law.embedding), model_flops_per_token=fpt,
                gpu_days=gpu_days, days=None if gpus is None else gpu_days / gpus,
            )
        )  # fmt: skip
    return rows


def plan_config(row: PlanRow, tokens_per_step: int = 2**20) -> Config:
    """A trainer Config for a plan row: the row's model, global_batch = tokens_per_step / seq_len sequences (at
    least 1) and steps = ceil(D_opt / (global_batch x seq_len)); every other section at the trainer's defaults."""
    cfg = Config(model=dataclasses.replace(row.model))
    cfg.train.global_batch = max(1, tokens_per_step // row.model.seq_len)
    cfg.train.steps = max(1, math.ceil(row.tokens / (cfg.train.global_batch * row.model.seq_len)))
    return cfg


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_table(rows: list[PlanRow], gpus: int | None, mfu: float, device: str) -> str:
    c = rows[0].flops
    hw = f"{gpus} x {device}" if gpus else f"1 {device} (GPU-days)"
    lines = [
        f"budget C = {c:.3g} FLOPs ({c / 8.64e19:.3g} PF-days); time on {hw} at MFU {mfu:g} "
        f"({_peak(device) / 1e12:g} TFLOP/s dense bf16 peak)",
        f"{'law':<13} {'N_opt':>8} {'N counts':<13} {'D_opt':>8} {'D/N':>6} {'loss':>6}  {'model near N_opt':<28} "
        f"{'its N':>8} {'days' if gpus else 'GPU-days':>9}",
    ]
    for r in rows:
        m = r.model
        shape = f"{m.n_layers}L d{m.d_model} h{m.n_heads} f{m.ffn_hidden}"
        loss = "-" if r.loss is None else f"{r.loss:.3f}"
        time = r.days if gpus else r.gpu_days
        lines.append(
            f"{r.law:<13} {_fmt(r.n_params):>8} {r.n_kind:<13} {_fmt(r.tokens):>8} {r.tokens_per_param:>6.1f} "
            f"{loss:>6}  {shape:<28} {_fmt(r.model_params):>8} {time:>9.3g}"
        )
    lines.append(
        "D_opt = C / (6 N_opt); losses in nats on each paper's data (not comparable across laws); time: the model's "
        "FLOPs per token (attention and output projection included) x D_opt"
    )
    return "\n".join(lines)


def _row_json(r: PlanRow) -> dict:
    out = dataclasses.asdict(r)
    out["model"] = {k: getattr(r.model, k) for k in ("n_layers", "d_model", "n_heads", "ffn_hidden", "vocab_size")}
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message, exit status 2 from cli_main
        raise PlanError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.scaling plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--flops", type=float, help="training budget C in FLOPs")
    p.add_argument("--gpus", type=int, help="number of devices")
    p.add_argument("--days", type=float, help="wall-clock days (with --gpus: the budget)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICE_PEAK_FLOPS)} (default h100)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the planned models (default 32000)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length of the planned models (default 2048)")
    p.add_argument("--law", default="chinchilla-1", help=f"the law whose model --toml writes: {', '.join(LAWS)}")
    p.add_argument("--toml", help="write the --law row's model as a trainer config to this path")
    p.add_argument("--force", action="store_true", help="replace an existing --toml file")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def cli_main(argv: list[str]) -> int:
    """`python -m engine.scaling plan ...`; returns the exit status (2 with a one-line error for bad input)."""
    try:
        args = _parser().parse_args(argv)
        if args.law not in LAWS:
            raise PlanError(f"--law must be one of {', '.join(LAWS)}, got {args.law!r}")
        if args.vocab < 1 or args.seq_len < 1:
            raise PlanError("--vocab and --seq-len must be >= 1")
        device = args.device.lower()
        if args.toml and Path(args.toml).exists() and not args.force:
            raise PlanError(f"--toml {args.toml} exists; pass --force to replace it")
        rows = plan(args.flops, args.gpus, args.days, args.mfu, device, args.vocab, args.seq_len)
        if args.toml:
            row = next(r for r in rows if r.law == args.law)
            header = (
                f"# planned by `python -m engine.scaling plan`: law {row.law}, C = {row.flops:.4g} FLOPs, "
                f"N_opt = {row.n_params:.4g} ({row.n_kind}), D_opt = {row.tokens:.4g} tokens; this model "
                f"{row.model_params:,} parameters ({row.n_kind})\n"
            )
            try:
                Path(args.toml).write_text(header + plan_config(row).to_toml())
            except OSError as e:
                raise PlanError(f"cannot write {args.toml}: {e.strerror or e}") from None
    except (PlanError, ConfigError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        c = rows[0].flops
        print(json.dumps({"flops": c, "gpus": args.gpus, "device": device, "mfu": args.mfu,
                          "rows": [_row_json(r) for r in rows]}, indent=1))  # fmt: skip
    else:
        print(format_table(rows, args.gpus, args.mfu, device))
        if args.toml:
            print(f"wrote {args.toml} ({args.law})")
    return 0
