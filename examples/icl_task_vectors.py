"""Task vectors (Hendel et al. 2023): train a small GPT to do in-context learning over a family of item maps, then
patch the hidden state theta of "S, x' ->" at layer L into the query alone ("x ->") and score it, layer by layer,
against regular ICL and the zero-shot baseline.

    python examples/icl_task_vectors.py --steps 400 --tvp-steps 800 --out runs/icl/task_vectors

Trains two models of the same shape: one on next-token prediction only (as Hendel et al.'s pretrained models), one
with Yang et al. 2025's task-vector prompting loss at --tvp-layer (0: skip it). Writes results.json and, with
matplotlib, task_vectors.png (accuracy vs patched layer, with each model's ICL and zero-shot accuracy as lines, and
how often the plain model's patched run answers the dummy query's f(x') instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.icl.plots import plot_curves
from engine.icl.task_vectors import (
    TASKS,
    TaskVectorTraining,
    evaluate_task_vectors,
    task_tables,
    train_task_icl,
)


def _summary(name: str, result: dict) -> str:
    layers = ", ".join(f"L{i + 1} {a:.2f}" for i, a in enumerate(result["task_vector_by_layer"]))
    dummy = ", ".join(f"{a:.2f}" for a in result["dummy_answer_by_layer"])
    conflict = result["conflict_by_layer"][result["best_layer"] - 1]
    return (f"{name}: ICL {result['icl']:.3f}, zero-shot {result['zero_shot']:.3f}, task vector by layer [{layers}] "
            f"(answers f(x') instead: [{dummy}]); conflicting demonstrations at L{result['best_layer']}: follows "
            f"theta {conflict['theta_task']:.2f}, the demonstrations {conflict['demonstrations_task']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=16, help="vocabulary items (even)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--pairs", type=int, default=8, help="pairs per training sequence")
    p.add_argument("--demos", type=int, default=5, help="demonstrations in the evaluated prompts (the paper's 5)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=400, help="steps of the plain (next-token) model")
    p.add_argument("--tvp-steps", type=int, default=800, help="steps of the model trained with the TVP-loss")
    p.add_argument("--tvp-layer", type=int, default=2, help="layer of the TVP-loss; 0: train the plain model only")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--queries", type=int, default=64, help="evaluated queries per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--out", default="runs/icl/task_vectors")
    args = p.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    try:
        tables = task_tables(args.items, tasks, args.seed)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    if not 1 <= args.demos < args.pairs < args.items or not 0 <= args.tvp_layer <= args.layers:
        print(f"error: need 1 <= --demos < --pairs < --items and 0 <= --tvp-layer <= --layers, got {args.demos}, "
              f"{args.pairs}, {args.items}, {args.tvp_layer}, {args.layers}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {"plain": (0, args.steps)}
    if args.tvp_layer:
        runs[f"TVP-loss at L{args.tvp_layer}"] = (args.tvp_layer, args.tvp_steps)
    start, results = time.perf_counter(), {}
    for name, (tvp_layer, steps) in runs.items():
        run = TaskVectorTraining(
            n_items=args.items, tasks=tasks, n_pairs=args.pairs, n_layers=args.layers, d_model=args.d_model,
            n_heads=args.heads, steps=steps, batch=args.batch, lr=args.lr, tvp_layer=tvp_layer, seed=args.seed,
        )
        t0 = time.perf_counter()
        print(f"training the {name} model: {steps} steps")
        model, log = train_task_icl(run, log_every=max(1, steps // 5))
        seconds = time.perf_counter() - t0
        results[name] = {"train_seconds": seconds, "final_loss": log[-1]["loss"],
                         **evaluate_task_vectors(model, tables, args.demos, args.queries)}
        print(_summary(name, results[name]))
    total = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "seconds": total, "results": results},
                                                 indent=1))
    layers = list(range(1, args.layers + 1))
    curves = {}
    for name, r in results.items():
        curves[f"task vector ({name})"] = r["task_vector_by_layer"]
        curves[f"ICL, {args.demos} demos ({name})"] = [r["icl"]] * args.layers
        curves[f"zero-shot ({name})"] = [r["zero_shot"]] * args.layers
    curves["patched answers f(x'), the dummy's (plain)"] = results["plain"]["dummy_answer_by_layer"]
    png = plot_curves(curves, out / "task_vectors.png", "patched layer L", "accuracy",
                      f"task vectors: {args.layers}-layer GPT, {len(tasks)} tasks, {args.items} items", xs=layers)
    print(f"{total:.0f} s in all; wrote {out / 'results.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
