"""Fit a loss law to your own table of runs: Chinchilla's Approach 3 (parametric).

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

The fitted law and its frontier under C = 6 N D (paper eq. 4: N_opt = G (C/6)^a) are `laws.ParametricLaw`'s:
`Approach3Fit.law`, to which its G, a, b, `optimal` and `predict` delegate. Approach 2 is in `isoflop`, reading a
runs table in `runs_table`, the `fit` command in `fit_cli`. Nothing here needs scipy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from engine.scaling.laws import ParametricLaw
from engine.scaling.runs_table import FitError

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
    def law(self) -> ParametricLaw:
        """The fitted constants as a `laws.ParametricLaw` (named "approach3-fit"), which owns the frontier."""
        return ParametricLaw("approach3-fit", E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.law.a

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.law.b

    @property
    def G(self) -> float:
        return self.law.G

    def predict(self, N, D):
        return self.law.loss(np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64))

    def optimal(self, C):
        """(N_opt, D_opt) for FLOP budget(s) C under C = 6 N D (D_opt = C / 6 N_opt, so the budget holds exactly)."""
        C = np.asarray(C, dtype=np.float64)
        n = self.law.n_opt(C)
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
