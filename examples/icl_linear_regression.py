"""In-context linear regression (Garg et al. 2022): train the engine's transformer blocks on fresh prompts
(x_1, y_1, ..., x_k, y_k, x_query) and compare its error vs k with least squares, 3-nearest neighbours and averaging.

    python examples/icl_linear_regression.py --threads 1     # d = 5, 4800 steps: about 10 min on one CPU core
    python examples/icl_linear_regression.py --threads 1 --steps 24000   # about 43 min: near least squares
    python examples/icl_linear_regression.py --d 20 --points 41 --steps 2000 --min-lr-ratio 1 --threads 1

Writes curves.json (normalised squared error per k for each predictor) and, with matplotlib, curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.icl.plots import plot_curves
from engine.icl.regression_transformer import RegressionTraining, evaluate_regression, train_regression


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=5)
    p.add_argument("--points", type=int, default=11, help="prompt points: k = 0..points-1 in-context examples")
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear lr warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decay of the lr to lr * this at the last step; 1: constant after the warmup")
    p.add_argument("--curriculum-start", type=int, default=5, help="first active dimension; 0: no curriculum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=1000, help="fresh prompts the error curves average over")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--out", default="runs/icl/linear_regression")
    args = p.parse_args(argv)
    if args.d < 1 or args.points < 2 or args.steps < 1 or args.eval_prompts < 1:
        print(f"error: need --d >= 1, --points >= 2, --steps >= 1, --eval-prompts >= 1 (got {args.d}, {args.points}, "
              f"{args.steps}, {args.eval_prompts})")
        return 2
    if args.warmup < 0 or not 0 <= args.min_lr_ratio <= 1:
        print(f"error: need --warmup >= 0 and 0 <= --min-lr-ratio <= 1 (got {args.warmup}, {args.min_lr_ratio})")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = min(args.curriculum_start, args.d)
    # Grow one dimension (and two points) at a time, reaching the full task by 60% of the run.
    every = max(1, int(0.6 * args.steps) // (args.d - start)) if 0 < start < args.d else 0
    run = RegressionTraining(
        d=args.d, n_points=args.points, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        curriculum_start=start if every else 0, curriculum_every=every, seed=args.seed,
    )
    t0 = time.perf_counter()
    model, log = train_regression(run, log_every=max(1, args.steps // 20))
    seconds = time.perf_counter() - t0
    curves = evaluate_regression(model, args.d, args.points, prompts=args.eval_prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "train_seconds": seconds, "curves": curves}
    (out / "curves.json").write_text(json.dumps(summary, indent=1))
    for k in sorted({args.d // 2, args.d, 2 * args.d} & set(range(args.points))):
        print(f"k={k}: " + ", ".join(f"{name} {c[k]:.3f}" for name, c in curves.items()))
    png = plot_curves(curves, out / "curves.png", "in-context examples k", "squared error / d",
                      f"in-context linear regression, d={args.d}", vline=args.d)
    wrote = f"{out / 'curves.json'}" + (f" and {png}" if png else "")
    print(f"trained {args.steps} steps in {seconds:.0f} s; wrote {wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
