"""Noiseless linear-regression prompts and the in-context baselines of Garg et al. 2022 (arXiv:2208.01066, §3).

A task is w ~ N(0, I_d); a prompt holds n points x_i ~ N(0, I_d) with y_i = w·x_i. Every prediction here is made at
each point i from the i points before it (k = i in-context examples), so one prompt scores k = 0..n-1 at once, as
Garg et al. train and evaluate. Squared errors are divided by d (the paper's normalisation: predicting 0 scores
E[y^2]/d = 1). `active_dims` < d zeroes the coordinates past it (the paper's dimension curriculum).
"""

from __future__ import annotations

import torch


def sample_prompts(
    batch: int, n_points: int, d: int, generator: torch.Generator, active_dims: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """xs (batch, n_points, d) and ys (batch, n_points) of fresh tasks; coordinates >= `active_dims` are zero."""
    if batch < 1 or n_points < 1 or d < 1:
        raise ValueError(f"sample_prompts needs positive sizes, got {batch=} {n_points=} {d=}")
    xs = torch.randn(batch, n_points, d, generator=generator)
    if active_dims is not None:
        if not 1 <= active_dims <= d:
            raise ValueError(f"active_dims must be in [1, {d}], got {active_dims}")
        xs[..., active_dims:] = 0.0
    w = torch.randn(batch, d, 1, generator=generator)
    return xs, (xs @ w).squeeze(-1)


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Tokens (b, 2n, d): x_1, (y_1, 0, ..., 0), x_2, ... (Garg et al.'s encoding: y as a d-vector with zeros)."""
    b, n, d = xs.shape
    y_tokens = torch.zeros_like(xs)
    y_tokens[..., 0] = ys
    return torch.stack((xs, y_tokens), dim=2).reshape(b, 2 * n, d)


def least_squares_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(b, n): at point i, x_i · w_hat with w_hat the minimum-norm least-squares fit of the first i points (pinv)."""
    preds = torch.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        w_hat = torch.linalg.pinv(xs[:, :i].double()) @ ys[:, :i, None].double()  # (b, d, 1), min-norm when i < d
        preds[:, i] = (xs[:, i : i + 1].double() @ w_hat).reshape(-1).to(ys.dtype)
    return preds


def nearest_neighbour_predictions(xs: torch.Tensor, ys: torch.Tensor, neighbours: int = 3) -> torch.Tensor:
    """(b, n): at point i, the mean y of the `neighbours` earlier points nearest to x_i (all of them when fewer)."""
    preds = torch.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        dist = (xs[:, :i] - xs[:, i : i + 1]).square().sum(-1)  # (b, i)
        idx = dist.topk(min(neighbours, i), dim=1, largest=False).indices
        preds[:, i] = ys[:, :i].gather(1, idx).mean(1)
    return preds


def averaging_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(b, n): at point i, x_i · w_hat with w_hat = (1/i) sum_{j<i} y_j x_j (Garg et al.'s "averaging" baseline)."""
    sums = (ys[..., None] * xs).cumsum(1)  # sum_{j<=i} y_j x_j
    prev = torch.cat((torch.zeros_like(sums[:, :1]), sums[:, :-1]), 1)
    counts = torch.arange(xs.shape[1], dtype=xs.dtype).clamp(min=1)[None, :, None]
    return ((prev / counts) * xs).sum(-1)


def normalized_squared_error(preds: torch.Tensor, ys: torch.Tensor, d: int) -> torch.Tensor:
    """(n,): the squared error at each number of in-context examples, averaged over prompts and divided by d."""
    return (preds - ys).square().mean(0) / d


BASELINES = {
    "least squares": least_squares_predictions,
    "3-nearest neighbours": nearest_neighbour_predictions,
    "averaging": averaging_predictions,
}
