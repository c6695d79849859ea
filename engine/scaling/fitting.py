"""Fit a loss law to your own table of runs: Chinchilla's Approach 3 (parametric) and Approach 2 (IsoFLOP profiles).

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv 2203.15556), section 3 and App. D.2.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens, L final loss) in the
paper's parameterisation: with A = exp(a), B = exp(b), E = exp(e),
    log L_hat = LSE(a - alpha log N, b - beta log D, e),
it minimises sum_i Huber_delta(log L_hat_i - log L_i), delta = 1e-3, with L-BFGS from a grid of initialisations
(alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}: 4500 starts) and keeps the
best. The Huber terms are summed, not averaged: Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
attempt", arXiv 2404.10102) trace part of the published fit's misfit to an averaged objective stopping L-BFGS
before convergence, so the stopping rules here are relative to the objective's own size (see `_lbfgs`).

The L-BFGS is a small one written here in numpy, batched over starts: every start (or bootstrap replicate) keeps
its own curvature history and its own backtracking (Armijo) line search, so a batch of B starts costs about one
start's Python overhead with B times the arithmetic. Grids:
  - "paper": all 4500 starts each run to convergence.
  - "fast" (default): all 4500 starts run for `screen_iters` iterations, then the `keep` lowest-objective ones
    run to convergence. On the Chinchilla Figure 4 points and on synthetic data it reached the same optimum as
    "paper" (objective equal to 1e-9 relative) in a fifth of the time; tests/scaling/test_fitting.py checks it
    against a sample of the paper's grid run to convergence.

Uncertainty: a nonparametric bootstrap. Each replicate resamples the runs with replacement (multinomial counts used
as weights on the Huber terms, which is the same objective as refitting the resampled table) and refits starting
from the full-data estimate, as Besiroglu et al. do, rather than from the whole grid (the "fast path": K replicates
are one batched L-BFGS). Standard errors are the replicates' standard deviations (ddof = 1); the intervals are
percentiles, by default 10th-90th, the convention of the Chinchilla paper's Table 2.

The frontier under C = 6 N D (paper eq. 4): N_opt(C) = G (C/6)^a, D_opt(C) = G^-1 (C/6)^b with
G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta / (alpha+beta), b = alpha / (alpha+beta).

Approach 2: runs are grouped into FLOP bands, a parabola of loss against ln N is fitted per band (least squares),
its vertex gives N_opt(C) (D_opt = C / 6 N_opt), and log N_opt = log k + a log C is fitted by least squares (b
likewise; with D_opt = C / 6 N_opt, b = 1 - a). Binning:
  - exact budgets: when every distinct C (values within 0.1% of each other count as one) has at least 3 runs,
    each distinct C is a band (an IsoFLOP sweep);
  - otherwise log-spaced bands: `bands_per_decade` bands per decade (default 4), centred on log10 C = k / 4, so
    bands are a factor 10^(1/4) = 1.78 wide and a sweep at 1e19, 3e19 (= 10^19.48), 6e19 (= 10^19.78), ... lands
    near band centres. A band's C is the geometric mean of its runs' C; the spread of C inside a band is ignored
    by the parabola.
A band is skipped (with the reason kept in `Approach2Fit.skipped`) when it has fewer than 3 distinct N, the
parabola opens downwards, or its vertex lies outside the band's sampled N range.

Nothing here needs scipy; matplotlib is imported only by `--plot`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
# The paper's initialisation grid, in the order of the internal vector (a, b, e, alpha, beta).
PAPER_GRID = {
    "a": np.arange(0.0, 26.0, 5.0),
    "b": np.arange(0.0, 26.0, 5.0),
    "e": np.arange(-1.0, 1.01, 0.5),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}
COLUMN_GUESSES = {
    "params": ("N", "params", "n_params", "parameters", "Model Size"),
    "tokens": ("D", "tokens", "n_tokens", "Training Tokens"),
    "flops": ("C", "flops", "FLOPs", "Training FLOP"),
    "loss": ("L", "loss", "final_loss", "val_loss"),
}


class FitError(ValueError):
    """A user error (a bad table, too few runs): the message is one line, meant for stderr."""


# ------------------------------------------------------------------------------------------------ the runs table


@dataclass(frozen=True)
class Runs:
    """One row per training run: parameters N, tokens D, training FLOPs C (= 6 N D when not given), final loss L."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    source: str = ""
    columns: dict = field(default_factory=dict)  # role -> header name used

    def __len__(self) -> int:
        return len(self.L)


def _pick_column(header: list[str], role: str, given: str | None, path: str) -> str | None:
    if given is not None:
        if given not in header:
            raise FitError(f"{path}: no column {given!r} (columns: {', '.join(header)})")
        return given
    lowered = {h.strip().lower(): h for h in header}
    for guess in COLUMN_GUESSES[role]:
        if guess.lower() in lowered:
            return lowered[guess.lower()]
    return None


def read_runs(
    path: str | Path,
    params_column: str | None = None,
    tokens_column: str | None = None,
    flops_column: str | None = None,
    loss_column: str | None = None,
) -> Runs:
    """Reads a CSV with a header. Columns named by the arguments, else guessed from `COLUMN_GUESSES` (the first of
    each role's names found, case-insensitive). D comes from the tokens column, else D = C / (6 N) from the FLOPs
    column; C likewise from D. Raises FitError (one line) for a missing file or column, a non-numeric, non-finite or
    non-positive value (with its line number), or fewer than 5 runs."""
    path = str(path)
    if tokens_column is not None and flops_column is not None:
        raise FitError("give a tokens column or a FLOPs column, not both")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise FitError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FitError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise FitError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    n_col = _pick_column(header, "params", params_column, path)
    l_col = _pick_column(header, "loss", loss_column, path)
    d_col = _pick_column(header, "tokens", tokens_column, path) if flops_column is None else None
    c_col = _pick_column(header, "flops", flops_column, path) if tokens_column is None else None
    for role, col, flag in (("parameter", n_col, "--params-column"), ("loss", l_col, "--loss-column")):
        if col is None:
            raise FitError(f"{path}: no {role} column found; name it with {flag} (columns: {', '.join(header)})")
    if d_col is None and c_col is None:
        raise FitError(
            f"{path}: no tokens or FLOPs column found; name one with --tokens-column or --flops-column "
            f"(columns: {', '.join(header)})"
        )
    use = {"params": n_col, "loss": l_col}
    use["tokens" if d_col is not None else "flops"] = d_col if d_col is not None else c_col
    index = {role: header.index(col) for role, col in use.items()}
    values: dict[str, list[float]] = {role: [] for role in use}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        for role, i in index.items():
            cell = row[i].strip() if i < len(row) else ""
            try:
                v = float(cell)
            except ValueError:
                raise FitError(f"{path} line {line_no}: column {use[role]!r} value {cell!r} is not a number") from None
            if not math.isfinite(v) or v <= 0:
                raise FitError(f"{path} line {line_no}: column {use[role]!r} value {cell!r} must be positive")
            values[role].append(v)
    N = np.asarray(values["params"], dtype=np.float64)
    L = np.asarray(values["loss"], dtype=np.float64)
    if len(L) < 5:
        raise FitError(f"{path}: {len(L)} runs; a fit needs at least 5")
    if "tokens" in values:
        D = np.asarray(values["tokens"], dtype=np.float64)
        C = 6.0 * N * D
    else:
        C = np.asarray(values["flops"], dtype=np.float64)
        D = C / (6.0 * N)
    return Runs(N=N, D=D, C=C, L=L, source=path, columns=use)


# ------------------------------------------------------------------------------------------------ Approach 3


def _to_internal(E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    return np.array([math.log(A), math.log(B), math.log(E), alpha, beta])


def huber_objective(theta: np.ndarray, N, D, L, delta: float = HUBER_DELTA, weights=None):
    """Sum of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient.

    theta: (..., 5) in the order (a, b, e, alpha, beta); returns (f of shape (...), gradient of shape (..., 5)).
    weights: optional (n,) or (..., n) multiplicities of the runs (a bootstrap sample's counts)."""
    theta = np.asarray(theta, dtype=np.float64)
    logN, logD, logL = (np.log(np.asarray(x, dtype=np.float64)) for x in (N, D, L))
    return _huber_and_grad(theta, logN, logD, logL, delta, None if weights is None else np.asarray(weights, float))


def _huber_and_grad(theta, logN, logD, logL, delta, weights):
    a, b, e, alpha, beta = (theta[..., k, None] for k in range(5))
    t1 = a - alpha * logN
    t2 = b - beta * logD
    t3 = np.broadcast_to(e, t1.shape)
    m = np.maximum(np.maximum(t1, t2), t3)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - logL
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    psi = np.clip(r, -delta, delta) / s  # dHuber/dr times 1/s, folding the softmax denominator in
    if weights is not None:
        h = h * weights
        psi = psi * weights
    g1 = (psi * x1).sum(-1)
    g2 = (psi * x2).sum(-1)
    g3 = (psi * x3).sum(-1)
    ga = -(psi * x1 * logN).sum(-1)
    gb = -(psi * x2 * logD).sum(-1)
    return h.sum(-1), np.stack([g1, g2, g3, ga, gb], axis=-1)


def _lbfgs(fun, x0: np.ndarray, max_iter: int = 2000, history: int = 10, ftol: float = 1e-13, xtol: float = 1e-11):
    """Batched L-BFGS (two-loop recursion, backtracking Armijo line search), one independent problem per row of x0.

    fun(x, rows) -> (f, g) evaluates rows `rows` of the batch at points x (len(rows), P). A row stops when its
    objective falls by less than ftol * |f| for 5 iterations running, when its step is below xtol in every
    coordinate, when the line search cannot decrease it, or after max_iter iterations. Relative tolerances make
    the stopping independent of the objective's scale (a sum of Huber terms with delta = 1e-3 is tiny)."""
    x = np.array(x0, dtype=np.float64)
    nb, p = x.shape
    allrows = np.arange(nb)
    f, g = fun(x, allrows)
    f = np.where(np.isfinite(f), f, np.inf)
    S = np.zeros((nb, history, p))
    Y = np.zeros((nb, history, p))
    rho = np.zeros((nb, history))
    head = np.zeros(nb, dtype=np.int64)
    hlen = np.zeros(nb, dtype=np.int64)
    stall = np.zeros(nb, dtype=np.int64)
    active = np.isfinite(f)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi = g[idx]
        q = gi.copy()
        saved = []
        for j in range(history):
            k = (head[idx] - 1 - j) % history
            valid = j < hlen[idx]
            s_j, y_j, r_j = S[idx, k], Y[idx, k], rho[idx, k]
            al = np.where(valid, r_j * (s_j * q).sum(-1), 0.0)
            q -= al[:, None] * y_j
            saved.append((s_j, y_j, r_j, valid, al))
        k0 = (head[idx] - 1) % history
        s0, y0 = S[idx, k0], Y[idx, k0]
        gnorm = np.linalg.norm(gi, axis=-1)
        gamma = np.where(hlen[idx] > 0, (s0 * y0).sum(-1) / np.maximum((y0 * y0).sum(-1), 1e-300), 0.0)
        gamma = np.where(hlen[idx] > 0, gamma, 1.0 / np.maximum(gnorm, 1e-300))
        r = gamma[:, None] * q
        for s_j, y_j, r_j, valid, al in reversed(saved):
            be = np.where(valid, r_j * (y_j * r).sum(-1), 0.0)
            r += s_j * (al - be)[:, None]
        d = -r
        gd = (gi * d).sum(-1)
        bad = ~(gd < 0) | ~np.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent with a unit-length step
            d[bad] = -gi[bad] / np.maximum(gnorm[bad], 1e-300)[:, None]
            hlen[idx[bad]] = 0
            gd = (gi * d).sum(-1)
        t = np.ones(idx.size)
        f_new = np.full(idx.size, np.inf)
        g_new = np.zeros_like(gi)
        pending = np.arange(idx.size)
        for _ls in range(60):
            rows = idx[pending]
            xt = x[rows] + t[pending, None] * d[pending]
            ft, gt = fun(xt, rows)
            ok = np.isfinite(ft) & (ft <= f[rows] + 1e-4 * t[pending] * gd[pending])
            f_new[pending[ok]] = ft[ok]
            g_new[pending[ok]] = gt[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            t[pending] *= 0.5
        done = np.isinf(f_new)  # line search failed: no decrease along d at any step length tried
        active[idx[done]] = False
        acc = np.flatnonzero(~done)
        rows = idx[acc]
        if rows.size == 0:
            continue
        step = t[acc, None] * d[acc]
        y = g_new[acc] - g[rows]
        sy = (step * y).sum(-1)
        decrease = f[rows] - f_new[acc]
        x[rows] += step
        f[rows] = f_new[acc]
        g[rows] = g_new[acc]
        upd = sy > 1e-12 * np.linalg.norm(step, axis=-1) * np.linalg.norm(y, axis=-1)
        ur = rows[upd]
        hk = head[ur]
        S[ur, hk] = step[upd]
        Y[ur, hk] = y[upd]
        rho[ur, hk] = 1.0 / sy[upd]
        head[ur] = (hk + 1) % history
        hlen[ur] = np.minimum(hlen[ur] + 1, history)
        small = decrease <= ftol * np.abs(f[rows])
        stall[rows] = np.where(small, stall[rows] + 1, 0)
        tiny = np.abs(step).max(-1) <= xtol
        active[rows[(stall[rows] >= 5) | tiny]] = False
    return x, f


def _grid_starts() -> np.ndarray:
    grid = [PAPER_GRID[k] for k in ("a", "b", "e", "alpha", "beta")]
    return np.array(list(itertools.product(*grid)), dtype=np.float64)


@dataclass(frozen=True)
class Approach3Fit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap standard errors and percentile intervals.

    se and ci have the keys E, A, B, alpha, beta, a, b (empty when no bootstrap was run); ci holds
    (low, high) at `ci_level` (central)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    se: dict = field(default_factory=dict)
    ci: dict = field(default_factory=dict)
    ci_level: float = 0.8
    n_runs: int = 0
    n_dropped: int = 0
    objective: float = float("nan")
    n_starts: int = 0
    n_bootstrap: int = 0
    grid: str = "fast"

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def optimal(self, C):
        """(N_opt, D_opt) for FLOP budget(s) C under C = 6 N D."""
        C = np.asarray(C, dtype=np.float64)
        n = self.G * (C / 6.0) ** self.a
        return n, C / (6.0 * n)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in PARAM_NAMES}
        out.update(a=self.a, b=self.b, G=self.G)
        out["se"] = dict(self.se)
        out["ci"] = {k: list(v) for k, v in self.ci.items()}
        out.update(
            ci_level=self.ci_level,
            n_runs=self.n_runs,
            n_dropped=self.n_dropped,
            objective=self.objective,
            n_starts=self.n_starts,
            n_bootstrap=self.n_bootstrap,
            grid=self.grid,
            huber_delta=HUBER_DELTA,
        )
        return out


def _summaries(theta: np.ndarray) -> dict[str, np.ndarray]:
    """Internal (..., 5) vectors -> E, A, B, alpha, beta, a, b arrays."""
    a_, b_, e_, alpha, beta = (theta[..., k] for k in range(5))
    return {
        "E": np.exp(e_),
        "A": np.exp(a_),
        "B": np.exp(b_),
        "alpha": alpha,
        "beta": beta,
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
    }


def fit_approach3(
    N,
    D,
    L,
    *,
    delta: float = HUBER_DELTA,
    grid: str = "fast",
    starts: np.ndarray | None = None,
    screen_iters: int = 30,
    keep: int = 64,
    bootstrap: int = 0,
    ci_level: float = 0.8,
    seed: int = 0,
    drop_highest_loss: int = 0,
) -> Approach3Fit:
    """Chinchilla Approach 3 on runs (N, D, L). See the module docstring for the objective, the grids and the
    bootstrap. starts: optional (k, 5) initialisations (E, A, B, alpha, beta) used instead of the grid.
    drop_highest_loss: leave out the runs with the k highest losses first (Besiroglu et al. drop 5 from the
    Figure 4 points)."""
    N, D, L = (np.asarray(x, dtype=np.float64).ravel() for x in (N, D, L))
    if not (N.shape == D.shape == L.shape):
        raise FitError("N, D and L must have the same length")
    if drop_highest_loss:
        keep_idx = np.sort(np.argsort(L, kind="stable")[: len(L) - drop_highest_loss])
        N, D, L = N[keep_idx], D[keep_idx], L[keep_idx]
    if len(L) < 5:
        raise FitError(f"{len(L)} runs; Approach 3 fits 5 constants and needs at least 5")
    if np.any(~np.isfinite(np.concatenate([N, D, L]))) or np.any(np.concatenate([N, D, L]) <= 0):
        raise FitError("N, D and L must be finite and positive")
    if grid not in ("fast", "paper"):
        raise FitError(f"grid must be 'fast' or 'paper', not {grid!r}")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)

    def make_fun(weights):
        def fun(x, rows):
            w = None if weights is None else weights[rows]
            return _huber_and_grad(x, logN, logD, logL, delta, w)

        return fun

    fun = make_fun(None)
    if starts is not None:
        x0 = np.array([_to_internal(*row) for row in np.atleast_2d(starts)])
        x, f = _lbfgs(fun, x0)
    else:
        x0 = _grid_starts()
        if grid == "paper":
            x, f = _lbfgs(fun, x0)
        else:
            x, f = _lbfgs(fun, x0, max_iter=screen_iters)
            best = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")[:keep]
            x, f = _lbfgs(fun, x[best])
    ok = np.isfinite(f) & np.all(np.isfinite(x), axis=-1)
    if not ok.any():
        raise FitError("Approach 3: no initialisation converged to a finite objective")
    best = int(np.argmin(np.where(ok, f, np.inf)))
    theta = x[best]
    vals = {k: float(v) for k, v in _summaries(theta).items()}

    se: dict = {}
    ci: dict = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        n = len(L)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(np.float64)
        xb, fb = _lbfgs(make_fun(weights), np.repeat(theta[None], bootstrap, axis=0))
        good = np.isfinite(fb) & np.all(np.isfinite(xb), axis=-1)
        reps = _summaries(xb[good])
        lo_q, hi_q = 50.0 * (1.0 - ci_level), 50.0 * (1.0 + ci_level)
        for k, v in reps.items():
            se[k] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
            ci[k] = (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)))
    return Approach3Fit(
        E=vals["E"],
        A=vals["A"],
        B=vals["B"],
        alpha=vals["alpha"],
        beta=vals["beta"],
        se=se,
        ci=ci,
        ci_level=ci_level,
        n_runs=len(L),
        n_dropped=drop_highest_loss,
        objective=float(f[best]),
        n_starts=len(x0),
        n_bootstrap=bootstrap,
        grid="starts" if starts is not None else grid,
    )


# ------------------------------------------------------------------------------------------------ Approach 2


def flop_bands(C, bands_per_decade: float = 4.0) -> tuple[np.ndarray, str]:
    """Band label per run (an integer; equal labels = same band) and the binning used ("exact" or "log").

    Exact budgets when every distinct C (within 0.1%) has at least 3 runs; otherwise bands of width
    1/bands_per_decade in log10 C centred on multiples of that width."""
    C = np.asarray(C, dtype=np.float64)
    order = np.argsort(C, kind="stable")
    sc = C[order]
    labels = np.empty(len(C), dtype=np.int64)
    labels[order] = np.cumsum(np.r_[True, sc[1:] > sc[:-1] * 1.001]) - 1
    if np.bincount(labels).min() >= 3:
        return labels, "exact"
    return np.round(np.log10(C) * bands_per_decade).astype(np.int64), "log"


@dataclass(frozen=True)
class IsoFLOPBand:
    C: float  # geometric mean of the band's runs' FLOPs
    n_runs: int
    N_opt: float
    D_opt: float
    L_min: float  # the parabola's value at its vertex
    parabola: tuple  # (c2, c1, c0): L = c2 (ln N)^2 + c1 ln N + c0
    N_range: tuple  # (min N, max N) sampled in the band


@dataclass(frozen=True)
class Approach2Fit:
    """N_opt = k_N C^a and D_opt = k_D C^b fitted to the IsoFLOP parabolas' minima (least squares in log space)."""

    a: float
    b: float
    a_se: float
    b_se: float
    k_N: float
    k_D: float
    bands: list
    skipped: list  # (C, n_runs, reason)
    binning: str

    def optimal(self, C):
        C = np.asarray(C, dtype=np.float64)
        return self.k_N * C**self.a, self.k_D * C**self.b

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "a_se": self.a_se,
            "b_se": self.b_se,
            "k_N": self.k_N,
            "k_D": self.k_D,
            "binning": self.binning,
            "bands": [
                {"C": bd.C, "n_runs": bd.n_runs, "N_opt": bd.N_opt, "D_opt": bd.D_opt, "L_min": bd.L_min}
                for bd in self.bands
            ],
            "skipped": [{"C": c, "n_runs": n, "reason": r} for c, n, r in self.skipped],
        }


def _loglog_fit(x, y) -> tuple[float, float, float]:
    """Least squares log y = c + s log x: (slope, exp(c), standard error of the slope; nan with 2 points)."""
    lx, ly = np.log(x), np.log(y)
    A = np.stack([lx, np.ones_like(lx)], axis=1)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    n = len(lx)
    if n > 2:
        resid = ly - A @ coef
        s2 = float(resid @ resid) / (n - 2)
        se = math.sqrt(s2 / float(((lx - lx.mean()) ** 2).sum()))
    else:
        se = float("nan")
    return float(coef[0]), float(math.exp(coef[1])), se


def fit_approach2(N, C, L, *, bands_per_decade: float = 4.0) -> Approach2Fit:
    """Chinchilla Approach 2 on runs (N, C, L); see the module docstring for the binning and the skip rules."""
    N, C, L = (np.asarray(x, dtype=np.float64).ravel() for x in (N, C, L))
    labels, binning = flop_bands(C, bands_per_decade)
    bands, skipped = [], []
    for lab in np.unique(labels):
        sel = labels == lab
        n_b, c_b = int(sel.sum()), float(np.exp(np.log(C[sel]).mean()))
        lnN = np.log(N[sel])
        if len(np.unique(np.round(lnN, 9))) < 3:
            skipped.append((c_b, n_b, "fewer than 3 distinct model sizes"))
            continue
        c2, c1, c0 = np.polyfit(lnN, L[sel], 2)
        if c2 <= 0:
            skipped.append((c_b, n_b, "parabola opens downwards (no minimum)"))
            continue
        v = -c1 / (2 * c2)
        if not lnN.min() <= v <= lnN.max():
            skipped.append((c_b, n_b, "minimum outside the sampled model sizes"))
            continue
        n_opt = float(math.exp(v))
        bands.append(
            IsoFLOPBand(
                C=c_b,
                n_runs=n_b,
                N_opt=n_opt,
                D_opt=c_b / (6.0 * n_opt),
                L_min=float(c0 - c1 * c1 / (4 * c2)),
                parabola=(float(c2), float(c1), float(c0)),
                N_range=(float(N[sel].min()), float(N[sel].max())),
            )
        )
    if len(bands) < 2:
        reasons = "; ".join(f"C={c:.3g} ({n} runs): {r}" for c, n, r in skipped) or "no bands"
        raise FitError(f"Approach 2 needs at least 2 FLOP bands with a usable parabola, got {len(bands)} ({reasons})")
    cs = np.array([bd.C for bd in bands])
    a, k_n, a_se = _loglog_fit(cs, np.array([bd.N_opt for bd in bands]))
    b, k_d, b_se = _loglog_fit(cs, np.array([bd.D_opt for bd in bands]))
    return Approach2Fit(a=a, b=b, a_se=a_se, b_se=b_se, k_N=k_n, k_D=k_d, bands=bands, skipped=skipped, binning=binning)


# ------------------------------------------------------------------------------------------------ plot and CLI


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
