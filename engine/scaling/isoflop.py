"""Chinchilla's Approach 2 (IsoFLOP profiles) on a table of runs.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv 2203.15556), section 3.2.

Runs are grouped into FLOP bands, a parabola of loss against ln N is fitted per band (least squares),
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.scaling.runs_table import FitError


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
        reasons = "; ".join(f"C={c:.3g} ({n} runs): {r}" for c, n, r in skipped)
        reasons = reasons or ("every run falls in one band" if bands else "no bands")
        raise FitError(f"Approach 2 needs at least 2 FLOP bands with a usable parabola, got {len(bands)} ({reasons})")
    cs = np.array([bd.C for bd in bands])
    a, k_n, a_se = _loglog_fit(cs, np.array([bd.N_opt for bd in bands]))
    b, k_d, b_se = _loglog_fit(cs, np.array([bd.D_opt for bd in bands]))
    return Approach2Fit(a=a, b=b, a_se=a_se, b_se=b_se, k_N=k_n, k_D=k_d, bands=bands, skipped=skipped, binning=binning)
