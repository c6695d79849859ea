"""Induction-head emergence (Olsson et al. 2022): the ICL score (loss at token 500 minus loss at token 50) of a small
2-layer GPT over training on repeated random sequences of 512 tokens; the phase change shows as a sudden drop.

    python examples/icl_induction_heads.py --steps 1200 --out runs/icl/induction

Writes history.json (ICL score, token-50 and token-500 losses per evaluation) and, with matplotlib, icl_score.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.icl.induction import InductionTraining, train_induction
from engine.icl.plots import plot_curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--early", type=int, default=50, help="1-based token index of the score's early loss")
    p.add_argument("--late", type=int, default=500, help="1-based token index of the score's late loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--out", default="runs/icl/induction")
    args = p.parse_args(argv)
    if not 2 <= args.early < args.late <= args.seq_len:
        print(f"error: need 2 <= --early < --late <= --seq-len, got {args.early}, {args.late}, {args.seq_len}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run = InductionTraining(
        seq_len=args.seq_len, vocab=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
        steps=args.steps, batch=args.batch, lr=args.lr, eval_every=args.eval_every, early=args.early,
        late=args.late, seed=args.seed,
    )
    t0 = time.perf_counter()
    _, history = train_induction(run, log=True)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "seconds": seconds, "history": history}
    (out / "history.json").write_text(json.dumps(record, indent=1))
    steps = [h["step"] for h in history]
    curves = {
        "ICL score": [h["icl_score"] for h in history],
        f"loss at token {args.early}": [h["loss_early"] for h in history],
        f"loss at token {args.late}": [h["loss_late"] for h in history],
    }
    png = plot_curves(curves, out / "icl_score.png", "training step", "nats",
                      f"induction heads: {args.layers}-layer GPT, seq {args.seq_len}", xs=steps)
    best = min(history, key=lambda h: h["icl_score"])
    print(f"ICL score {history[0]['icl_score']:.3f} at step 0 -> {history[-1]['icl_score']:.3f} at step "
          f"{history[-1]['step']} (min {best['icl_score']:.3f} at {best['step']}); {seconds:.0f} s; wrote "
          f"{out / 'history.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
