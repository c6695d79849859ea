"""`python -m engine.scaling fit RUNS.csv ...`: Chinchilla Approaches 2 and 3 on a CSV of runs, as text, JSON or a
plot. matplotlib is imported only by `--plot`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from engine.scaling.fitting import HUBER_DELTA, PARAM_NAMES, Approach3Fit, fit_approach3
from engine.scaling.isoflop import Approach2Fit, fit_approach2, flop_bands
from engine.scaling.runs_table import FitError, Runs, read_runs


def plot_fit(
    runs: Runs, fit3: Approach3Fit | None, fit2: Approach2Fit | None, out: str | Path, bands_per_decade: float = 4.0
) -> None:
    """Loss against N per FLOP band (points), the Approach-3 law along each band's IsoFLOP line and its frontier
    N_opt(C), and the Approach-2 parabolas' minima. Needs matplotlib (FitError if absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FitError("--plot needs matplotlib (pip install matplotlib)") from None
    labels, _ = flop_bands(runs.C, bands_per_decade)
    uniq = np.unique(labels)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, lab in enumerate(uniq):
        sel = labels == lab
        colour = cmap(i / max(len(uniq) - 1, 1))
        c_b = float(np.exp(np.log(runs.C[sel]).mean()))
        ax.scatter(runs.N[sel], runs.L[sel], s=12, color=colour, label=f"C ≈ {c_b:.2g}")
        if fit3 is not None:
            ns = np.geomspace(runs.N[sel].min(), runs.N[sel].max(), 100)
            ax.plot(ns, fit3.predict(ns, c_b / (6.0 * ns)), color=colour, lw=1)
    if fit3 is not None:
        cs = np.geomspace(runs.C.min(), runs.C.max(), 100)
        n_opt, d_opt = fit3.optimal(cs)
        ax.plot(n_opt, fit3.predict(n_opt, d_opt), "k--", lw=1.5, label="Approach 3 frontier")
    if fit2 is not None:
        ax.scatter(
            [bd.N_opt for bd in fit2.bands],
            [bd.L_min for bd in fit2.bands],
            marker="x",
            s=60,
            color="red",
            zorder=3,
            label="Approach 2 minima",
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise FitError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)


def _format_text(fit3: Approach3Fit | None, fit2: Approach2Fit | None, runs: Runs) -> str:
    lines = [f"{len(runs)} runs from {runs.source} (columns: {runs.columns})"]
    if fit3 is not None:
        lines.append(
            f"Approach 3: L(N, D) = E + A/N^alpha + B/D^beta  (Huber delta {HUBER_DELTA:g} on log loss, "
            f"L-BFGS from {fit3.n_starts} starts, grid {fit3.grid!r}"
            + (f", {fit3.n_dropped} highest-loss runs dropped" if fit3.n_dropped else "")
            + ")"
        )
        for k in PARAM_NAMES + ("a", "b"):
            v = getattr(fit3, k)
            extra = ""
            if k in fit3.se:
                lo, hi = fit3.ci[k]
                extra = f"  se {fit3.se[k]:.4g}  {100 * fit3.ci_level:.0f}% CI [{lo:.4g}, {hi:.4g}]"
            lines.append(f"  {k:<6} {v:.4g}{extra}")
        if fit3.n_bootstrap:
            lines.append(f"  ({fit3.n_bootstrap} bootstrap refits)")
    if fit2 is not None:
        lines.append(f"Approach 2: {len(fit2.bands)} FLOP bands ({fit2.binning} binning)")
        lines.append(f"  a {fit2.a:.4g} (se {fit2.a_se:.2g})   b {fit2.b:.4g} (se {fit2.b_se:.2g})")
        for bd in fit2.bands:
            lines.append(
                f"  C {bd.C:.3g}: {bd.n_runs} runs, N_opt {bd.N_opt:.3g}, D_opt {bd.D_opt:.3g}, L_min {bd.L_min:.4g}"
            )
        for c, n, reason in fit2.skipped:
            lines.append(f"  C {c:.3g}: {n} runs, skipped: {reason}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise FitError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m engine.scaling fit",
        description="Fit Chinchilla Approaches 2 and 3 to a CSV of runs (one row per run, with a header).",
    )
    p.add_argument("runs", help="CSV file of runs")
    p.add_argument("--params-column", help="column of parameter counts N (default: guessed, e.g. N, params)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokens-column", help="column of training tokens D (default: guessed, e.g. D, tokens)")
    g.add_argument("--flops-column", help="column of training FLOPs C; then D = C / (6 N)")
    p.add_argument("--loss-column", help="column of final losses (default: guessed, e.g. L, loss)")
    p.add_argument("--approach", choices=("2", "3", "both"), default="both")
    p.add_argument("--bootstrap", type=int, default=100, metavar="K", help="bootstrap refits for Approach 3 (0: none)")
    p.add_argument("--grid", choices=("fast", "paper"), default="fast", help="Approach-3 initialisation grid")
    p.add_argument(
        "--drop-highest-loss",
        type=int,
        default=0,
        metavar="K",
        help="leave out the K highest-loss runs from Approach 3 (Besiroglu et al. drop 5)",
    )
    p.add_argument("--bands-per-decade", type=float, default=4.0, help="Approach-2 FLOP bands per decade")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the fit as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw loss vs N per FLOP band with the fitted frontier")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """`python -m engine.scaling fit RUNS.csv ...`: 0 on success, 2 on a user error (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        if args.bootstrap < 0:
            raise FitError("--bootstrap must be >= 0")
        if args.bands_per_decade <= 0:
            raise FitError("--bands-per-decade must be positive")
        runs = read_runs(args.runs, args.params_column, args.tokens_column, args.flops_column, args.loss_column)
        if not 0 <= args.drop_highest_loss <= len(runs) - 5:
            raise FitError(f"--drop-highest-loss must be between 0 and {len(runs) - 5} for {len(runs)} runs")
        fit3 = fit2 = None
        # the optimiser's trial points may overflow: the fits discard non-finite values, so numpy's warnings about
        # them are noise on the terminal (a fit that fails says why in one line)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if args.approach in ("3", "both"):
                fit3 = fit_approach3(
                    runs.N,
                    runs.D,
                    runs.L,
                    grid=args.grid,
                    bootstrap=args.bootstrap,
                    seed=args.seed,
                    drop_highest_loss=args.drop_highest_loss,
                )
            if args.approach in ("2", "both"):
                fit2 = fit_approach2(runs.N, runs.C, runs.L, bands_per_decade=args.bands_per_decade)
        if args.plot:
            plot_fit(runs, fit3, fit2, args.plot, args.bands_per_decade)
    except FitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out: dict = fit3.to_dict() if fit3 is not None else {}
        out["n_runs_in_table"] = len(runs)
        if fit2 is not None:
            out["approach2"] = fit2.to_dict()
        print(json.dumps(out, allow_nan=True))
    else:
        print(_format_text(fit3, fit2, runs))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
