"""One linear self-attention layer trained on in-context regression vs one step of gradient descent
(von Oswald et al. 2023): the trained layer's predictions, sensitivities and weights against GD with the best eta.

    python examples/icl_gd_attention.py --d 10 --context 10 --steps 2000 --out runs/icl/gd_attention

Writes comparison.json and, with matplotlib, loss.png (training loss of the layer vs GD's loss) and weights.png
(the layer's effective W_KQ and W_PV products next to the construction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.icl.linear_attention import (
    LSATraining,
    compare_to_gd,
    optimal_gd_learning_rate,
    sample_tasks,
    train_lsa,
)
from engine.icl.plots import have_matplotlib, plot_curves


def plot_weights(w_kq: torch.Tensor, w_pv: torch.Tensor, path: Path) -> Path | None:
    """Heat maps of the trained W_KQ and W_PV (the construction: W_KQ's x-x block ∝ I, W_PV only its y-y entry)."""
    if not have_matplotlib():
        return None
    import matplotlib  # optional

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (name, w) in zip(axes, (("W_KQ", w_kq), ("W_PV", w_pv))):
        lim = w.abs().max().item()
        im = ax.imshow(w.numpy(), cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_title(f"trained {name}")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--context", type=int, default=10, help="in-context examples N")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/icl/gd_attention")
    args = p.parse_args(argv)
    if args.d < 1 or args.context < 1 or args.steps < 1:
        print(f"error: need --d, --context, --steps >= 1 (got {args.d}, {args.context}, {args.steps})")
        return 2
    t0 = time.perf_counter()
    layer, losses = train_lsa(LSATraining(args.d, args.context, args.steps, args.batch, args.lr, args.seed))
    seconds = time.perf_counter() - t0
    xs, ys, xq, yq = sample_tasks(100_000, args.context, args.d, torch.Generator().manual_seed(args.seed + 1))
    eta = optimal_gd_learning_rate(xs, ys, xq, yq)
    result = compare_to_gd(layer, eta, args.d, args.context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, **result}, indent=1))
    print(", ".join(f"{k} {v:.4g}" for k, v in result.items()) + f"; trained in {seconds:.1f} s")
    smooth = [sum(losses[max(0, i - 24): i + 1]) / len(losses[max(0, i - 24): i + 1]) for i in range(len(losses))]
    plot_curves({"linear self-attention (train)": smooth, "1 GD step, best eta": [result["loss_gd"]] * len(losses)},
                out / "loss.png", "training step", "loss 1/2 (y_hat - y)^2", "LSA vs one GD step", logy=True)
    png = plot_weights(layer.w_kq.detach(), layer.w_pv.detach(), out / "weights.png")
    print(f"wrote {out / 'comparison.json'}" + (f" and {out / 'loss.png'}, {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
