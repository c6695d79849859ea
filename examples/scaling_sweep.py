"""An IsoFLOP sweep on a CPU: tiny GPTs trained by the engine on the embedded corpus at a few FLOP budgets, fitted
with Chinchilla's Approaches 2 and 3 (Hoffmann et al. 2022, section 3.2 and 3.3).

    python examples/scaling_sweep.py [--budgets 3e10,1e11,3e11] [--shapes 8x1,12x1,...] [--out runs/scaling_sweep]

For every budget C and every model shape (d_model x n_layers, Llama-style, byte tokenizer so that the vocabulary
does not dominate N), the run trains for D = C / 6N tokens (Chinchilla's C = 6ND; the engine's own count, with
attention, is logged as `flops`), with a cosine schedule decayed over exactly those steps, then evaluates the
validation loss on a fixed set of held-out batches. Each finished run appends a row (N, D, C, loss, shape) to
OUT/runs.csv, and a rerun skips the rows already there, so an interrupted sweep resumes. Then
`python -m engine.scaling fit` fits both approaches to the table (OUT/fit.json) and, where matplotlib is installed,
draws loss against N per budget with the fitted frontier (OUT/isoflop.png).

Budgets stay at 1e13 FLOPs or less per run: on 2 CPU cores the engine trains these models at a few tens of
GFLOP/s, so a 1e13 run takes minutes. The README gives the default sweep's time and fit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import time
from pathlib import Path

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import load_config
from engine.data.tokenizer import ByteTokenizer
from engine.metrics import read_metrics
from engine.model.gpt import count_params, flops_per_token, resolve
from engine.scaling.fit_cli import cli_main as fit_main
from engine.train import main as train_main

# C = 6ND (Chinchilla); flops: the engine's count, attention included
COLUMNS = ("N", "D", "C", "loss", "flops", "budget", "d_model", "n_layers", "steps")
SEQ_LEN, GLOBAL_BATCH = 128, 16


def _flags(run_dir: Path, d_model: int, n_layers: int, steps: int, lr: float) -> list[str]:
    heads = max(1, d_model // 16)
    return ["--data.path", "embedded", "--data.tokenizer", "byte", "--model.d_model", str(d_model),
            "--model.n_layers", str(n_layers), "--model.n_heads", str(heads), "--model.seq_len", str(SEQ_LEN),
            "--train.global_batch", str(GLOBAL_BATCH), "--train.steps", str(steps), "--optim.lr", str(lr),
            "--optim.warmup", str(max(1, steps // 10)), "--optim.decay_steps", str(steps), "--eval.every", str(steps),
            "--eval.batches", "16", "--checkpoint.every", "0", "--run.dir", str(run_dir), "--run.progress", "false",
            "--run.tensorboard", "false"]  # fmt: skip


def run_one(out: Path, budget: float, d_model: int, n_layers: int, lr: float) -> dict:
    """Trains one (budget, shape) point and returns its row."""
    run_dir = out / f"C{budget:.0e}_d{d_model}_L{n_layers}"
    probe = resolve(load_config(_flags(run_dir, d_model, n_layers, 1, lr)).model, ByteTokenizer().vocab_size)
    n = count_params(probe)
    steps = max(1, round(budget / (6 * n) / (SEQ_LEN * GLOBAL_BATCH)))  # Chinchilla's budget: C = 6 N D
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        status = train_main(_flags(run_dir, d_model, n_layers, steps, lr))
    if status != 0:
        raise RuntimeError(f"run {run_dir} failed with status {status}:\n{quiet.getvalue()[-2000:]}")
    vals = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("val_loss") is not None]
    tokens = steps * SEQ_LEN * GLOBAL_BATCH
    return {"N": n, "D": tokens, "C": 6 * n * tokens, "loss": vals[-1], "flops": flops_per_token(probe) * tokens,
            "budget": budget, "d_model": d_model, "n_layers": n_layers, "steps": steps}  # fmt: skip


def _done(table: Path) -> set[tuple[float, int, int]]:
    if not table.exists():
        return set()
    with table.open() as f:
        return {(float(r["budget"]), int(r["d_model"]), int(r["n_layers"])) for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="3e10,1e11,3e11", help="FLOP budgets per run, comma-separated (<= 1e13)")
    p.add_argument("--shapes", default="8x1,12x1,16x1,24x2,32x2,48x2,64x3,96x3", help="d_model x n_layers, comma-sep.")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/scaling_sweep")
    p.add_argument("--bootstrap", type=int, default=50)
    args = p.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        print(f"error: --budgets {args.budgets!r} / --shapes {args.shapes!r}: numbers and DxL pairs", file=sys.stderr)
        return 2
    if any(b > 1e13 for b in budgets) or any(len(s) != 2 for s in shapes):
        print("error: budgets are at most 1e13 FLOPs per run and shapes are d_model x n_layers", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "runs.csv"
    done = _done(table)
    start = time.time()
    for budget in budgets:
        for d_model, n_layers in shapes:
            if (budget, d_model, n_layers) in done:
                continue
            row = run_one(out, budget, d_model, n_layers, args.lr)
            new = not table.exists()
            with table.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(f"C {budget:.0e}  d_model {d_model:>4} x {n_layers} layers  N {row['N']:>9,}  D {row['D']:>11,}  "
                  f"loss {row['loss']:.4f}  ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    fit_args = [str(table), "--params-column", "N", "--tokens-column", "D", "--loss-column", "loss",
                "--bootstrap", str(args.bootstrap)]  # fmt: skip
    fits = {}
    for approach in ("3", "2"):  # each on its own: Approach 2 needs two budgets or more, Approach 3 does not
        text, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
            status = fit_main([*fit_args, "--approach", approach, "--json"])
        if status != 0:
            fits[f"approach{approach}"] = {"error": err.getvalue().strip()}
        else:  # the fit CLI prints Approach 3's fields at the top level and Approach 2's under "approach2"
            result = json.loads(text.getvalue())
            fits[f"approach{approach}"] = result["approach2"] if approach == "2" else result
    (out / "fit.json").write_text(json.dumps(fits, indent=1))
    print(json.dumps(fits, indent=1)[:3000])
    try:
        import matplotlib  # noqa: F401

        usable = [k for k in ("3", "2") if "error" not in fits[f"approach{k}"]]
        if usable:
            approach = "both" if len(usable) == 2 else usable[0]
            fit_main([*fit_args, "--approach", approach, "--plot", str(out / "isoflop.png")])
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if "error" not in fits["approach3"] else 1


if __name__ == "__main__":
    sys.exit(main())
