"""Reading a table of runs (one row per training run: N, D or C, final loss) for the scaling-law fits.

Columns are named by the caller or guessed from `COLUMN_GUESSES`; every problem with the table is a `FitError`
whose message is one line, meant for stderr.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMN_GUESSES = {
    "params": ("N", "params", "n_params", "parameters", "Model Size"),
    "tokens": ("D", "tokens", "n_tokens", "Training Tokens"),
    "flops": ("C", "flops", "FLOPs", "Training FLOP"),
    "loss": ("L", "loss", "final_loss", "val_loss"),
}


class FitError(ValueError):
    """A user error (a bad table, too few runs): the message is one line, meant for stderr."""


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
