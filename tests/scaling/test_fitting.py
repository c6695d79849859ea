"""engine.scaling.fitting and .isoflop: Chinchilla Approaches 3 and 2 on synthetic data with known constants, on the
Chinchilla Figure 4 points (data/scaling/chinchilla_fig4_points.csv) against an independent fit, and the `fit` CLI
(engine.scaling.fit_cli).

"Independent fit" of the Figure 4 points: the same estimator (sum of Huber(delta = 1e-3) of log-space residuals in
the LSE parameterisation, the Chinchilla paper's Approach 3), but computed by different code: the objective is
written again below with numpy's logaddexp, and minimised by scipy's derivative-free Nelder-Mead (so neither the
engine's gradient nor its L-BFGS is used) from a different set of starts (a 2-point grid per parameter, not the
paper's grid), restarted once from its own result. Two different optimisers landing on the same minimum is the
check; agreement with published numbers is recorded, not asserted, except where noted.

Recorded on the Figure 4 points (all 245 runs; bootstrap refits from the full-data estimate):
  engine:      E 1.891, A 495.7, B 1.285e4, alpha 0.3493, beta 0.4530  (a = 0.565)
  with the 5 highest-loss runs dropped, as Besiroglu et al. 2024 do:
  engine:      E 1.817, A 477.8, B 2143,    alpha 0.3473, beta 0.3672  (a = 0.514), objective 1.01827e-3
  Besiroglu:   E 1.8172, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658 (a = 0.513), objective 1.01864e-3 here
  Chinchilla:  E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28 (a = 0.46)
The paper's constants are far from any fit of these points (beta 0.28 against 0.37-0.45); Besiroglu et al.'s are
close to ours and score a slightly higher objective, i.e. our optimiser went a little further down the same valley.
"""

import json
import math
import subprocess
import sys
import warnings
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from engine.scaling.fit_cli import cli_main
from engine.scaling.fitting import PAPER_GRID, fit_approach3, huber_objective
from engine.scaling.isoflop import fit_approach2, flop_bands
from engine.scaling.runs_table import FitError, read_runs

ROOT = Path(__file__).resolve().parents[2]
FIG4 = ROOT / "data" / "scaling" / "chinchilla_fig4_points.csv"
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
BESIROGLU_SE = {"E": 0.03, "A": 124.58, "B": 1293.23, "alpha": 0.02, "beta": 0.02}


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


@pytest.fixture(scope="module")
def synthetic():
    """8 x 8 grid of N in [1e7, 1e10] and D in [1e9, 1e12], loss times exp(N(0, 0.005^2)) noise."""
    rng = np.random.default_rng(1)
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
    L = law(N, D) * np.exp(rng.normal(0.0, 0.005, N.shape))
    return N, D, L


@pytest.fixture(scope="module")
def synthetic_fit(synthetic):
    return fit_approach3(*synthetic, bootstrap=30, seed=0)


# ------------------------------------------------------------------------------------------------ Approach 3


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    N, D = rng.uniform(1e7, 1e10, 20), rng.uniform(1e9, 1e12, 20)
    L = law(N, D) * np.exp(rng.normal(0, 0.02, 20))  # residuals on both sides of delta
    theta = np.array([math.log(400.0), math.log(500.0), math.log(1.7), 0.33, 0.3])
    f, g = huber_objective(theta, N, D, L)
    for k in range(5):
        e = np.zeros(5)
        e[k] = 1e-6
        fd = (huber_objective(theta + e, N, D, L)[0] - huber_objective(theta - e, N, D, L)[0]) / 2e-6
        assert g[k] == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_noiseless_recovery_is_exact():
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 6), np.geomspace(1e9, 1e12, 6)))
    fit = fit_approach3(N, D, law(N, D))
    for k, v in TRUE.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-4), k


def test_recovers_constants_from_noisy_data(synthetic_fit):
    fit = synthetic_fit
    assert fit.E == pytest.approx(TRUE["E"], rel=0.03)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.02)
    assert fit.A == pytest.approx(TRUE["A"], rel=0.25)
    assert fit.B == pytest.approx(TRUE["B"], rel=0.25)
    assert fit.a == pytest.approx(0.28 / 0.62, abs=0.02)
    assert fit.a + fit.b == pytest.approx(1.0)


def test_bootstrap_standard_errors_cover_the_truth(synthetic_fit):
    fit = synthetic_fit
    assert fit.n_bootstrap == 30 and set(fit.se) == {"E", "A", "B", "alpha", "beta", "a", "b"}
    for k in TRUE:
        se = fit.se[k]
        assert 0 < se < 0.2 * abs(getattr(fit, k)), k
        assert abs(getattr(fit, k) - TRUE[k]) < 4 * se, k  # the truth within 4 standard errors
        lo, hi = fit.ci[k]
        assert lo <= hi


def test_fast_grid_matches_fully_converged_starts(synthetic):
    """The screened "fast" grid reaches an objective no worse than a random tenth of the paper's grid each run to
    convergence (the full "paper" grid takes ~10 s, too slow for this suite)."""
    keys = ("a", "b", "e", "alpha", "beta")
    grid = np.array(list(product(*(PAPER_GRID[k] for k in keys))))
    sample = grid[np.random.default_rng(0).choice(len(grid), 450, replace=False)]
    starts = np.stack(
        [np.exp(sample[:, 2]), np.exp(sample[:, 0]), np.exp(sample[:, 1]), sample[:, 3], sample[:, 4]], axis=1
    )  # (E, A, B, alpha, beta)
    full = fit_approach3(*synthetic, starts=starts)
    fast = fit_approach3(*synthetic)
    assert fast.objective <= full.objective * (1 + 1e-9)
    assert fast.alpha == pytest.approx(full.alpha, rel=1e-5)


def test_frontier_formula(synthetic_fit):
    fit = synthetic_fit
    C = 1e22
    n, d = fit.optimal(C)
    assert 6 * n * d == pytest.approx(C)
    # the optimum minimises L along the IsoFLOP line
    ns = n * np.array([0.9, 1.1])
    assert np.all(fit.predict(ns, C / (6 * ns)) > fit.predict(n, d))


# ------------------------------------------------------------------------------------------------ Approach 2


def isoflop_sweep(budgets, per_band=9, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    G = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    N, C = [], []
    for c in budgets:
        n_opt = G * (c / 6) ** a
        N.extend(n_opt * np.geomspace(1 / 4, 4, per_band))
        C.extend([c] * per_band)
    N, C = np.array(N), np.array(C)
    L = law(N, C / (6 * N)) * np.exp(rng.normal(0, noise, N.shape))
    return N, C, L, a


def test_approach2_recovers_frontier_exponents_exact_budgets():
    N, C, L, a = isoflop_sweep(np.geomspace(1e18, 1e22, 9))
    fit = fit_approach2(N, C, L)
    assert fit.binning == "exact" and len(fit.bands) == 9 and not fit.skipped
    assert fit.a == pytest.approx(a, abs=0.01)
    assert fit.b == pytest.approx(1 - a, abs=0.01)


def test_approach2_binned_budgets_with_noise():
    # budgets jittered by up to +-10%: not exact, so log-spaced bands of 1/4 decade
    N, C, L, a = isoflop_sweep([1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21], per_band=11, noise=0.003, seed=2)
    C = C * np.exp(np.random.default_rng(3).uniform(-0.1, 0.1, C.shape))
    fit = fit_approach2(N, C, L)
    assert fit.binning == "log" and len(fit.bands) == 7
    assert fit.a == pytest.approx(a, abs=0.04)
    assert fit.a_se < 0.05


def test_flop_bands_log_spaced():
    labels, how = flop_bands([1e19, 1.05e19, 3e19, 3.2e19, 6e19, 1e20])
    assert how == "log"
    assert labels[0] == labels[1] and labels[2] == labels[3] and len(set(labels)) == 4


def test_approach2_needs_two_bands():
    with pytest.raises(FitError, match="at least 2 FLOP bands"):
        fit_approach2([1e8, 2e8, 4e8], [1e19] * 3, [3.0, 2.9, 3.0])


# ------------------------------------------------------------------------------------------------ Figure 4 points


def independent_fit(N, D, L):
    """Nelder-Mead on a separately written objective, from its own starts; returns (E, A, B, alpha, beta), f."""
    from scipy.optimize import minimize

    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def objective(p):
        a, b, e, alpha, beta = p
        pred = np.logaddexp(np.logaddexp(a - alpha * lN, b - beta * lD), e)
        r = np.abs(pred - lL)
        return float(np.sum(np.where(r <= 1e-3, 0.5 * r * r, 1e-3 * (r - 0.5e-3))))

    opts = {"xatol": 1e-10, "fatol": 1e-15, "maxiter": 20000, "maxfev": 40000}
    best = None
    for start in product([4.0, 10.0], [4.0, 10.0], [0.5], [0.3], [0.3, 0.6]):
        res = minimize(objective, start, method="Nelder-Mead", options=opts)
        res = minimize(objective, res.x, method="Nelder-Mead", options=opts)
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}, best.fun


@pytest.fixture(scope="module")
def fig4():
    return read_runs(FIG4)


@pytest.fixture(scope="module")
def fig4_fit(fig4):
    """fig4_fit(drop): the engine's Approach-3 fit of the points without the `drop` highest losses (cached)."""
    cache = {}

    def get(drop):
        if drop not in cache:
            cache[drop] = fit_approach3(fig4.N, fig4.D, fig4.L, drop_highest_loss=drop)
        return cache[drop]

    return get


def test_fig4_table_reads_with_guessed_columns(fig4):
    assert len(fig4) == 245
    assert fig4.columns == {"params": "Model Size", "flops": "Training FLOP", "loss": "loss"}
    assert np.allclose(fig4.D, fig4.C / (6 * fig4.N))


@pytest.mark.parametrize("drop", [0, 5])
def test_fig4_fit_matches_independent_fit(fig4, fig4_fit, drop):
    fit = fig4_fit(drop)
    keep = np.sort(np.argsort(fig4.L, kind="stable")[: len(fig4) - drop])
    ref, ref_f = independent_fit(fig4.N[keep], fig4.D[keep], fig4.L[keep])
    assert fit.n_runs == 245 - drop
    assert fit.objective <= ref_f * (1 + 1e-7)
    for k in ("E", "alpha", "beta"):
        assert getattr(fit, k) == pytest.approx(ref[k], rel=1e-3), k
    for k in ("A", "B"):  # a flat valley along (A, alpha) and (B, beta): looser
        assert getattr(fit, k) == pytest.approx(ref[k], rel=1e-2), k


def test_fig4_compared_with_published_constants(fig4, fig4_fit):
    """Recorded in the module docstring. Asserted only: (1) with Besiroglu et al.'s procedure (drop the 5
    highest losses) we land within their standard errors of their constants; (2) on these points the fitted
    constants score a lower objective than both published sets, and the paper's beta = 0.28 is far off."""
    fit = fig4_fit(5)
    for k, v in BESIROGLU.items():
        assert abs(getattr(fit, k) - v) < BESIROGLU_SE[k], k
    keep = np.sort(np.argsort(fig4.L, kind="stable")[:240])
    args = (fig4.N[keep], fig4.D[keep], fig4.L[keep])
    for published in (BESIROGLU, TRUE):
        theta = [
            math.log(published["A"]),
            math.log(published["B"]),
            math.log(published["E"]),
            published["alpha"],
            published["beta"],
        ]
        assert fit.objective < huber_objective(np.array(theta), *args)[0]
    assert fit.beta - TRUE["beta"] > 0.05


def test_fig4_approach2_exponent(fig4):
    fit = fit_approach2(fig4.N, fig4.C, fig4.L)
    assert fit.binning == "log" and len(fit.bands) >= 8
    assert 0.4 < fit.a < 0.6  # the paper's Approach 2 gives 0.49 on its full data
    assert fit.a + fit.b == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_cli_json(tmp_path, capsys, synthetic):
    N, D, L = synthetic
    csv_path = write_csv(tmp_path / "runs.csv", ["params", "toks", "final"], zip(N, D, L))
    rc, out, err = run_cli(
        [
            csv_path,
            "--params-column",
            "params",
            "--tokens-column",
            "toks",
            "--loss-column",
            "final",
            "--bootstrap",
            "5",
            "--json",
        ],
        capsys,
    )
    assert rc == 0, err
    data = json.loads(out)
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert math.isfinite(data[k]) and math.isfinite(data["se"][k])
    assert data["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert "a" in data["approach2"] and data["n_runs"] == 64


def test_cli_flops_column_and_text_output(capsys):
    rc, out, err = run_cli(
        [FIG4, "--flops-column", "Training FLOP", "--params-column", "Model Size", "--approach", "2"], capsys
    )
    assert rc == 0, err
    assert "Approach 2" in out and "Approach 3" not in out


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", "no such file"),
        ("missing_column", "no column 'nope'"),
        ("non_numeric", "line 3: column 'L' value 'abc' is not a number"),
        ("non_positive", "line 2: column 'N' value '-5' must be positive"),
        ("both", "not allowed with argument"),
        ("no_loss", "no loss column found"),
        ("one_band", "got 1 (every run falls in one band)"),  # and no numpy warnings before the line
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, case, match):
    good = [[1e8 * (i + 1), 1e10, 3.0 - 0.1 * i] for i in range(6)]
    path = tmp_path / "runs.csv"
    argv = [path]
    if case == "missing_file":
        path = tmp_path / "absent.csv"
        argv = [path]
    elif case == "missing_column":
        write_csv(path, ["N", "D", "L"], good)
        argv += ["--loss-column", "nope"]
    elif case == "non_numeric":
        write_csv(path, ["N", "D", "L"], good[:1] + [[2e8, 1e10, "abc"]] + good[2:])
    elif case == "non_positive":
        write_csv(path, ["N", "D", "L"], [[-5, 1e10, 3.0]] + good[1:])
    elif case == "both":
        write_csv(path, ["N", "D", "L"], good)
        argv += ["--tokens-column", "D", "--flops-column", "D"]
    elif case == "no_loss":
        write_csv(path, ["N", "D", "x"], good)
    elif case == "one_band":  # every run at 1e18 FLOPs
        write_csv(path, ["N", "C", "L"], [[1000 * (i + 1), 1e18, 3.0 + 0.1 * i] for i in range(10)])
        argv += ["--flops-column", "C", "--approach", "both"]
    with warnings.catch_warnings(record=True) as caught:  # a terminal would print them above the error line
        warnings.simplefilter("always")
        rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_cli_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    rc, out, err = run_cli([FIG4, "--approach", "2", "--plot", tmp_path / "out.png"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "matplotlib" in err


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "engine.scaling", "fit", str(FIG4), "--approach", "2", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert 0.4 < json.loads(proc.stdout)["approach2"]["a"] < 0.6
