"""Induction-head emergence (Olsson et al. 2022): a small 2-layer GPT trained on repeated random sequences; the loss
on the repeated tokens, the ICL score (loss at a late token minus loss at an early one) and layer 2's induction-head
score over training, with the phase change marked.

    python examples/icl_induction_heads.py --out runs/icl/induction

Writes history.json (every evaluation's figures, per-head attention scores included) and, with matplotlib,
induction_heads.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from engine.icl.induction import InductionTraining, phase_change, train_induction
from engine.icl.plots import plot_curves

DEFAULTS = InductionTraining()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--vocab", type=int, default=DEFAULTS.vocab)
    p.add_argument("--layers", type=int, default=DEFAULTS.n_layers)
    p.add_argument("--d-model", type=int, default=DEFAULTS.d_model)
    p.add_argument("--heads", type=int, default=DEFAULTS.n_heads)
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch", type=int, default=DEFAULTS.batch)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--eval-batch", type=int, default=DEFAULTS.eval_batch)
    p.add_argument("--early", type=int, default=DEFAULTS.early, help="1-based token index of the score's early loss")
    p.add_argument("--late", type=int, default=DEFAULTS.late, help="1-based token index of the score's late loss")
    p.add_argument("--span", type=int, default=2, help="evaluation intervals over which the fastest fall is sought")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared 2-core machine)")
    p.add_argument("--out", default="runs/icl/induction")
    args = p.parse_args(argv)
    if not 2 <= args.early < args.late <= args.seq_len:
        print(f"error: need 2 <= --early < --late <= --seq-len, got {args.early}, {args.late}, {args.seq_len}")
        return 2
    if min(args.steps, args.span, args.batch, args.eval_every, args.eval_batch, args.vocab - 1) < 1 or args.seq_len < 8:
        print("error: --steps, --span, --batch, --eval-every, --eval-batch must be >= 1, --vocab >= 2, --seq-len >= 8")
        return 2
    evaluations = -(-args.steps // args.eval_every) + 1
    if evaluations < 2 * args.span + 1:
        print(f"error: {evaluations} evaluations (--steps / --eval-every + 1) are too few to find the fall over "
              f"--span {args.span} intervals: need {2 * args.span + 1}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run = InductionTraining(
        seq_len=args.seq_len, vocab=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        eval_every=args.eval_every, eval_batch=args.eval_batch, early=args.early, late=args.late, seed=args.seed,
    )
    t0 = time.perf_counter()
    _, history = train_induction(run, log=True)
    seconds = time.perf_counter() - t0
    change = phase_change(history, span=args.span)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "seconds": seconds, "phase_change": change, "history": history}
    (out / "history.json").write_text(json.dumps(record, indent=1))
    steps = [h["step"] for h in history]
    curves = {
        "loss on repeated tokens (nats)": [h["repeat_loss"] for h in history],
        "loss on first-copy tokens (nats)": [h["first_copy_loss"] for h in history],
        f"ICL score: loss at token {args.late} - at token {args.early} (nats)": [h["icl_score"] for h in history],
        "induction score, best layer-2 head": [h["induction_score"] for h in history],
        "previous-token score, best layer-1 head": [h["previous_token_score"] for h in history],
    }
    png = plot_curves(curves, out / "induction_heads.png", "training step (dotted: the phase change)", "",
                      f"induction heads: {args.layers}-layer GPT, seq {args.seq_len}, vocab {args.vocab}", xs=steps,
                      vline=change["step"])
    at = {h["step"]: h for h in history}
    before, after, last = at[change["from_step"]], at[change["to_step"]], history[-1]
    b, a = before, after
    print(f"phase change at step {change['step']}: between steps {b['step']} and {a['step']} the loss on repeated "
          f"tokens fell {change['before']:.2f} -> {change['after']:.2f} nats ({change['fall_before']:.2f} in the "
          f"{a['step'] - b['step']} steps before); ICL score {b['icl_score']:.2f} -> {a['icl_score']:.2f}, induction "
          f"score {b['induction_score']:.2f} -> {a['induction_score']:.2f}, previous-token score "
          f"{b['previous_token_score']:.2f} -> {a['previous_token_score']:.2f}; at step {last['step']}: loss on "
          f"repeated tokens {last['repeat_loss']:.2f}, ICL score {last['icl_score']:.2f} (-ln V = "
          f"{-math.log(args.vocab):.2f}), induction score {last['induction_score']:.2f}; {seconds:.0f} s; wrote "
          f"{out / 'history.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
